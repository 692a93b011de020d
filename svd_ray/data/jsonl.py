"""Users' own tasks as JSON Lines (one JSON object per line; blank lines are skipped).

Multiple choice (``load_jsonl_mc``)::

    {"id": "q1", "prompt": "Q: 2 + 2 = ?\\nA:", "choices": [" 4", " 5"], "label": 0}
    {"id": "q2", "prompt": "...", "choices": [" a", " b", " c"], "labels": [1, 0, 1]}

Generation / training (``load_jsonl_gen``, ``load_jsonl_train``)::

    {"id": "g1", "prompt": "Q: Capital of France?\\nA:", "answer": " Paris"}

Rules: ``prompt`` a non-blank string; ``choices`` ≥ 2 distinct non-blank strings; exactly one of
``label`` (0-based int index) or ``labels`` (0/1 per choice, at least one 1); ``answer`` a
non-empty string. Generation lines may add ``references`` (more correct answers) and
``negatives`` (incorrect answers). ``id`` is optional (default ``"<file stem>-<line number>"``)
but must be unique; ``source`` is optional (default the file stem). Other keys are ignored.
Texts are used verbatim: ``prompt + choice`` / ``prompt + answer`` is what the model sees, so put
the separating space at the start of the choice/answer (``" Paris"``) unless the prompt ends
with whitespace. Every error names the file, line number and field, and a file is checked whole:
all its errors are reported at once (the first ``MAX_REPORTED`` of them, then a count).

Duplicate options (the same text twice, common in converted benchmarks) are an error by default:
identical texts get identical scores, so the item cannot be ranked. ``duplicates="merge"`` keeps the
first copy of each text when all copies carry the same label (a duplicate correct answer stays
correct) and still refuses copies whose labels disagree (``data.jsonl_duplicates: merge``).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .types import GenItem, MCItem, TrainExample


MAX_REPORTED = 50


class JSONLFormatError(ValueError):
    """A line of a user task file does not follow the documented format."""

    def __init__(self, path: Path, lineno: int, field: str | None, message: str):
        where = f"{path}:{lineno}" + (f": field {field!r}" if field else "")
        super().__init__(f"{where}: {message}")
        self.path, self.lineno, self.field = path, lineno, field
        self.errors = [self]


class JSONLFileErrors(JSONLFormatError):
    """Every format error of one file (``errors``), reported together; ``lineno``/``field`` are the first's."""

    def __init__(self, errors: list[JSONLFormatError]):
        first = errors[0]
        shown = [str(e) for e in errors[:MAX_REPORTED]]
        more = len(errors) - len(shown)
        head = f"{first.path}: {len(errors)} format error{'s' if len(errors) != 1 else ''} (docs/DATA.md §6)"
        ValueError.__init__(self, "\n".join([head, *shown] + ([f"... and {more} more"] if more else [])))
        self.path, self.lineno, self.field, self.errors = first.path, first.lineno, first.field, errors


def _lines(path: Path, errors: list[JSONLFormatError]) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                errors.append(JSONLFormatError(path, lineno, None, f"invalid JSON ({err.msg})"))
                continue
            if not isinstance(obj, dict):
                errors.append(JSONLFormatError(path, lineno, None, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            yield lineno, obj


def _load(path: Path, parse_line) -> list:
    """Parse every line, collecting errors; raise them all together at the end."""
    errors: list[JSONLFormatError] = []
    out = []
    for lineno, obj in _lines(path, errors):
        try:
            out.append(parse_line(lineno, obj))
        except JSONLFormatError as err:
            errors.append(err)
    if errors:
        raise JSONLFileErrors(errors)
    return out


def _string(path: Path, lineno: int, obj: dict, key: str, *, required: bool = True) -> str | None:
    if key not in obj:
        if required:
            raise JSONLFormatError(path, lineno, key, "missing")
        return None
    v = obj[key]
    if not isinstance(v, str):
        raise JSONLFormatError(path, lineno, key, f"must be a string, got {type(v).__name__}")
    if not v.strip():
        raise JSONLFormatError(path, lineno, key, "must not be empty or only whitespace")
    return v


def _string_list(path: Path, lineno: int, obj: dict, key: str, *, min_len: int) -> list[str]:
    v = obj.get(key, [])
    if not isinstance(v, list):
        raise JSONLFormatError(path, lineno, key, f"must be a list of strings, got {type(v).__name__}")
    if len(v) < min_len:
        raise JSONLFormatError(path, lineno, key, f"needs at least {min_len} entries, got {len(v)}")
    for i, s in enumerate(v):
        if not isinstance(s, str) or not s.strip():
            raise JSONLFormatError(path, lineno, f"{key}[{i}]", "must be a non-empty string (not only whitespace)")
    return v


class _Ids:
    def __init__(self, path: Path):
        self.path, self.seen = path, {}

    def take(self, lineno: int, obj: dict) -> str:
        if "id" in obj:
            v = obj["id"]
            if isinstance(v, bool) or not isinstance(v, (str, int)) or (isinstance(v, str) and not v):
                raise JSONLFormatError(self.path, lineno, "id", "must be a non-empty string or an integer")
            item_id = str(v)
        else:
            item_id = f"{self.path.stem}-{lineno}"
        if item_id in self.seen:
            raise JSONLFormatError(
                self.path, lineno, "id", f"duplicate id {item_id!r} (first on line {self.seen[item_id]})"
            )
        self.seen[item_id] = lineno
        return item_id


def _labels(path: Path, lineno: int, obj: dict, n: int) -> list[int]:
    has_label, has_labels = "label" in obj, "labels" in obj
    if has_label == has_labels:
        raise JSONLFormatError(path, lineno, "label", "give exactly one of 'label' (index) or 'labels' (0/1 list)")
    if has_label:
        v = obj["label"]
        if isinstance(v, bool) or not isinstance(v, int):
            raise JSONLFormatError(path, lineno, "label", f"must be an integer index, got {v!r}")
        if not 0 <= v < n:
            raise JSONLFormatError(path, lineno, "label", f"index {v} out of range for {n} choices")
        return [int(i == v) for i in range(n)]
    v = obj["labels"]
    if not isinstance(v, list) or len(v) != n:
        raise JSONLFormatError(path, lineno, "labels", f"must be a list of {n} values (one per choice)")
    if any(isinstance(x, bool) or x not in (0, 1) for x in v):
        raise JSONLFormatError(path, lineno, "labels", f"values must be 0 or 1, got {v}")
    if not any(v):
        raise JSONLFormatError(path, lineno, "labels", "at least one choice must be correct (1)")
    return [int(x) for x in v]


def _dedupe(path: Path, lineno: int, choices: list[str], labels: list[int], duplicates: str) -> tuple[list[str], list[int]]:
    first: dict[str, int] = {}
    for i, c in enumerate(choices):
        if c in first:
            j = first[c]
            if duplicates != "merge":
                raise JSONLFormatError(
                    path, lineno, "choices",
                    f"choices must be distinct: choices[{j}] and choices[{i}] are both {c!r} (identical texts score "
                    "identically; remove one, or set data.jsonl_duplicates: merge to keep the first copy)",
                )
            if labels[i] != labels[j]:
                raise JSONLFormatError(
                    path, lineno, "labels",
                    f"choices[{j}] and choices[{i}] are both {c!r} but one is marked correct and one is not",
                )
        else:
            first[c] = i
    keep = sorted(first.values())
    if len(keep) < 2:
        raise JSONLFormatError(path, lineno, "choices", "fewer than 2 distinct choices")
    return [choices[i] for i in keep], [labels[i] for i in keep]


def load_jsonl_mc(path: str | os.PathLike[str], *, duplicates: str = "error") -> list[MCItem]:
    """Multiple-choice items; ``duplicates``: ``"error"`` (default) or ``"merge"`` (see the module docstring)."""
    if duplicates not in ("error", "merge"):
        raise ValueError(f"duplicates must be 'error' or 'merge', got {duplicates!r}")
    path = Path(path)
    ids = _Ids(path)

    def parse(lineno: int, obj: dict) -> MCItem:
        item_id = ids.take(lineno, obj)
        prompt = _string(path, lineno, obj, "prompt")
        if "choices" not in obj:
            raise JSONLFormatError(path, lineno, "choices", "missing")
        choices = _string_list(path, lineno, obj, "choices", min_len=2)
        labels = _labels(path, lineno, obj, len(choices))
        choices, labels = _dedupe(path, lineno, choices, labels, duplicates)
        source = _string(path, lineno, obj, "source", required=False) or path.stem
        return MCItem(id=item_id, prompt=prompt, choices=choices, labels=labels, source=source)

    return _load(path, parse)


def load_jsonl_gen(path: str | os.PathLike[str]) -> list[GenItem]:
    path = Path(path)
    ids = _Ids(path)

    def parse(lineno: int, obj: dict) -> GenItem:
        item_id = ids.take(lineno, obj)
        prompt = _string(path, lineno, obj, "prompt")
        answer = _string(path, lineno, obj, "answer")
        extra = _string_list(path, lineno, obj, "references", min_len=0)
        negatives = _string_list(path, lineno, obj, "negatives", min_len=0)
        refs = list(dict.fromkeys([answer, *extra]))
        source = _string(path, lineno, obj, "source", required=False) or path.stem
        return GenItem(id=item_id, prompt=prompt, references=refs, negatives=negatives, source=source)

    return _load(path, parse)


def load_jsonl_train(path: str | os.PathLike[str]) -> list[TrainExample]:
    path = Path(path)
    ids = _Ids(path)

    def parse(lineno: int, obj: dict) -> TrainExample:
        item_id = ids.take(lineno, obj)
        prompt = _string(path, lineno, obj, "prompt")
        answer = _string(path, lineno, obj, "answer")
        return TrainExample(prompt=prompt, answer=answer, id=item_id)

    return _load(path, parse)


def write_jsonl(path: str | os.PathLike[str], items: list[MCItem] | list[GenItem] | list[TrainExample]) -> None:
    """Write items back in the documented format (MC: ``labels``; gen/train: ``answer``)."""
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            if isinstance(it, MCItem):
                obj = {"id": it.id, "prompt": it.prompt, "choices": it.choices, "labels": it.labels, "source": it.source}
            elif isinstance(it, GenItem):
                obj = {"id": it.id, "prompt": it.prompt, "answer": it.references[0],
                       "references": it.references[1:], "negatives": it.negatives}
                if it.source:
                    obj["source"] = it.source
            elif isinstance(it, TrainExample):
                obj = {"id": it.id, "prompt": it.prompt, "answer": it.answer}
                if not it.id:
                    del obj["id"]
            else:
                raise TypeError(f"cannot write {type(it).__name__}")
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
