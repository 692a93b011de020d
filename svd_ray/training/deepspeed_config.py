"""DeepSpeed configuration for the warm-start, derived from the run config (one source of truth).

    ds = deepspeed_config(cfg.cluster, cfg.training, world_size=2)
    engine, *_ = deepspeed.initialize(model=..., model_parameters=trainable, config=ds, dist_init_required=False)

* ZeRO stage 0 (plain data parallel), 2 (optimizer state + gradients partitioned) or 3 (parameters too).
* Optimizer: DeepSpeed's ``AdamW`` with ``torch_adam: true`` — i.e. ``torch.optim.AdamW`` with the same
  defaults the single-process path uses (betas 0.9/0.999, eps 1e-8, weight decay 0.01), so no optimizer
  op is compiled and a 1-worker DeepSpeed run follows the local run.
* Precision: fp32, bf16 (CPU or GPU; fp32 master weights in the optimizer) or fp16 (GPU only; rejected
  on CPU by ``ClusterConfig``, DeepSpeed's fp16 is not supported there).
* No gradient clipping and one micro-step per optimizer step (the paper's warm-start: batch 1, no tricks),
  except when an elastic run continues on fewer workers than it started with (gradient accumulation).
"""
from __future__ import annotations

from svd_ray.config import ClusterConfig, TrainingConfig

# torch.optim.AdamW defaults, spelled out so DeepSpeed and the local path cannot drift apart.
ADAMW_DEFAULTS = {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}


def deepspeed_config(
    cluster: ClusterConfig, training: TrainingConfig, world_size: int | None = None, grad_accum: int = 1
) -> dict:
    """The DeepSpeed config dict for ``deepspeed.initialize``. ``grad_accum`` > 1 when fewer workers than the
    run's data-parallel width share its micro-batches (``svd_ray.training.elastic``)."""
    world = world_size if world_size is not None else cluster.num_workers
    if world < 1:
        raise ValueError(f"world_size must be >= 1, got {world}")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if cluster.precision == "fp16" and not cluster.use_gpu:
        raise ValueError("cluster.precision fp16 needs use_gpu: DeepSpeed fp16 is not supported on CPU")
    zero: dict = {"stage": cluster.zero_stage}
    if cluster.zero_stage == 2:
        zero.update({"overlap_comm": False, "contiguous_gradients": True, "reduce_scatter": True})
    elif cluster.zero_stage == 3:
        zero.update(
            {
                "overlap_comm": False,
                "contiguous_gradients": True,
                # Small adapters: gather every parameter on use, keep nothing resident between uses
                # (the defaults tune for multi-billion-parameter models and change nothing here).
                "stage3_param_persistence_threshold": 0,
                "stage3_prefetch_bucket_size": 0,
                # The saved adapter comes from safe_get_full_fp32_param; no 16-bit consolidation on save.
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    return {
        "train_micro_batch_size_per_gpu": training.batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": training.batch_size * grad_accum * world,
        "optimizer": {"type": "AdamW", "params": {"lr": training.lr, "torch_adam": True, **ADAMW_DEFAULTS}},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cluster.precision == "bf16"},
        "fp16": {"enabled": cluster.precision == "fp16"},
        "gradient_clipping": 0.0,
        "steps_per_print": 1 << 30,  # progress is printed by the worker loop, not by DeepSpeed
        "wall_clock_breakdown": False,
    }


def dist_backend(cluster: ClusterConfig) -> str:
    """torch.distributed backend: NCCL between GPUs, gloo on CPU."""
    return "nccl" if cluster.use_gpu else "gloo"
