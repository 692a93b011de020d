"""Shared item types for every benchmark loader.

Conventions (every loader follows them, so scorers never need task-specific code):

* ``prompt`` is the complete text the model conditions on — template, few-shot primer and all.
* Each MC ``choice`` is the continuation text exactly as it is appended to the prompt, including
  its leading space when the template puts one there (``prompt + choice`` is the scored string;
  the log-likelihood of a choice is the sum over the choice's tokens only).
* ``labels[i]`` is 1 when ``choices[i]`` is correct, 0 when incorrect. MC1-style / single-answer
  items have exactly one 1; TruthfulQA MC2-style items may have several.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


def _check_str(name: str, value: Any, *, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not allow_empty and value == "":
        raise ValueError(f"{name} must not be empty")


@dataclass
class MCItem:
    """One multiple-choice question scored by per-choice log-likelihood.

    ``id`` is unique within its ``source`` (e.g. the TruthfulQA question id is shared by the
    ``truthfulqa_mc1`` and ``truthfulqa_mc2`` items of the same question).
    """

    id: str
    prompt: str
    choices: list[str]
    labels: list[int]
    source: str

    def __post_init__(self) -> None:
        _check_str("MCItem.id", self.id)
        _check_str("MCItem.prompt", self.prompt, allow_empty=True)
        _check_str("MCItem.source", self.source)
        self.choices = list(self.choices)
        self.labels = [int(x) for x in self.labels]
        if len(self.choices) < 2:
            raise ValueError(f"MCItem {self.id!r}: needs at least 2 choices, got {len(self.choices)}")
        for i, c in enumerate(self.choices):
            _check_str(f"MCItem {self.id!r} choices[{i}]", c)
        if len(self.labels) != len(self.choices):
            raise ValueError(
                f"MCItem {self.id!r}: {len(self.labels)} labels for {len(self.choices)} choices"
            )
        if any(x not in (0, 1) for x in self.labels):
            raise ValueError(f"MCItem {self.id!r}: labels must be 0/1, got {self.labels}")
        if not any(self.labels):
            raise ValueError(f"MCItem {self.id!r}: no correct choice (all labels are 0)")

    @property
    def gold_index(self) -> int:
        """Index of the correct choice; only defined when exactly one label is 1."""
        if sum(self.labels) != 1:
            raise ValueError(f"MCItem {self.id!r} has {sum(self.labels)} correct choices")
        return self.labels.index(1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenItem:
    """One open-ended generation question.

    ``references`` are correct answers, ``negatives`` incorrect ones (TruthfulQA's BLEU/ROUGE
    "diff" metrics compare a generation against both sets). ``negatives`` may be empty for tasks
    that only have correct references.
    """

    id: str
    prompt: str
    references: list[str]
    negatives: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        _check_str("GenItem.id", self.id)
        _check_str("GenItem.prompt", self.prompt, allow_empty=True)
        self.references = list(self.references)
        self.negatives = list(self.negatives)
        if not self.references:
            raise ValueError(f"GenItem {self.id!r}: needs at least one reference")
        for i, r in enumerate(self.references):
            _check_str(f"GenItem {self.id!r} references[{i}]", r)
        for i, r in enumerate(self.negatives):
            _check_str(f"GenItem {self.id!r} negatives[{i}]", r)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainExample:
    """One supervised example for the warm-start (and for μ calibration by teacher forcing).

    The training text is ``prompt + answer``; by default the loss covers the answer tokens only.
    ``answer`` carries its own leading space when the template needs one. ``id`` (optional)
    names the source item, so manifests can prove train/calibration/eval do not overlap.
    """

    prompt: str
    answer: str
    id: str = ""

    def __post_init__(self) -> None:
        _check_str("TrainExample.prompt", self.prompt, allow_empty=True)
        _check_str("TrainExample.answer", self.answer)
        _check_str("TrainExample.id", self.id, allow_empty=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
