"""Validation of task names, version names and bundle-relative file paths.

Task names and version names become path components (``tasks/<task>/<version>/``) on every backend, so
they are restricted to a small, documented ASCII charset:

* ``[A-Za-z0-9._-]``, 1 to 64 characters (versions: 1 to 96),
* the first character is a letter or digit (so ``.``, ``..``, ``_promoted`` and hidden names are impossible),
* no slashes, backslashes, whitespace, control characters or non-ASCII (no homoglyph / bidi tricks).

The version names ``latest`` and ``promoted`` are reserved aliases.
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timezone

from .errors import InvalidNameError

__all__ = [
    "TASK_NAME_MAX",
    "VERSION_MAX",
    "RESERVED_VERSIONS",
    "validate_task_name",
    "validate_version",
    "validate_relpath",
    "new_version",
]

TASK_NAME_MAX = 64
VERSION_MAX = 96
RESERVED_VERSIONS = frozenset({"latest", "promoted"})
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)
_CHARSET_DOC = "letters, digits, '.', '_' and '-', starting with a letter or digit"


def _check(kind: str, name: object, max_len: int) -> str:
    if not isinstance(name, str):
        raise InvalidNameError(f"{kind} must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidNameError(f"{kind} must not be empty")
    if len(name) > max_len:
        raise InvalidNameError(f"{kind} {name[:20]!r}... is {len(name)} characters long (max {max_len})")
    if not _NAME_RE.fullmatch(name):
        raise InvalidNameError(f"invalid {kind} {name!r}: use only ASCII {_CHARSET_DOC} (max {max_len} chars)")
    return name


def validate_task_name(name: str) -> str:
    """Return ``name`` if it is a valid task name, else raise :class:`InvalidNameError`."""
    return _check("task name", name, TASK_NAME_MAX)


def validate_version(version: str, *, allow_alias: bool = False) -> str:
    """Return ``version`` if valid; ``latest``/``promoted`` are accepted only when ``allow_alias``."""
    if allow_alias and version in RESERVED_VERSIONS:
        return version
    _check("version", version, VERSION_MAX)
    if version in RESERVED_VERSIONS:
        raise InvalidNameError(f"version name {version!r} is reserved")
    return version


def validate_relpath(path: str) -> str:
    """Validate a bundle-relative file path (``/``-separated, no ``..``, no absolute, no control chars)."""
    if not isinstance(path, str) or not path:
        raise InvalidNameError("bundle file path must be a non-empty string")
    if path.startswith("/") or "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise InvalidNameError(f"invalid bundle file path {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidNameError(f"invalid bundle file path {path!r} (empty, '.' or '..' component)")
    if len(path.encode()) > 512:
        raise InvalidNameError(f"bundle file path {path[:40]!r}... is too long (max 512 bytes)")
    return path


def new_version(now: datetime | None = None) -> str:
    """A fresh, lexicographically sortable version: ``YYYYMMDDTHHMMSSffffffZ-<6 hex>`` (UTC)."""
    now = now or datetime.now(timezone.utc)
    return now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)
