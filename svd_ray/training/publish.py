"""Turn a warm-started adapter + calibration statistics into a published task bundle."""
from __future__ import annotations

import platform
import tempfile
from pathlib import Path

from svd_ray.bundle import steering_from_accumulator, write_bundle
from svd_ray.calibration import MuAccumulator
from svd_ray.config import RunConfig
from svd_ray.models import ModelRef, model_fingerprint


def _versions() -> dict:
    import peft
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def bundle_meta(cfg: RunConfig, ref: ModelRef, steering, split: dict, metrics: dict) -> dict:
    """Manifest ``meta``: everything needed to list, check and reproduce the bundle."""
    return {
        "base_model": model_fingerprint(ref),
        "peft": {"method": cfg.peft.method, "config": cfg.peft.model_dump()},
        "mu": steering.meta(),
        "alpha": steering.alpha,
        "splits": split,
        "metrics": metrics,
        "provenance": {"run_id": cfg.run_id, "config": cfg.model_dump(), "versions": _versions()},
    }


def publish_bundle(
    cfg: RunConfig,
    ref: ModelRef,
    peft_model,
    acc: MuAccumulator,
    split: dict,
    metrics: dict,
    version: str | None = None,
):
    """Write the bundle to a temp folder and publish it atomically; returns the store manifest."""
    from svd_ray.store import open_store

    steering = steering_from_accumulator(acc, cfg.calibration.alpha, cfg.calibration.estimator, cfg.calibration.trim)
    meta = bundle_meta(cfg, ref, steering, split, metrics)
    store = open_store(cfg.store)
    with tempfile.TemporaryDirectory(prefix="svd-ray-bundle-") as tmp:
        write_bundle(Path(tmp), peft_model, steering, {"config": cfg.model_dump(), "metrics": metrics, "splits": split}, acc)
        return store.publish(cfg.task, tmp, meta, version=version)
