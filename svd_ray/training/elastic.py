"""Elastic data parallelism: the same optimizer steps whatever the number of live workers.

A run fixes its *data-parallel width* ``N`` (``cluster.num_workers`` when it starts, kept in its checkpoints):
every optimizer step consumes ``N`` micro-batches of ``training.batch_size`` examples (``step_examples`` with
``world_size=N``) and its gradient is their mean,

    g = (1/N) · Σ_{j<N} ∇ loss_j .

With ``w`` live workers (Ray Train restarted the group smaller after a node was lost, or the run was
resubmitted on a smaller cluster), rank ``r`` runs micro-batches ``j ≡ r (mod w)`` as gradient accumulation
(``gas = ⌈N/w⌉`` micro-steps; ranks with fewer real micro-batches run a zero-weighted one, because every
rank must take part in every collective), each loss scaled by ``w·gas/N``. DeepSpeed divides by ``gas`` and
averages over ``w`` ranks, so the update is exactly ``g`` above: the training trajectory does not depend on
``w`` beyond floating-point summation order. With ``w = N``: one micro-step, scale 1 (the plain path).

A ZeRO checkpoint is partitioned over the ranks that wrote it and cannot be loaded by a different number of
ranks, so every checkpoint also carries a *portable* copy of the optimizer state: the full fp32 value and the
full AdamW moments of every trainable parameter, plus the optimizer's step count (``gather_training_state``,
a collective). A resume with the same width loads DeepSpeed's own checkpoint (bit-exact); a resume with
another loads the portable copy: parameter values into the model before ``deepspeed.initialize`` (so the
fp32 master and any bf16 working copy agree), then the moments and step count into the engine's optimizer
(``restore_training_state``), which DeepSpeed re-partitions over the new ranks.

Randomness (dropout masks): a run that keeps its worker count keeps each rank's RNG stream, checkpointed
per rank (bit-exact resume). Those streams cannot be split or merged over another count, so from a resize
on every micro-batch seeds its own generator from (seed, step, micro-batch) (``micro_batch_seed``): the
resumed run then draws other masks than the uninterrupted one would have, and matches it in distribution;
without dropout it matches it to floating-point summation order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")  # torch.optim.AdamW's state (DeepSpeed runs it with torch_adam)


@dataclass(frozen=True)
class MicroBatchPlan:
    """What one rank runs for one optimizer step (see the module docstring)."""

    ids: tuple[int, ...]  # micro-batch indices j < N of this rank, padded to ``gas`` with weight-0 repeats
    weights: tuple[float, ...]  # loss multiplier per micro-step: w·gas/N for real ones, 0 for padding
    gas: int  # gradient-accumulation micro-steps per optimizer step


def micro_batch_plan(width: int, world: int, rank: int) -> MicroBatchPlan:
    """Micro-batches ``j ≡ rank (mod world)`` of ``width``, padded to ``⌈width/world⌉``, weighted ``w·gas/N``.
    More workers than the width also works: the extra ranks run one zero-weighted micro-batch each."""
    if width < 1 or world < 1:
        raise ValueError(f"width and world must be >= 1, got {width} and {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    gas = math.ceil(width / world)
    mine = list(range(rank, width, world))
    scale = world * gas / width
    ids = mine + [mine[0] if mine else 0] * (gas - len(mine))
    weights = [scale] * len(mine) + [0.0] * (gas - len(mine))
    return MicroBatchPlan(tuple(ids), tuple(weights), gas)


def micro_batch_seed(seed: int, step: int, micro_batch: int) -> int:
    """The RNG seed of one micro-batch after a resize (dropout masks independent of which rank runs it)."""
    return (seed * 1_000_003 + step * 1_009 + micro_batch) & 0x7FFF_FFFF_FFFF


def _trainable(peft_model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]  # same order on every rank


def _base_optimizer(engine):
    """The torch AdamW inside DeepSpeed's wrappers (ZeRO-2/3 and bf16 wrap it as ``.optimizer``)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _managed(param) -> bool:
    """Whether DeepSpeed keeps this parameter's optimizer state in partitions (ZeRO-1/2/3, bf16)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def optimizer_step_count(engine) -> float | None:
    """AdamW's step counter (equal for every parameter; None before the first step)."""
    for state in _base_optimizer(engine).state.values():
        if "step" in state:
            return float(state["step"])
    return None


def supports_portable_state(engine, peft_model) -> bool:
    """Whether the moments can be gathered: DeepSpeed partitions every trainable parameter (ZeRO-1/2/3, bf16
    master weights), or the optimizer holds the model's own parameters (ZeRO-0 fp32). ZeRO-0 with a 16-bit
    wrapper keeps fp32 copies this module does not map; such runs resume only with the same width."""
    params = [p for _, p in _trainable(peft_model)]
    if all(_managed(p) for p in params):
        return True
    held = {id(q) for g in _base_optimizer(engine).param_groups for q in g["params"]}
    return all(id(p) in held for p in params)


def gather_training_state(engine, peft_model) -> tuple[dict[str, torch.Tensor], float | None]:
    """Full fp32 moments of every trainable parameter (keys ``exp_avg/<name>``, ``exp_avg_sq/<name>``) and the
    step count, on every rank. A collective under ZeRO: every rank calls it. Parameter values come from
    ``consolidated_adapter_state``."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = _base_optimizer(engine)
    out: dict[str, torch.Tensor] = {}
    for name, p in _trainable(peft_model):
        for key in MOMENT_KEYS:
            if _managed(p):
                full = safe_get_full_optimizer_state(p, key)
            else:  # ZeRO-0 fp32: the optimizer holds the model's own parameters, whole on every rank
                full = base.state.get(p, {}).get(key)
            if full is None:
                raise RuntimeError(f"no optimizer state {key!r} for {name}: gather after the first step")
            shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape  # ZeRO-3 leaves an empty placeholder
            out[f"{key}/{name}"] = full.detach().to("cpu", torch.float32).reshape(shape).clone()
    return out, optimizer_step_count(engine)


def restore_training_state(
    engine, peft_model, params: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], step: float
) -> None:
    """Load full fp32 parameter values (also loaded into the model before ``deepspeed.initialize``) and
    ``gather_training_state``'s moments and step count into a freshly initialised engine (any number of
    ranks). Every rank calls it with the same tensors. The fp32 master copy is set again here because
    DeepSpeed builds it from the 16-bit working copy under bf16, which would round it."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    base = _base_optimizer(engine)
    trainable = _trainable(peft_model)
    missing = [f"{k}/{n}" for n, _ in trainable for k in MOMENT_KEYS if f"{k}/{n}" not in moments]
    missing += [n for n, _ in trainable if n not in params]
    if missing:
        raise ValueError(f"portable optimizer state does not fit the model: missing {missing[:3]}")
    # AdamW creates its state lazily at the first step: create it (zeros) so there is something to fill.
    # ZeRO-3 hands its flat fp32 partitions to AdamW only for the duration of a step, hence the attribute.
    hps = [hp for group in base.param_groups for hp in group["params"]]
    hps += [hp for hp in getattr(engine.optimizer, "fp32_partitioned_groups_flat", []) if all(hp is not q for q in hps)]
    for hp in hps:
        state = base.state[hp]
        for key in MOMENT_KEYS:
            if key not in state:
                state[key] = torch.zeros_like(hp, memory_format=torch.preserve_format)
        state["step"] = torch.tensor(float(step), dtype=torch.float32)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2 and bf16 map each parameter's fragment onto the state just created
        link()
    for name, p in trainable:
        if not _managed(p):  # ZeRO-0 fp32: the value is the model's (loaded before initialize), state is whole
            for key in MOMENT_KEYS:
                base.state[p][key].copy_(moments[f"{key}/{name}"].view_as(base.state[p][key]))
            continue
        safe_set_full_fp32_param(p, params[name].to(torch.float32))
        for key in MOMENT_KEYS:
            safe_set_full_optimizer_state(p, moments[f"{key}/{name}"].to(torch.float32), key)
