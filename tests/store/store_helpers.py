"""Shared helpers for the task-store tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def make_meta(
    model_id: str = "HuggingFaceTB/SmolLM2-135M-Instruct", weights: str = "a" * 64, tok: str = "b" * 64
) -> dict[str, Any]:
    return {
        "base_model": {"id": model_id, "weights_sha256": weights, "tokenizer_sha256": tok},
        "peft": {"method": "lora", "config": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}},
        "mu": {"file": "mu.safetensors", "norm_mean": 1.25, "norm_std": 0.5, "n_samples": 128},
        "alpha": 1.5,
        "splits": {"train": {"n": 100, "sha256": "c" * 64}, "val": {"n": 20, "sha256": "d" * 64}},
        "metrics": {"val_acc": 0.625},
        "provenance": {"git": "deadbeef"},
    }


def make_bundle(root: Path, seed: str = "x") -> Path:
    """A small bundle directory with nested files (content depends on ``seed``)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_model.safetensors").write_bytes((seed.encode() * 997)[:4000] + os.urandom(96))
    (root / "adapter_config.json").write_text(f'{{"r": 8, "seed": "{seed}"}}')
    (root / "mu.safetensors").write_bytes(seed.encode() * 300)
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "special_tokens.json").write_text("{}")
    (root / "empty.txt").write_bytes(b"")
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".svd-ray")
    }


def publish_in_process(args: tuple[str, str, str]) -> str:
    """Worker for the multi-process publish race (imported by spawned children: keep it importable)."""
    from svd_ray.store import ConflictError, open_store

    uri, src, version = args
    try:
        open_store(uri).publish("race", src, make_meta(), version=version)
        return "won"
    except ConflictError:
        return "conflict"
