"""Commonsense reasoning tasks in the LLM-Adapters instruction format.

Files: ``<data_dir>/commonsense/<folder>/{train,test}.json`` (verified against
``commonsense/SHA256SUMS``); each record has ``instruction`` (question + numbered options +
"Answer format: answer1/answer2/..."), ``input`` (empty), ``output`` ("the correct answer is
answer2") and ``answer`` ("answer2", "solution1", "option2", "true", ...).

Two scoring styles produce ``MCItem``s:

* ``style="llm_adapters"`` (default; the SVDecode paper's Table 8 data): prompt = the Alpaca
  template used by LLM-Adapters' ``finetune.py``::

      Below is an instruction that describes a task. Write a response that appropriately completes the request.

      ### Instruction:
      {instruction}

      ### Response:

  and one choice per answer key, written as the model is trained to write it:
  ``"the correct answer is answer1"``, ... (no leading space: the prompt ends with a newline).
  LLM-Adapters itself evaluates by generating and regex-matching the key; we score the same
  strings by log-likelihood, so the choice is the one the model would generate.
* ``style="text"`` (lm-eval-style acc/acc_norm): choices are the option texts parsed out of the
  instruction, ``"Question: {q}\\nAnswer:"`` + ``" {option}"`` (BoolQ: ``"Question: {q}?\\nAnswer:"``
  + ``" yes"``/``" no"``; questions only, no passages). WinoGrande: prompt = the sentence up to the
  blank, choice = ``" {option}{rest of sentence}"`` (full-sentence scoring, not lm-eval's partial
  scoring, which needs a different prompt per choice). HellaSwag (hub only): prompt = the
  "activity: context" text, choices ``" {ending}"``.

Item ids: ``"{task}/{split}/{index in file:05d}"``.
"""
from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .checksums import verify_files
from .paths import DataUnavailableError, check_source, import_datasets, resolve_data_dir
from .types import MCItem, TrainExample

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ANSWER_PREFIX = "the correct answer is "
STYLES = ("llm_adapters", "text")

#: canonical task name -> folder under <data_dir>/commonsense
TASK_FOLDERS: dict[str, str] = {
    "boolq": "boolq",
    "piqa": "piqa",
    "siqa": "social_i_qa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "arc_e": "ARC-Easy",
    "arc_c": "ARC-Challenge",
    "obqa": "openbookqa",
}
COMMONSENSE_TASKS: tuple[str, ...] = tuple(TASK_FOLDERS)
#: splits present in the offline copy (HellaSwag: none; PIQA/SIQA/WinoGrande: test only)
OFFLINE_SPLITS: dict[str, tuple[str, ...]] = {
    "boolq": ("train", "test"),
    "piqa": ("test",),
    "siqa": ("test",),
    "hellaswag": (),
    "winogrande": ("test",),
    "arc_e": ("train", "test"),
    "arc_c": ("train", "test"),
    "obqa": ("train", "test"),
}
_ALIASES = {
    "arc_easy": "arc_e",
    "arc_challenge": "arc_c",
    "social_i_qa": "siqa",
    "social_iqa": "siqa",
    "openbookqa": "obqa",
}
_FORMAT = re.compile(r"\s*Answer format: ([A-Za-z0-9/]+)\s*$")
_PREFIX = re.compile(r"^Please (?:choose|answer) [^:]*?(?:question|sentence): ", re.S)


@dataclass(frozen=True)
class CommonsenseRecord:
    """One parsed LLM-Adapters record."""

    id: str
    task: str
    split: str
    instruction: str
    question: str
    keys: tuple[str, ...]  # answer keys in order, e.g. ("answer1", "answer2", ...)
    options: tuple[str, ...]  # option texts aligned with keys (BoolQ: ("true", "false"))
    answer: str  # the correct key
    output: str  # the training target, "the correct answer is <key>"

    @property
    def gold_index(self) -> int:
        return self.keys.index(self.answer)


def canonical_task(task: str) -> str:
    t = task.strip().lower().replace("-", "_")
    t = _ALIASES.get(t, t)
    if t not in TASK_FOLDERS:
        raise ValueError(f"unknown commonsense task {task!r}; known: {COMMONSENSE_TASKS}")
    return t


def parse_instruction(instruction: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """Split an LLM-Adapters instruction into (question, answer keys, option texts)."""
    m = _FORMAT.search(instruction)
    if not m:
        raise ValueError(f"no 'Answer format:' line in instruction: {instruction[:120]!r}")
    keys = tuple(m.group(1).split("/"))
    body = instruction[: m.start()]
    p = _PREFIX.match(body)
    if not p:
        raise ValueError(f"unrecognised instruction prefix: {instruction[:120]!r}")
    body = body[p.end():]
    if keys == ("true", "false"):
        return body.strip(), keys, keys
    spans = []
    pos = 0
    for key in keys:
        label = key[0].upper() + key[1:]  # answer1 -> Answer1, option2 -> Option2
        hit = re.compile(r"(?:^|(?<=\s))" + re.escape(label) + r": ").search(body, pos)
        if not hit:
            raise ValueError(f"option {label!r} not found in instruction: {instruction[:160]!r}")
        spans.append((hit.start(), hit.end()))
        pos = hit.end()
    question = body[: spans[0][0]].strip()
    options = tuple(
        body[end : (spans[i + 1][0] if i + 1 < len(spans) else len(body))].strip()
        for i, (_, end) in enumerate(spans)
    )
    if not question or any(not o for o in options):
        raise ValueError(f"empty question or option in instruction: {instruction[:160]!r}")
    return question, keys, options


def _to_record(task: str, split: str, index: int, raw: dict) -> CommonsenseRecord:
    question, keys, options = parse_instruction(raw["instruction"])
    answer = str(raw["answer"]).strip()
    if answer not in keys:
        raise ValueError(f"{task}/{split}/{index}: answer {answer!r} not among keys {keys}")
    return CommonsenseRecord(
        id=f"{task}/{split}/{index:05d}",
        task=task,
        split=split,
        instruction=raw["instruction"],
        question=question,
        keys=keys,
        options=options,
        answer=answer,
        output=raw.get("output") or ANSWER_PREFIX + answer,
    )


def _subsample(records: list, limit: int | None, seed: int | None) -> list:
    """First ``limit`` records, or (with ``seed``) a seeded random sample kept in file order."""
    if limit is None or limit >= len(records):
        return records
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if seed is None:
        return records[:limit]
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]


def _unavailable(task: str, split: str) -> DataUnavailableError:
    have = OFFLINE_SPLITS[task]
    hint = (
        "HellaSwag with labels is not available offline"
        if task == "hellaswag"
        else f"the offline copy has only {list(have)} for {task}"
    )
    return DataUnavailableError(
        f"{task}/{split}: {hint}; use source='hub' with network access, or hold out part of an "
        "available split (svd_ray.data.splits.make_split over its item ids)"
    )


def _load_local_raw(root: Path, task: str, split: str, verify: bool) -> list[dict]:
    if split not in OFFLINE_SPLITS[task]:
        raise _unavailable(task, split)
    rel = f"{TASK_FOLDERS[task]}/{split}.json"
    folder = root / "commonsense"
    if verify:
        verify_files(folder, [rel])
    with open(folder / rel, encoding="utf-8") as f:
        return json.load(f)


def _load_hub_raw(task: str, split: str, hub_path: str | None) -> list[dict]:  # pragma: no cover
    datasets = import_datasets()
    if hub_path is not None:  # any hub dataset with LLM-Adapters rows (instruction/output/answer)
        return [dict(r) for r in datasets.load_dataset(hub_path, split=split)]
    if task != "hellaswag":
        raise DataUnavailableError(
            f"source='hub' for {task} needs hub_path=<dataset repo with LLM-Adapters-format rows>"
        )
    # HellaSwag: rebuild the LLM-Adapters record from the original dataset (validation = test).
    rows = datasets.load_dataset("Rowan/hellaswag", split="validation" if split == "test" else split)
    out = []
    for r in rows:
        ctx = f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}".strip()
        endings = " ".join(f"Ending{i + 1}: {e}" for i, e in enumerate(r["endings"]))
        keys = "/".join(f"ending{i + 1}" for i in range(len(r["endings"])))
        answer = f"ending{int(r['label']) + 1}"
        out.append(
            {
                "instruction": "Please choose the correct ending to complete the given sentence: "
                f"{ctx}\n\n{endings}\n\nAnswer format: {keys}",
                "input": "",
                "output": ANSWER_PREFIX + answer,
                "answer": answer,
            }
        )
    return out


def load_commonsense_records(
    task: str,
    split: str = "test",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    seed: int | None = None,
    source: str = "local",
    verify: bool = True,
    hub_path: str | None = None,
) -> list[CommonsenseRecord]:
    """Parsed records of one task/split (ids count positions in the full file before ``limit``)."""
    check_source(source)
    task = canonical_task(task)
    if source == "local":
        raw = _load_local_raw(resolve_data_dir(data_dir), task, split, verify)
    else:
        raw = _load_hub_raw(task, split, hub_path)
    records = [_to_record(task, split, i, r) for i, r in enumerate(raw)]
    return _subsample(records, limit, seed)


# --------------------------------------------------------------------------- formatting
def _text_prompt_and_choices(rec: CommonsenseRecord) -> tuple[str, list[str]]:
    if rec.task == "boolq":
        q = rec.question if rec.question.endswith("?") else rec.question + "?"
        return f"Question: {q}\nAnswer:", [" yes" if k == "true" else " no" for k in rec.keys]
    if rec.task == "winogrande":
        i = rec.question.find("_")
        if i < 0:
            raise ValueError(f"{rec.id}: WinoGrande sentence without a blank")
        prefix, rest = rec.question[:i], rec.question[i + 1 :]
        lead = " " if prefix.endswith(" ") else ""
        prompt = prefix[:-1] if lead else prefix
        if not prompt:
            lead = ""
        return prompt, [f"{lead}{opt}{rest}" for opt in rec.options]
    if rec.task == "hellaswag":  # lm-eval: context "activity: ctx", choices " {ending}"
        return rec.question, [" " + o for o in rec.options]
    return f"Question: {rec.question}\nAnswer:", [" " + o for o in rec.options]


def record_to_mc(rec: CommonsenseRecord, style: str = "llm_adapters") -> MCItem:
    if style == "llm_adapters":
        prompt = ALPACA_TEMPLATE.format(instruction=rec.instruction)
        choices = [ANSWER_PREFIX + k for k in rec.keys]
    elif style == "text":
        prompt, choices = _text_prompt_and_choices(rec)
    else:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    labels = [int(k == rec.answer) for k in rec.keys]
    return MCItem(id=rec.id, prompt=prompt, choices=choices, labels=labels, source=rec.task)


def record_to_train(rec: CommonsenseRecord, style: str = "llm_adapters") -> TrainExample:
    item = record_to_mc(rec, style)
    return TrainExample(prompt=item.prompt, answer=item.choices[rec.gold_index], id=rec.id)


def load_commonsense_mc(
    task: str,
    split: str = "test",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    style: str = "llm_adapters",
    limit: int | None = None,
    seed: int | None = None,
    source: str = "local",
    verify: bool = True,
    hub_path: str | None = None,
) -> list[MCItem]:
    """MC items for one task; ``limit`` (+ ``seed`` for a seeded random subsample)."""
    recs = load_commonsense_records(
        task, split, data_dir, limit=limit, seed=seed, source=source, verify=verify, hub_path=hub_path
    )
    return [record_to_mc(r, style) for r in recs]


def load_commonsense_train(
    task: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    split: str = "train",
    style: str = "llm_adapters",
    limit: int | None = None,
    seed: int | None = None,
    source: str = "local",
    verify: bool = True,
    hub_path: str | None = None,
) -> list[TrainExample]:
    """Warm-start examples (prompt, target) from a task's train split.

    Offline, only ARC-e, ARC-c, BoolQ and OBQA have a train split; PIQA/SIQA/WinoGrande raise
    ``DataUnavailableError`` (hold out part of their test split instead, and evaluate on the rest).
    """
    recs = load_commonsense_records(
        task, split, data_dir, limit=limit, seed=seed, source=source, verify=verify, hub_path=hub_path
    )
    return [record_to_train(r, style) for r in recs]


def load_commonsense_train_mix(
    tasks: Iterable[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    style: str = "llm_adapters",
    limit_per_task: int | None = None,
    seed: int | None = 0,
    verify: bool = True,
) -> list[TrainExample]:
    """Union of offline train splits (default: every task that has one), shuffled with ``seed``.

    Stand-in for LLM-Adapters' commonsense_170k mix, which is not available offline.
    """
    names = [canonical_task(t) for t in tasks] if tasks is not None else [
        t for t in COMMONSENSE_TASKS if "train" in OFFLINE_SPLITS[t]
    ]
    out: list[TrainExample] = []
    for t in names:
        out.extend(
            load_commonsense_train(t, data_dir, style=style, limit=limit_per_task, seed=seed, verify=verify)
        )
    if seed is not None:
        random.Random(seed).shuffle(out)
    return out


__all__ = [
    "ALPACA_TEMPLATE",
    "ANSWER_PREFIX",
    "COMMONSENSE_TASKS",
    "CommonsenseRecord",
    "OFFLINE_SPLITS",
    "STYLES",
    "TASK_FOLDERS",
    "canonical_task",
    "load_commonsense_mc",
    "load_commonsense_records",
    "load_commonsense_train",
    "load_commonsense_train_mix",
    "parse_instruction",
    "record_to_mc",
    "record_to_train",
]
