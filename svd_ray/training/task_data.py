"""Resolve ``data.task`` into disjoint train / calibration / eval data with a recorded split.

Task specs:
  builtin:addition        the built-in single-digit addition task (no files needed)
  truthfulqa              TruthfulQA, split by question id (default 0.4 / 0.1 / 0.5, seeded);
                          train/calibration = (6-shot primer + question, " " + best answer),
                          eval = MC1 and MC2 items of the eval questions
  commonsense             one adapter for all commonsense tasks (the paper's setting): train on
                          the union of the offline train splits (ARC-e, ARC-c, BoolQ, OBQA),
                          calibrate on examples held apart from that union, evaluate on the
                          test files of BoolQ, PIQA, SIQA, WinoGrande, ARC-e, ARC-c, OBQA
  commonsense:<task>      the same for one task (PIQA/SIQA/WinoGrande have no train split offline:
                          their test file is split into train / calibration / eval)
  jsonl:<path>            a user task in the documented JSONL format (docs/DATA.md §6): every line
                          is an MC item; split by item id into train / calibration / eval with
                          ``data.split_fractions`` (default 0.4 / 0.1 / 0.5, seeded)
``eval_size`` caps eval items per task (questions for TruthfulQA), ``train_size`` training
examples, ``calibration_size`` calibration examples; subsamples are seeded.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from svd_ray.config import DataConfig
from svd_ray.data import GenItem, MCItem, TrainExample, make_split

COMMONSENSE_EVAL = ("boolq", "piqa", "siqa", "winogrande", "arc_e", "arc_c", "obqa")


@dataclass
class TaskData:
    name: str
    train: list[TrainExample]
    calibration: list[TrainExample]
    eval_mc: list[MCItem]  # item.source tells the benchmark (e.g. truthfulqa_mc1, arc_e)
    eval_gen: list[GenItem] = field(default_factory=list)
    split: dict = field(default_factory=dict)  # SplitRecord.to_dict(): goes into manifests
    notes: list[str] = field(default_factory=list)  # e.g. a requested size larger than the pool


def _cap(items: list, n: int | None, seed: int, notes: list[str] | None = None, what: str = "") -> list:
    if n is None or n >= len(items):
        if n is not None and n > len(items) and notes is not None:
            notes.append(f"data.{what} = {n} but the split holds {len(items)}: using {len(items)}")
        return list(items)
    keep = set(random.Random(seed).sample(range(len(items)), n))
    return [x for i, x in enumerate(items) if i in keep]  # keep file order


def _answer_example(item: MCItem) -> TrainExample:
    """Teacher-forcing target of an MC item: its (first) correct choice."""
    return TrainExample(prompt=item.prompt, answer=item.choices[item.labels.index(1)], id=item.id)


def _builtin(cfg: DataConfig) -> TaskData:
    from svd_ray.data import builtin_task

    task = builtin_task(seed=cfg.seed)
    return TaskData(
        name="builtin:addition",
        train=_cap(task.examples["train"], cfg.train_size, cfg.seed),
        calibration=_cap(task.examples["calibration"], cfg.calibration_size, cfg.seed),
        eval_mc=_cap(task.mc["eval"], cfg.eval_size, cfg.seed),
        eval_gen=_cap(task.gen["eval"], cfg.eval_size, cfg.seed),
        split=task.split.to_dict(),
    )


def _truthfulqa(cfg: DataConfig) -> TaskData:
    from svd_ray.data import load_truthfulqa_gen, load_truthfulqa_mc, load_truthfulqa_train, truthfulqa_split

    split = truthfulqa_split(cfg.data_dir, seed=cfg.seed)
    eval_ids = _cap(sorted(split["eval"]), cfg.eval_size, cfg.seed)
    mc = load_truthfulqa_mc(cfg.data_dir, ids=eval_ids)
    return TaskData(
        name="truthfulqa",
        train=_cap(load_truthfulqa_train(cfg.data_dir, ids=split["train"]), cfg.train_size, cfg.seed),
        calibration=_cap(load_truthfulqa_train(cfg.data_dir, ids=split["calibration"]), cfg.calibration_size, cfg.seed),
        eval_mc=list(mc.mc1) + list(mc.mc2),
        eval_gen=load_truthfulqa_gen(cfg.data_dir, ids=eval_ids),
        split=split.to_dict(),
    )


def _commonsense(cfg: DataConfig, only: str | None) -> TaskData:
    from svd_ray.data import OFFLINE_SPLITS, load_commonsense_mc, load_commonsense_train_mix
    from svd_ray.data.commonsense import canonical_task

    tasks = [canonical_task(only)] if only else list(COMMONSENSE_EVAL)
    with_train = [t for t in tasks if "train" in OFFLINE_SPLITS[t]]
    eval_mc: list[MCItem] = []
    train_pool: list[TrainExample] = []
    for t in tasks:
        if t in with_train:
            eval_mc += load_commonsense_mc(t, "test", cfg.data_dir, limit=cfg.eval_size, seed=cfg.seed)
        else:  # no offline train split: hold parts of the test file apart for training/calibration
            items = load_commonsense_mc(t, "test", cfg.data_dir)
            rec = make_split([i.id for i in items], cfg.split_fractions, seed=cfg.seed, dataset=t)
            by_id = {i.id: i for i in items}
            train_pool += [_answer_example(by_id[i]) for i in rec["train"] + rec["calibration"]]
            eval_mc += _cap([by_id[i] for i in rec["eval"]], cfg.eval_size, cfg.seed)
    if with_train:
        train_pool += load_commonsense_train_mix(with_train, cfg.data_dir, seed=cfg.seed)
    ids = [f"{i}:{e.id}" for i, e in enumerate(train_pool)]  # ids unique even across tasks
    rec = make_split(ids, {"train": 0.9, "calibration": 0.1}, seed=cfg.seed, dataset="commonsense-train-pool")
    by_id = dict(zip(ids, train_pool))
    record = rec.to_dict()
    record["eval_ids"] = [i.id for i in eval_mc]
    return TaskData(
        name=f"commonsense:{only}" if only else "commonsense",
        train=_cap([by_id[i] for i in rec["train"]], cfg.train_size, cfg.seed),
        calibration=_cap([by_id[i] for i in rec["calibration"]], cfg.calibration_size, cfg.seed),
        eval_mc=eval_mc,
        split=record,
    )


def _jsonl(cfg: DataConfig, path: str) -> TaskData:
    from svd_ray.data import load_jsonl_mc

    items = load_jsonl_mc(path, duplicates=cfg.jsonl_duplicates)
    rec = make_split([i.id for i in items], cfg.split_fractions, seed=cfg.seed, dataset=path)
    by_id = {i.id: i for i in items}
    notes: list[str] = []
    return TaskData(
        name=f"jsonl:{path}",
        train=_cap([_answer_example(by_id[i]) for i in rec["train"]], cfg.train_size, cfg.seed, notes, "train_size"),
        calibration=_cap([_answer_example(by_id[i]) for i in rec["calibration"]], cfg.calibration_size, cfg.seed,
                         notes, "calibration_size"),
        eval_mc=_cap([by_id[i] for i in rec["eval"]], cfg.eval_size, cfg.seed, notes, "eval_size"),
        split=rec.to_dict(),
        notes=notes,
    )


def load_task_data(cfg: DataConfig) -> TaskData:
    spec = cfg.task
    if spec == "builtin:addition":
        return _builtin(cfg)
    if spec == "truthfulqa":
        return _truthfulqa(cfg)
    if spec == "commonsense":
        return _commonsense(cfg, None)
    if spec.startswith("commonsense:"):
        return _commonsense(cfg, spec.split(":", 1)[1])
    if spec.startswith("jsonl:"):
        return _jsonl(cfg, spec.split(":", 1)[1])
    raise ValueError(
        f"data.task {spec!r} is unknown; use builtin:addition, truthfulqa, commonsense, commonsense:<task> "
        "or jsonl:<path>"
    )
