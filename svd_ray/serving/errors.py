"""Errors of the model replica: an HTTP status and a client-safe message (details go to the log only)."""
from __future__ import annotations


class PoolError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message, self.field = message, field

    def to_dict(self) -> dict:
        return {"status": self.status, "type": self.type, "message": self.message, "field": self.field}


class TaskNotFound(PoolError):
    status, type = 404, "not_found"


class TaskUnavailable(PoolError):
    status, type = 503, "unavailable"


class InputError(PoolError):
    status, type = 422, "invalid_request"
