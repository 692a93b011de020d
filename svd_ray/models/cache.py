"""First-use cache entries (converted models, assembled files): built once, trusted only when whole.

Any number of processes may ask for the same entry at once — Ray Train workers, evaluation shards,
Serve replicas, several runs on one node. The rules:

* **One builder.** Building takes an inter-process lock (``filelock``, an ``fcntl`` lock the kernel
  releases when its holder dies, so a crashed builder never wedges the others); whoever gets it second
  re-checks and finds the entry built.
* **Never publish what a load cannot use.** A builder writes into a private temporary folder, the
  entry's own ``check`` must pass on that folder (e.g. config + weights + tokenizer present), and only
  then a manifest ``.svd-ray-entry.json`` (size and sha256 of every file) is written and the folder is
  renamed into place.
* **Trust is checked, not assumed.** An entry is used only if its manifest exists and every file it
  lists is present with its recorded size (cheap: no hashing on the hot path; ``verify(full=True)``
  also re-hashes). Anything else — a folder from an older svd-ray, a half-deleted one, the broken
  tokenizer-only folder that older versions could leave — is reported in one line and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

ENTRY_MANIFEST = ".svd-ray-entry.json"
ENTRY_FORMAT = 1
LOCK_TIMEOUT_S = float(os.environ.get("SVD_RAY_CACHE_LOCK_TIMEOUT_S", 3600))
_CHUNK = 1 << 20


def cache_root() -> Path:
    """``$SVD_RAY_CACHE`` or ``~/.cache/svd-ray``: models, assembled GGUF files, fetched bundles."""
    root = Path(os.environ.get("SVD_RAY_CACHE") or Path.home() / ".cache" / "svd-ray").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _listed_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ENTRY_MANIFEST)


def write_manifest(folder: Path, name: str, source: dict | None = None) -> dict:
    """Record size and sha256 of every file in ``folder`` (called by the builder, before publishing)."""
    manifest = {
        "format": ENTRY_FORMAT,
        "name": name,
        "source": source or {},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                  for p in _listed_files(folder)},
    }
    tmp = folder / (ENTRY_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, folder / ENTRY_MANIFEST)
    return manifest


def read_manifest(folder: Path) -> dict | None:
    try:
        m = json.loads((folder / ENTRY_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == ENTRY_FORMAT and isinstance(m.get("files"), dict) else None


def entry_problems(folder: Path, check: Callable[[Path], list[str]] | None = None, *, full: bool = False) -> list[str]:
    """Why ``folder`` cannot be trusted (empty list: it can).

    Checks the manifest, then every listed file's presence and size (and sha256 with ``full``), then
    the entry kind's own ``check`` (which files a load needs)."""
    if not folder.exists():
        return ["absent"]
    m = read_manifest(folder)
    if m is None:
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        return [f"no valid {ENTRY_MANIFEST} (holds: {', '.join(present) or 'nothing'})"] + (check(folder) if check and folder.is_dir() else [])
    problems = []
    for rel, meta in sorted(m["files"].items()):
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel} missing")
        elif p.stat().st_size != meta.get("size"):
            problems.append(f"{rel} has {p.stat().st_size} bytes, manifest says {meta.get('size')}")
        elif full and sha256_file(p) != meta.get("sha256"):
            problems.append(f"{rel} fails its sha256 check")
    if check is not None and not problems:
        problems += check(folder)
    return problems


def _say(message: str) -> None:
    """One line to stderr (visible in Ray worker logs and CLIs alike). Not also logged: under Ray the
    worker's log handler would forward a second copy of the same line."""
    print(f"svd-ray: {message}", file=sys.stderr, flush=True)


def ensure_entry(
    folder: Path,
    build: Callable[[Path], None],
    *,
    name: str,
    check: Callable[[Path], list[str]] | None = None,
    source: dict | None = None,
) -> Path:
    """Return ``folder`` once it holds a whole entry, building it (once, across processes) if needed.

    ``build(tmp)`` writes the entry's files into the empty folder ``tmp``; ``check(folder)`` lists what a
    load would miss. A build whose output fails ``check`` raises ``RuntimeError`` and publishes nothing.
    """
    folder = Path(folder)
    if not entry_problems(folder, check):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder.parent / f".{folder.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _say(f"waiting for another process that is preparing {name} in {folder}")
        lock.acquire(timeout=LOCK_TIMEOUT_S)
    try:
        problems = entry_problems(folder, check)
        if not problems:  # another process built it while we waited
            return folder
        _cleanup_leftovers(folder)
        if folder.exists():
            _say(f"cache entry {folder} is incomplete ({'; '.join(problems)}): rebuilding it")
        tmp = folder.parent / f".{folder.name}.building-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            t0 = time.perf_counter()
            build(tmp)
            missing = check(tmp) if check else []
            if missing:
                raise RuntimeError(f"building {name} produced an unusable folder ({'; '.join(missing)}); nothing was published")
            write_manifest(tmp, name, source)
            if folder.exists():
                trash = folder.parent / f".{folder.name}.broken-{secrets.token_hex(4)}"
                os.rename(folder, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(tmp, folder)
            log.info("prepared %s in %s (%.1fs)", name, folder, time.perf_counter() - t0)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.release()
    return folder


def _cleanup_leftovers(folder: Path) -> None:
    """Remove temporary folders of builders that died (safe: we hold the entry's lock)."""
    for p in folder.parent.glob(f".{folder.name}.building-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in folder.parent.glob(f".{folder.name}.broken-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in folder.parent.glob(f"{folder.name}.tmp-*"):  # older svd-ray's temporary folders
        shutil.rmtree(p, ignore_errors=True)


def ensure_file(path: Path, build: Callable[[Path], None], *, name: str) -> Path:
    """Single-file variant (e.g. an assembled GGUF): ``build(tmp_path)`` writes the file; the size and sha256
    recorded next to it (``<file>.svd-ray.json``) must match for it to be trusted; replaced atomically."""
    path = Path(path)
    record = path.with_name(path.name + ".svd-ray.json")

    def whole() -> bool:
        try:
            meta = json.loads(record.read_text())
            return path.is_file() and path.stat().st_size == meta["size"]
        except (OSError, ValueError, KeyError, TypeError):
            return False

    if whole():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock"), timeout=LOCK_TIMEOUT_S):
        if whole():
            return path
        if path.exists():
            _say(f"cached file {path} has no valid size record: rebuilding it")
        tmp = path.with_name(f".{path.name}.building-{secrets.token_hex(4)}")
        try:
            build(tmp)
            meta = {"name": name, "size": tmp.stat().st_size, "sha256": sha256_file(tmp)}
            os.replace(tmp, path)
            rec_tmp = record.with_name(record.name + ".tmp")
            rec_tmp.write_text(json.dumps(meta))
            os.replace(rec_tmp, record)
        finally:
            if tmp.exists():
                tmp.unlink()
    return path
