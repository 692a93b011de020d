"""Typed requests, events and handles of the batching engine (no model code, no Ray).

The serving layer builds a ``GenerateRequest`` / ``ScoreRequest`` straight from the validated HTTP body
(token ids already encoded once), submits it, and reads ``Event``s from the ``RequestHandle``:

    token  {index, text, token_id}          a releasable piece of prompt ``index``'s continuation
    end    {index, finish_reason}           prompt ``index`` finished ("eos" | "length" | "stop")
    done   {result}                         the whole result; the last event
    error  {error}                          an ``EngineError``; the last event
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from svd_ray.decoding.config import GenerationConfig, SteeringConfig


class EngineError(Exception):
    """A request failure with an HTTP status and a client-safe message naming the field at fault."""

    status, type = 500, "internal_error"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message, self.field = message, field

    def to_dict(self) -> dict:
        return {"status": self.status, "type": self.type, "message": self.message, "field": self.field}


class RequestTooLarge(EngineError):
    status, type = 413, "request_too_large"


class InvalidRequest(EngineError):
    status, type = 422, "invalid_request"


class Cancelled(EngineError):
    status, type = 499, "cancelled"


class DeadlineExceeded(EngineError):
    status, type = 504, "timeout"


class EngineStopped(EngineError):
    status, type = 503, "unavailable"


@dataclass(frozen=True)
class Adapter:
    """A task registered on an engine: its slot in the adapter bank and its steering defaults."""

    key: str
    slot: int
    method: str
    num_virtual: int
    mean_delta: torch.Tensor | None = field(default=None, repr=False, compare=False)


@dataclass
class GenerateRequest:
    adapter: Adapter
    prompts: list[list[int]]  # token ids, one list per prompt
    gen: GenerationConfig
    steering: SteeringConfig
    tenant: str = "default"
    deadline: float | None = None  # time.monotonic() after which the work stops
    # record the log-probability of every chosen token (EOS and a stop string's last token included) and the
    # ``logprobs`` most likely alternatives, under the steered distribution with this mask policy
    logprobs: int | None = None
    outside_mask: str = "unmasked"
    # each prompt is decoded this many times (OpenAI's ``n``): prompt i's copy j is sequence i·copies + j and,
    # when sampling with a seed, uses seed + i·copies + j
    copies: int = 1

    def sequences(self) -> int:
        return len(self.prompts) * max(1, self.copies)

    def rows(self) -> int:
        return self.sequences() * max(1, self.gen.num_beams) * (2 if self.steering.needs_base else 1)

    def kv_tokens(self) -> int:
        longest = max(len(p) for p in self.prompts)
        return self.rows() * (self.adapter.num_virtual + longest + self.gen.max_new_tokens)


@dataclass
class ScoreRequest:
    adapter: Adapter
    prompt: list[int]
    choices: list[list[int]]
    steering: SteeringConfig
    outside_mask: str = "unmasked"
    tenant: str = "default"
    deadline: float | None = None
    top_logprobs: int = 0  # > 0: also keep this many most likely tokens at every scored position

    def branches(self) -> int:
        return 2  # scores always report the base log-likelihood too

    def kv_tokens(self, max_rows: int) -> int:
        group = max(1, max_rows // self.branches())
        rows = self.branches() * min(group, len(self.choices))
        return rows * (self.adapter.num_virtual + len(self.prompt) + max(len(c) for c in self.choices))


@dataclass
class Event:
    kind: str  # token | end | done | error
    index: int = 0
    text: str = ""
    token_id: int | None = None
    finish_reason: str | None = None
    num_tokens: int = 0
    result: object = None
    error: EngineError | None = None


class RequestHandle:
    """What ``Engine.submit`` returns: the event stream of one request, and its cancel switch."""

    def __init__(self, request, wake=lambda: None):
        self.request = request
        self.events: queue.Queue[Event] = queue.Queue()
        self._cancel = threading.Event()
        self._wake = wake
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished = threading.Event()

    def cancel(self) -> None:
        """Stop the work (rows leave the batch at the next token boundary); the handle ends with ``Cancelled``."""
        self._cancel.set()
        self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self):
        while True:
            ev = self.events.get()
            yield ev
            if ev.kind in ("done", "error"):
                return

    def result(self, timeout: float | None = None):
        """Block until the request ends; its result, or raise its ``EngineError``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                raise TimeoutError("request did not finish in time") from None
            if ev.kind == "done":
                return ev.result
            if ev.kind == "error":
                raise ev.error
