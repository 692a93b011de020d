"""Exception hierarchy of the task bundle store.

Every error the store raises on purpose is a :class:`StoreError`, so callers (and the CLI) can catch one
type and print ``str(err)``, which is always a single, self-explanatory line::

    StoreError
    ├── InvalidNameError      (also a ValueError)   bad task/version name or bundle path
    ├── NotFoundError         (also a LookupError)  no such task/version/pointer
    │   └── DeletedError                            the version was deleted: a tombstone holds its name
    ├── ConflictError                               a create-once object exists (the version is taken)
    ├── IntegrityError                              stored bytes fail their size/sha256 check
    ├── MismatchError                               bundle trained for another base model/tokenizer
    └── StoreUnavailable                            the storage backend cannot be reached right now

A server maps :class:`NotFoundError` (and so :class:`DeletedError`) to 404 and :class:`StoreUnavailable` to
503 with ``Retry-After: <retry_after_s>``. Everything else is a permanent error for the request.
"""

from __future__ import annotations

__all__ = [
    "StoreError",
    "InvalidNameError",
    "NotFoundError",
    "DeletedError",
    "ConflictError",
    "IntegrityError",
    "MismatchError",
    "StoreUnavailable",
    "DEFAULT_RETRY_AFTER_S",
]

#: Suggested wait before retrying after :class:`StoreUnavailable` (a server's ``Retry-After``).
DEFAULT_RETRY_AFTER_S = 5


class StoreError(Exception):
    """Base class of all task-store errors (bad URI, bad input, backend failure, ...)."""


class InvalidNameError(StoreError, ValueError):
    """A task name, version name or bundle file path is not allowed (see ``svd_ray.store.names``)."""


class NotFoundError(StoreError, LookupError):
    """The task, version or promoted pointer does not exist (or is not complete)."""


class DeletedError(NotFoundError):
    """The version was deleted: its tombstone keeps the name, so it cannot be fetched, promoted or published
    again. A subclass of :class:`NotFoundError`, so code that treats "missing" as 404 needs no change."""


class ConflictError(StoreError):
    """A create-once object already exists: the version was published (or deleted) by someone else."""


class IntegrityError(StoreError):
    """Stored bytes do not match their recorded size/sha256: corrupt, truncated or partial bundle."""


class MismatchError(StoreError):
    """The bundle is intact but was trained for a different base model / tokenizer than expected."""


class StoreUnavailable(StoreError):
    """The storage backend cannot be reached or is failing right now: connection refused or reset, a timeout
    (after the client's bounded retries), an HTTP 5xx / throttling answer, or a local I/O error such as a
    vanished network mount. Transient by nature: retry after :attr:`retry_after_s` seconds. Nothing about the
    request itself is wrong, so a server answers 503 with ``Retry-After`` rather than 4xx/500."""

    def __init__(self, message: str, *, retry_after_s: int = DEFAULT_RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = int(retry_after_s)
