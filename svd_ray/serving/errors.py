"""Errors of the model replica: an HTTP status and a client-safe message (details go to the log only)."""
from __future__ import annotations


class PoolError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, field: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.message, self.field, self.retry_after_s = message, field, retry_after_s

    def to_dict(self) -> dict:
        out = {"status": self.status, "type": self.type, "message": self.message, "field": self.field}
        if self.retry_after_s is not None:  # the ingress turns it into a Retry-After header
            out["retry_after_s"] = self.retry_after_s
        return out


class TaskNotFound(PoolError):
    status, type = 404, "not_found"


class TaskUnavailable(PoolError):
    status, type = 503, "unavailable"


class InputError(PoolError):
    status, type = 422, "invalid_request"
