"""Elastic data parallelism (svd_ray.training.elastic), without Ray:

* the micro-batch plan gives the gradient of the full-width step for every (width, workers), checked by
  replaying DeepSpeed's reduction (÷ accumulation steps, mean over ranks) on real autograd gradients;
* the portable optimizer state moves a DeepSpeed engine's training (ZeRO-0/2/3, fp32 and bf16) into a
  freshly initialised engine: both then take the same next steps, to the bit.
The resume on fewer Ray Train workers end to end is in test_ray_train.py and test_multinode.py.
"""
from __future__ import annotations

import pytest
import torch

from elastic_helpers import portable_roundtrip, restore_refusal
from svd_ray.training.elastic import micro_batch_plan


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_micro_batch_plan_reproduces_the_full_width_gradient(width, world):
    torch.manual_seed(width * 10 + world)
    model = torch.nn.Linear(3, 2)
    data = [(torch.randn(2, 3), torch.randn(2, 2)) for _ in range(width)]

    def grad_of(j: int, weight: float) -> torch.Tensor:
        model.zero_grad()
        x, y = data[j]
        (torch.nn.functional.mse_loss(model(x), y) * weight).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    target = sum(grad_of(j, 1.0) for j in range(width)) / width
    plans = [micro_batch_plan(width, world, r) for r in range(world)]
    assert len({p.gas for p in plans}) == 1  # every rank takes the same number of micro-steps (collectives)
    real = sorted(j for p in plans for j, wt in zip(p.ids, p.weights) if wt)
    assert real == list(range(width))  # each micro-batch exactly once
    # DeepSpeed: each micro-step's loss ÷ gas, gradients averaged over the ranks
    got = sum(sum(grad_of(j, wt) / p.gas for j, wt in zip(p.ids, p.weights)) for p in plans) / world
    torch.testing.assert_close(got, target, rtol=1e-6, atol=1e-7)
    if world == width:
        assert all(p.gas == 1 and p.weights == (1.0,) and p.ids == (r,) for r, p in enumerate(plans))


def test_micro_batch_plan_rejects_nonsense():
    with pytest.raises(ValueError, match="rank 2"):
        micro_batch_plan(4, 2, 2)
    with pytest.raises(ValueError, match=">= 1"):
        micro_batch_plan(0, 1, 0)


# ------------------------------------------------------------------------------ portable optimizer state


@pytest.fixture(scope="module")
def deepspeed_process():
    """One spawned process with a single-rank gloo group: DeepSpeed's global state stays out of pytest's."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "fp32"), (2, "bf16"), (3, "fp32"), (3, "bf16")])
def test_portable_state_continues_training_exactly(stage, precision, deepspeed_process):
    """Engine A trains 4 steps; engine B starts from fresh weights + A's portable state; both take 3 more
    steps: B's parameters equal A's to the bit. Engine C (A's weights, no optimizer state) differs."""
    r = deepspeed_process.submit(portable_roundtrip, stage, precision).result(timeout=600)
    assert r["supported"] and r["step"] == r["step_restored"] and r["step"] >= 4
    assert r["moment_keys_ok"] and r["moments_nonzero"]
    assert r["max_diff_b"] == 0.0, r
    assert r["max_diff_c"] > 0.0, r  # the moments really were used


def test_restore_refuses_state_that_does_not_fit(deepspeed_process):
    assert "missing" in deepspeed_process.submit(restore_refusal).result(timeout=300)


def test_elastic_config_validation():
    from pydantic import ValidationError

    from svd_ray.config import ClusterConfig
    from svd_ray.training.ray_train import worker_count

    assert worker_count(ClusterConfig(num_workers=4, min_workers=2)) == (2, 4)
    assert worker_count(ClusterConfig(num_workers=4, min_workers=4)) == 4
    assert worker_count(ClusterConfig(num_workers=4)) == 4
    with pytest.raises(ValidationError, match="min_workers"):
        ClusterConfig(num_workers=2, min_workers=3)
    with pytest.raises(ValidationError, match="ZeRO-0 16-bit"):
        ClusterConfig(num_workers=2, min_workers=1, zero_stage=0, precision="bf16")
