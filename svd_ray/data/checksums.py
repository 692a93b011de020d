"""Verify dataset files against a ``SHA256SUMS`` file before loading them.

``SHA256SUMS`` uses ``sha256sum`` output format, one file per line::

    <64 hex digits><two spaces or " *"><relative path>

Paths may start with ``./``; they are relative to the folder holding ``SHA256SUMS``.
Any problem (no SHA256SUMS, file not listed, file missing, digest mismatch) raises a
``ChecksumError`` whose message names the file.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_CHUNK = 1 << 20
# (resolved path, size, mtime_ns) -> sha256 hex; avoids re-hashing unchanged files in one process.
_DIGEST_CACHE: dict[tuple[str, int, int], str] = {}


class ChecksumError(RuntimeError):
    """A data file failed verification against its SHA256SUMS entry."""


def _normalise(rel: str) -> str:
    rel = rel.strip().replace("\\", "/")
    while rel.startswith("./"):
        rel = rel[2:]
    return rel


def parse_sha256sums(sums_file: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a SHA256SUMS file into ``{relative path: lowercase hex digest}``."""
    sums_file = Path(sums_file)
    if not sums_file.is_file():
        raise ChecksumError(f"checksum file {sums_file} not found")
    out: dict[str, str] = {}
    for lineno, line in enumerate(sums_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE.match(line.rstrip("\r\n"))
        if not m:
            raise ChecksumError(f"{sums_file}:{lineno}: not a sha256sum line: {line!r}")
        out[_normalise(m.group(2))] = m.group(1).lower()
    return out


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file (cached per path/size/mtime within the process)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    cached = _DIGEST_CACHE.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    digest = h.hexdigest()
    _DIGEST_CACHE[key] = digest
    return digest


def verify_files(dataset_dir: str | os.PathLike[str], relpaths: list[str] | None = None) -> dict[str, str]:
    """Check files under ``dataset_dir`` against ``dataset_dir/SHA256SUMS``.

    ``relpaths`` = the files to check (relative to ``dataset_dir``); ``None`` checks every
    listed file. Returns ``{relative path: digest}`` of the verified files.
    """
    dataset_dir = Path(dataset_dir)
    sums = parse_sha256sums(dataset_dir / "SHA256SUMS")
    wanted = list(sums) if relpaths is None else [_normalise(r) for r in relpaths]
    verified: dict[str, str] = {}
    for rel in wanted:
        path = dataset_dir / rel
        if rel not in sums:
            raise ChecksumError(f"{path}: not listed in {dataset_dir / 'SHA256SUMS'}")
        if not path.is_file():
            raise ChecksumError(f"{path}: listed in SHA256SUMS but the file is missing")
        actual = sha256_file(path)
        if actual != sums[rel]:
            raise ChecksumError(
                f"{path}: SHA-256 mismatch (expected {sums[rel]}, got {actual}); "
                "the file is corrupted or was modified"
            )
        verified[rel] = actual
    return verified
