"""Exception hierarchy of the task bundle store.

Every error the store raises on purpose is a :class:`StoreError`, so callers (and the CLI) can catch one
type and print ``str(err)``, which is always a single, self-explanatory line.
"""

from __future__ import annotations

__all__ = [
    "StoreError",
    "InvalidNameError",
    "NotFoundError",
    "ConflictError",
    "IntegrityError",
    "MismatchError",
]


class StoreError(Exception):
    """Base class of all task-store errors (bad URI, unreachable backend, ...)."""


class InvalidNameError(StoreError, ValueError):
    """A task name, version name or bundle file path is not allowed (see ``svd_ray.store.names``)."""


class NotFoundError(StoreError, LookupError):
    """The task, version or promoted pointer does not exist (or is not complete)."""


class ConflictError(StoreError):
    """A create-once object already exists: the version was published by someone else."""


class IntegrityError(StoreError):
    """Stored bytes do not match their recorded size/sha256: corrupt, truncated or partial bundle."""


class MismatchError(StoreError):
    """The bundle is intact but was trained for a different base model / tokenizer than expected."""
