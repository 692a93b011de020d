"""Shared helpers for tests/training (a uniquely named module: every test folder has its own conftest)."""
from __future__ import annotations

import uuid


def tiny_config(store_dir, run_id: str | None = None, **sections):
    """A tiny-llama run: 16 training / 16 calibration examples of the built-in addition task."""
    from svd_ray.config import RunConfig

    data = {
        "run_id": run_id or f"t-{uuid.uuid4().hex[:10]}",
        "model": "tiny-llama",
        "peft": {"method": "lora"},
        "data": {"task": "builtin:addition", "seed": 0, "train_size": 16, "calibration_size": 16},
        "training": {"max_steps": 4, "lr": 1e-3, "max_length": 64, "log_every": 2, "checkpoint_every": 2},
        # the paper's μ̄ (these tests compare it across runs and with the accumulator's mean); the validated
        # estimator has its own tests (tests/test_mu_validation.py)
        "calibration": {"batch_size": 4, "estimator": "mean"},
        "cluster": {"num_workers": 2, "zero_stage": 2, "precision": "fp32", "max_failures": 1},
        "store": f"file://{store_dir}",
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return RunConfig.model_validate(data)
