"""Resolve ``data.task`` into disjoint train / calibration / eval data with a recorded split.

Task specs:
  builtin:addition            the built-in single-digit addition task (no files needed)
  truthfulqa                  TruthfulQA MC (6-shot QA primer), split by question id
  commonsense:<name>          one of svd_ray.data.COMMONSENSE_TASKS (train split for training,
                              held-apart halves of the test file for calibration / eval)
  jsonl:<path>                a user task in the documented JSONL format (docs/DATA.md)
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from svd_ray.config import DataConfig
from svd_ray.data import GenItem, MCItem, TrainExample


@dataclass
class TaskData:
    name: str
    train: list[TrainExample]
    calibration: list[TrainExample]
    eval_mc: list[MCItem]
    eval_gen: list[GenItem] = field(default_factory=list)
    split: dict = field(default_factory=dict)  # SplitRecord as a dict, for manifests


def _cap(items: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(items):
        return list(items)
    return random.Random(seed).sample(list(items), n)


def _mc_to_examples(items: list[MCItem]) -> list[TrainExample]:
    """Teacher-forcing targets for calibration: the (first) correct choice of each item."""
    return [TrainExample(prompt=i.prompt, answer=i.choices[i.labels.index(1)], id=i.id) for i in items]


def _split_dict(record) -> dict:
    return record.to_dict() if hasattr(record, "to_dict") else dict(record.__dict__)


def load_task_data(cfg: DataConfig) -> TaskData:
    spec = cfg.task
    if spec == "builtin:addition":
        from svd_ray.data import builtin_task

        task = builtin_task(seed=cfg.seed)
        return TaskData(
            name="builtin:addition",
            train=_cap(task.examples["train"], cfg.train_size, cfg.seed),
            calibration=_cap(task.examples["calibration"], cfg.calibration_size, cfg.seed),
            eval_mc=_cap(task.mc["eval"], cfg.eval_size, cfg.seed),
            eval_gen=_cap(task.gen["eval"], cfg.eval_size, cfg.seed),
            split=_split_dict(task.split),
        )
    if spec == "truthfulqa":
        from svd_ray.data import load_truthfulqa_mc, load_truthfulqa_train, truthfulqa_split

        split = truthfulqa_split(seed=cfg.seed, data_dir=cfg.data_dir)
        train = load_truthfulqa_train(split["train"], data_dir=cfg.data_dir)
        calib = load_truthfulqa_train(split["calibration"], data_dir=cfg.data_dir)
        mc = load_truthfulqa_mc(ids=split["eval"], data_dir=cfg.data_dir)
        return TaskData(
            name="truthfulqa",
            train=_cap(train, cfg.train_size, cfg.seed),
            calibration=_cap(calib, cfg.calibration_size, cfg.seed),
            eval_mc=_cap(mc.mc1, cfg.eval_size, cfg.seed),
            split=_split_dict(split),
        )
    raise ValueError(
        f"data.task {spec!r} is not supported here yet; use 'builtin:addition' or 'truthfulqa'"
    )
