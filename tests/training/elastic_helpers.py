"""DeepSpeed engines in a spawned single-rank process for test_elastic.py (kept out of pytest's process)."""
from __future__ import annotations

import os

import torch


def _dist() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    from svd_ray.training.ray_worker import _quiet_deepspeed

    _quiet_deepspeed()  # no shared-memory op compile


class _Named(torch.nn.Module):
    """What the elastic functions expect of a PEFT model: ``named_parameters`` with frozen ones among them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        self.inner[0].bias.requires_grad_(False)


def _engine(model: _Named, stage: int, precision: str):
    import deepspeed

    from svd_ray.training.deepspeed_config import ADAMW_DEFAULTS

    cfg = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-2, "torch_adam": True, **ADAMW_DEFAULTS}},
        "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"}, "steps_per_print": 1 << 30,
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model.inner, model_parameters=trainable, config=cfg,
                                      dist_init_required=False)
    return engine


def _steps(engine, batches, dtype) -> None:
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(engine(x.to(dtype)).float(), y)
        engine.backward(loss)
        engine.step()


def portable_roundtrip(stage: int, precision: str) -> dict:
    from svd_ray.training.elastic import (
        gather_training_state,
        optimizer_step_count,
        restore_training_state,
        supports_portable_state,
    )
    from svd_ray.training.ray_worker import consolidated_adapter_state, load_adapter_state

    _dist()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(7)]
    a_model = _Named()
    a = _engine(a_model, stage, precision)
    supported = supports_portable_state(a, a_model)
    _steps(a, batches[:4], dtype)
    params = consolidated_adapter_state(a_model)
    moments, step = gather_training_state(a, a_model)
    names = [n for n, p in a_model.named_parameters() if p.requires_grad]

    b_model = _Named()
    with torch.no_grad():  # other starting weights: B knows only what the portable state tells it
        for p in b_model.parameters():
            if p.requires_grad:  # frozen weights are the same base model's in every run
                p.add_(1.0)
    load_adapter_state(b_model, params)
    b = _engine(b_model, stage, precision)
    restore_training_state(b, b_model, params, moments, step)
    step_restored = optimizer_step_count(b)

    c_model = _Named()
    load_adapter_state(c_model, params)
    c = _engine(c_model, stage, precision)

    for engine in (a, b, c):
        _steps(engine, batches[4:], dtype)
    pa, pb, pc = (consolidated_adapter_state(m) for m in (a_model, b_model, c_model))
    return {
        "supported": supported, "step": step, "step_restored": step_restored,
        "moment_keys_ok": set(moments) == {f"{k}/{n}" for n in names for k in ("exp_avg", "exp_avg_sq")},
        "moments_nonzero": all(float(v.abs().sum()) > 0 for v in moments.values()),
        "max_diff_b": max(float((pb[n] - pa[n]).abs().max()) for n in pa),
        "max_diff_c": max(float((pc[n] - pa[n]).abs().max()) for n in pa),
    }


def restore_refusal() -> str:
    from svd_ray.training.elastic import restore_training_state

    _dist()
    model = _Named()
    engine = _engine(model, 2, "fp32")
    try:
        restore_training_state(engine, model, {}, {}, 3.0)
    except ValueError as exc:
        return str(exc)
    return "no error"
