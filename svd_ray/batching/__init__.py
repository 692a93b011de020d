"""The batching engine: continuous batching of steered decoding over many tasks on one base model.

    adapters.py   AdapterBank: per-row LoRA / IA3 / soft prompt / KV prefix on one shared base model
    rows.py       RowBatch: rows with one left-padded KV cache; prefill, extend, step, join, leave
    fused.py      FusedDual: DualModel's interface, adapter on and off in one forward (all four methods)
    requests.py   typed requests, events, handles, errors
    text.py       incremental detokenisation with stop strings
    engine.py     the iteration-level scheduler
"""
from svd_ray.batching.adapters import AdapterBank, UnsupportedAdapter
from svd_ray.batching.engine import Engine, EngineConfig
from svd_ray.batching.fused import FusedDual
from svd_ray.batching.requests import (
    Adapter,
    Cancelled,
    DeadlineExceeded,
    EngineError,
    EngineStopped,
    Event,
    GenerateRequest,
    InvalidRequest,
    RequestHandle,
    RequestTooLarge,
    ScoreRequest,
)

__all__ = [
    "Adapter", "AdapterBank", "Cancelled", "DeadlineExceeded", "Engine", "EngineConfig", "EngineError",
    "EngineStopped", "Event", "FusedDual", "GenerateRequest", "InvalidRequest", "RequestHandle", "RequestTooLarge",
    "ScoreRequest", "UnsupportedAdapter",
]
