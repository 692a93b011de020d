"""Seeded, deterministic train / calibration / eval splits by item id.

Method (independent of input order, Python version and platform):

1. Order the ids by ``sha256(f"{seed}:{id}")`` (ties, impossible in practice, by id).
2. Split sizes from the fractions by the largest-remainder rule, so they sum to ``n`` exactly:
   ``n_k = floor(f_k · n)``, then the leftover ids go one each to the splits with the largest
   ``f_k · n − n_k`` (earlier split names win ties).
3. Consecutive runs of the ordered ids form the splits, in the order the names are given.

The ``SplitRecord`` stores each split's sorted id list and ``sha256("\\n".join(sorted ids))``,
plus the seed and fractions, and goes into run manifests: anyone can recompute and compare.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.4, "calibration": 0.1, "eval": 0.5}
METHOD = "order by sha256(f'{seed}:{id}'), largest-remainder sizes, contiguous runs"

T = TypeVar("T")


def ids_digest(ids: Iterable[str]) -> str:
    """sha256 hex of the newline-joined *sorted* ids (order-independent fingerprint)."""
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()


def _order_key(seed: int, item_id: str) -> tuple[str, str]:
    return hashlib.sha256(f"{seed}:{item_id}".encode("utf-8")).hexdigest(), item_id


def split_sizes(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder sizes for ``n`` items; they always sum to ``n``."""
    if not fractions:
        raise ValueError("fractions must name at least one split")
    if any((not math.isfinite(f)) or f < 0 for f in fractions.values()):
        raise ValueError(f"fractions must be finite and >= 0, got {dict(fractions)}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-9:
        raise ValueError(f"fractions must sum to 1, got {total} ({dict(fractions)})")
    exact = {k: f * n for k, f in fractions.items()}
    sizes = {k: int(math.floor(v)) for k, v in exact.items()}
    leftover = n - sum(sizes.values())
    names = list(fractions)
    by_remainder = sorted(names, key=lambda k: (-(exact[k] - sizes[k]), names.index(k)))
    for k in by_remainder[:leftover]:
        sizes[k] += 1
    return sizes


@dataclass(frozen=True)
class SplitRecord:
    """A reproducible split: ids per split (sorted), their digests, seed and fractions."""

    seed: int
    fractions: dict[str, float]
    ids: dict[str, list[str]]
    sha256: dict[str, str]
    n_total: int
    method: str = METHOD
    universe_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.ids)

    def __getitem__(self, name: str) -> list[str]:
        return self.ids[name]

    def split_of(self, item_id: str) -> str:
        for name, ids in self.ids.items():
            if item_id in set(ids):
                return name
        raise KeyError(f"id {item_id!r} is in no split")

    def select(self, items: Sequence[T], name: str, *, key: str = "id") -> list[T]:
        """Items (anything with an ``id`` attribute) that belong to split ``name``, in input order."""
        wanted = set(self.ids[name])
        return [it for it in items if getattr(it, key) in wanted]

    def check(self) -> None:
        """Raise if splits overlap, or ids / digests / total do not match."""
        seen: dict[str, str] = {}
        for name, ids in self.ids.items():
            for i in ids:
                if i in seen:
                    raise ValueError(f"id {i!r} is in both {seen[i]!r} and {name!r}")
                seen[i] = name
            if ids_digest(ids) != self.sha256[name]:
                raise ValueError(f"split {name!r}: id list does not match its sha256")
        if len(seen) != self.n_total:
            raise ValueError(f"splits hold {len(seen)} ids, record says {self.n_total}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "fractions": dict(self.fractions),
            "method": self.method,
            "n_total": self.n_total,
            "universe_sha256": self.universe_sha256,
            "sizes": {k: len(v) for k, v in self.ids.items()},
            "sha256": dict(self.sha256),
            "ids": {k: list(v) for k, v in self.ids.items()},
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SplitRecord":
        rec = cls(
            seed=int(d["seed"]),
            fractions=dict(d["fractions"]),
            ids={k: list(v) for k, v in d["ids"].items()},
            sha256=dict(d["sha256"]),
            n_total=int(d["n_total"]),
            method=d.get("method", METHOD),
            universe_sha256=d.get("universe_sha256", ""),
            extra=dict(d.get("extra", {})),
        )
        rec.check()
        return rec


def make_split(
    ids: Iterable[str],
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
    **extra: Any,
) -> SplitRecord:
    """Split ``ids`` (unique strings) into named parts; same ids + fractions + seed → same split."""
    id_list = [str(i) for i in ids]
    if len(set(id_list)) != len(id_list):
        dup = sorted({i for i in id_list if id_list.count(i) > 1})[:5]
        raise ValueError(f"ids must be unique; duplicates include {dup}")
    fr = dict(DEFAULT_FRACTIONS if fractions is None else fractions)
    sizes = split_sizes(len(id_list), fr)
    ordered = sorted(id_list, key=lambda i: _order_key(seed, i))
    parts: dict[str, list[str]] = {}
    start = 0
    for name in fr:
        parts[name] = sorted(ordered[start : start + sizes[name]])
        start += sizes[name]
    rec = SplitRecord(
        seed=int(seed),
        fractions=fr,
        ids=parts,
        sha256={k: ids_digest(v) for k, v in parts.items()},
        n_total=len(id_list),
        universe_sha256=ids_digest(id_list),
        extra=dict(extra),
    )
    rec.check()
    return rec
