"""A tiny built-in task for the quickstart demo: single-digit addition, made here, no download.

Every pair ``(a, b)`` with ``0 <= a, b <= max_operand`` (100 problems by default) is one item:

* prompt ``"Q: {a} + {b} = ?\\nA:"``, answer ``" {a + b}"`` (``TrainExample`` for warm-start and
  μ calibration by teacher forcing);
* ``MCItem``: the correct sum plus ``n_distractors`` nearby wrong sums (within ±3, never
  negative), in a seeded order, each choice ``" {n}"``;
* ``GenItem``: reference ``"{a + b}"``, negatives = the distractors (score with
  ``svd_ray.eval.metrics.exact_match``).

Ids ``"add-{a}-{b}"`` are split by ``make_split`` (default train 0.5 / calibration 0.2 /
eval 0.3 → 50 / 20 / 30). Small base models get some sums right zero-shot and more after a
brief warm-start, which is what the demo needs to show.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .splits import SplitRecord, make_split
from .types import GenItem, MCItem, TrainExample

NAME = "builtin_addition"
DEFAULT_FRACTIONS = {"train": 0.5, "calibration": 0.2, "eval": 0.3}


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    split: SplitRecord
    examples: dict[str, list[TrainExample]]
    mc: dict[str, list[MCItem]]
    gen: dict[str, list[GenItem]]


def _problem_id(a: int, b: int) -> str:
    return f"add-{a}-{b}"


def _prompt(a: int, b: int) -> str:
    return f"Q: {a} + {b} = ?\nA:"


def _distractors(a: int, b: int, n: int, seed: int) -> list[int]:
    s = a + b
    candidates = [v for v in range(s - 3, s + 4) if v != s and v >= 0]
    if n > len(candidates):
        raise ValueError(f"n_distractors must be <= {len(candidates)} for sum {s}")
    return random.Random(f"{seed}:{_problem_id(a, b)}:d").sample(candidates, n)


def builtin_task(
    seed: int = 0,
    *,
    fractions: dict[str, float] | None = None,
    max_operand: int = 9,
    n_distractors: int = 3,
) -> BuiltinTask:
    """Build the addition task; the same arguments always give the same items and split."""
    if max_operand < 1:
        raise ValueError("max_operand must be >= 1")
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    split = make_split(
        [_problem_id(a, b) for a, b in pairs], fractions or DEFAULT_FRACTIONS, seed=seed,
        dataset=NAME, max_operand=max_operand, n_distractors=n_distractors,
    )
    where = {i: name for name in split.names for i in split[name]}
    examples: dict[str, list[TrainExample]] = {k: [] for k in split.names}
    mc: dict[str, list[MCItem]] = {k: [] for k in split.names}
    gen: dict[str, list[GenItem]] = {k: [] for k in split.names}
    for a, b in pairs:
        pid, prompt, s = _problem_id(a, b), _prompt(a, b), a + b
        part = where[pid]
        wrong = _distractors(a, b, n_distractors, seed)
        options = [s, *wrong]
        random.Random(f"{seed}:{pid}:order").shuffle(options)
        examples[part].append(TrainExample(prompt=prompt, answer=f" {s}", id=pid))
        mc[part].append(
            MCItem(
                id=pid,
                prompt=prompt,
                choices=[f" {v}" for v in options],
                labels=[int(v == s) for v in options],
                source=NAME,
            )
        )
        gen[part].append(
            GenItem(id=pid, prompt=prompt, references=[str(s)], negatives=[str(v) for v in wrong], source=NAME)
        )
    return BuiltinTask(name=NAME, split=split, examples=examples, mc=mc, gen=gen)
