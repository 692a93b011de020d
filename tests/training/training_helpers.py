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


# ------------------------------------------------------------------------------ worker hooks (tests only)
# The worker calls optional hooks from ``loop_cfg["hooks"]`` (svd_ray.training.ray_worker); these test-only
# ones travel to the Ray workers by value (this module is not importable there).
import sys as _sys  # noqa: E402

import ray.cloudpickle as _cloudpickle  # noqa: E402

_cloudpickle.register_pickle_by_value(_sys.modules[__name__])


class ProbeHooks:
    """Logits of a fixed text through the DeepSpeed engine after training (``metrics["engine_probe"]``)
    and through the calibrated plain model (``probe_logits`` in the final checkpoint)."""

    def __init__(self, text: str):
        self.text = text

    def after_train(self, engine, tokenizer, metrics, rank):
        import torch

        metrics["engine_zero_stage"] = int(engine.zero_optimization_stage())  # what DeepSpeed really ran
        engine.eval()
        enc = tokenizer(self.text, return_tensors="pt")
        with torch.no_grad():
            metrics["engine_probe"] = engine(enc["input_ids"].to(engine.device), enc["attention_mask"].to(engine.device),
                                             logits_only=True).float().cpu().tolist()

    def after_calibration(self, peft_model, tokenizer, device, rank):
        import torch

        from svd_ray.decoding import DualModel

        enc = tokenizer(self.text, return_tensors="pt")
        with torch.no_grad():
            logits = DualModel(peft_model).teacher_forced_logits(enc["input_ids"].to(device), with_base=False)[0]
        return {"probe_logits": logits.cpu()}


class FailOnceHooks:
    """Rank ``rank`` exits (``os._exit(1)``) right after optimizer step ``step``, once per run (``marker``
    records it). It waits ``delay_s`` first: Ray Train registers a reported checkpoint when it next polls the
    workers (every 2 s), so the run then resumes from the newest report deterministically."""

    def __init__(self, step: int, rank: int, marker: str, delay_s: float = 5.0):
        self.step, self.rank, self.marker, self.delay_s = step, rank, marker, delay_s

    def after_step(self, step, rank):
        import os
        import time
        from pathlib import Path

        if step != self.step or rank != self.rank or Path(self.marker).exists():
            return
        Path(self.marker).parent.mkdir(parents=True, exist_ok=True)
        Path(self.marker).write_text(f"rank {rank} exited at step {step}\n")
        time.sleep(self.delay_s)
        os._exit(1)


def ray_train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes (Ray titles them ``ray::RayTrainWorker...``)."""
    import os

    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::RayTrainWorker"):
            pids.append(int(pid))
    return sorted(pids)


class FailAtStep:
    """``after_step`` hook: rank ``rank`` raises at ``step``, after waiting past Ray Train's 2 s poll so the
    checkpoint reported before it is registered (a failure the run's retries, or a resubmission, resume from)."""

    def __init__(self, step: int, rank: int = 1):
        self.step, self.rank = step, rank

    def after_step(self, step, rank):
        if step == self.step and rank == self.rank:
            import time

            time.sleep(3.0)
            raise RuntimeError(f"injected failure at step {step} on rank {rank}")
