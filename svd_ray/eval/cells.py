"""Resumable evaluation cells: one (task family × model × PEFT method) run's scored rows on disk.

A long reproduction (hours on 2 cores) must survive interruptions. Each cell keeps, under
``<cells_dir>/<run_id>-<scoring hash>/``:

    cell.json     the trained bundle's identity (version, content digest) and its μ̄/training record
    rows.jsonl    one scored multiple-choice item per line, appended chunk by chunk (flushed + fsynced)
    lr_search.json  the warm-start lr search's record (when the run searches one), saved before training
    gens.jsonl    one generation per line (TruthfulQA generation)

The directory name is the run id (which ends in a hash of every setting that changes the trained bundle)
plus a hash of every setting that changes scoring, so a changed config never reuses stale rows. Rows
scored for a different bundle (digest mismatch: e.g. the store was rebuilt with other code) are discarded.
A truncated last line (a kill mid-write) is ignored and rescored.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SCORING_VERSION = 2  # bump when the rows' contents change meaning (variants, scoring rules)


def bundle_digest(manifest) -> str:
    """sha256 over the bundle's (path, sha256) file list: equal bundles have equal digests."""
    listing = sorted((f.path, f.sha256) for f in manifest.files)
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def scoring_key(settings: dict) -> str:
    body = json.dumps({"v": SCORING_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:8]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line from an interrupted write
            break
    return out


class CellCache:
    """The on-disk state of one cell (see the module docstring)."""

    def __init__(self, root: Path, run_id: str, settings: dict):
        self.dir = Path(root) / f"{run_id}-{scoring_key(settings)}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta_path, self.rows_path, self.gens_path = (self.dir / n for n in ("cell.json", "rows.jsonl", "gens.jsonl"))
        self.lr_search_path = self.dir / "lr_search.json"

    # ---------------------------------------------------------------- the trained bundle's record
    def meta(self) -> dict | None:
        if not self.meta_path.is_file():
            return None
        try:
            return json.loads(self.meta_path.read_text())
        except json.JSONDecodeError:
            return None

    def bind(self, meta: dict) -> None:
        """Record the bundle these rows are scored with; rows of another bundle are dropped."""
        self.dir.mkdir(parents=True, exist_ok=True)
        old = self.meta()
        if old is not None and old.get("digest") != meta["digest"]:
            for path in (self.rows_path, self.gens_path):
                path.unlink(missing_ok=True)
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp, self.meta_path)

    # ---------------------------------------------------------------- the warm-start lr search
    def lr_search(self, search_config: dict) -> dict | None:
        """The search record saved for exactly this search config, or None (so an interrupted cell does not
        repeat its Ray Tune trials: the trials are deterministic, and slow on a big model)."""
        try:
            saved = json.loads(self.lr_search_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return saved["record"] if saved.get("config") == search_config else None

    def save_lr_search(self, search_config: dict, record: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)  # writes never assume the folder survived a long step
        tmp = self.lr_search_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": search_config, "record": record}, indent=1, sort_keys=True))
        os.replace(tmp, self.lr_search_path)

    # ---------------------------------------------------------------- rows
    def rows(self) -> dict[tuple, dict]:
        return {(r["source"], r["id"]): r for r in _read_jsonl(self.rows_path)}

    def gens(self) -> dict[tuple, dict]:
        return {(g["id"], g["mode"]): g for g in _read_jsonl(self.gens_path)}

    def _append(self, path: Path, records: list[dict]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._heal(path)
        with path.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def _heal(path: Path) -> None:
        """Drop a torn last line so appends start on a line boundary."""
        if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            data = path.read_bytes()
            path.write_bytes(data[: data.rfind(b"\n") + 1])

    def add_rows(self, rows: list[dict]) -> None:
        self._append(self.rows_path, rows)

    def add_gens(self, gens: list[dict]) -> None:
        self._append(self.gens_path, gens)
