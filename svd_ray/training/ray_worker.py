"""The Ray Train worker: warm-start + distributed μ̄ calibration + publish, as small phases.

``train_loop_per_worker`` (the ``TorchTrainer`` function; the driver is ``svd_ray.training.ray_train``) runs:

    resume      read the latest checkpoint (Ray Train hands it to every restarted worker group): phase + step
    warm_start  DeepSpeed engine (ZeRO 0/2/3, fp32/bf16) around the PEFT model. Each step every rank takes
                its slice of the global batch (``step_examples``: a pure function of the step number, so a
                resumed run sees exactly the data it would have seen) and computes ``causal_lm_loss`` through
                ``DualModel`` — the code path decoding uses. Every ``checkpoint_every`` steps: DeepSpeed
                checkpoint (adapter + optimizer partitions, frozen base weights excluded) + per-rank RNG.
                At the end the adapter's full fp32 weights (``safe_get_full_fp32_param``: correct for ZeRO-2/3
                and bf16 master weights) are checkpointed (phase ``trained``).
    calibrate   a fresh fp32 PEFT model with those weights on every rank; each rank teacher-forces its
                contiguous shard of the calibration split with the adapter on and off; the μ statistics, Σδ
                and the μ validation are all-reduced (``calibrate_distributed``).
    publish     rank 0 publishes the bundle through the store (version = run id: a retried publish of the
                same run is recognised and not duplicated); the final checkpoint (phase ``done``) holds the
                accumulator, so a resubmitted finished run returns at once.

Progress: rank 0 writes ``step i/N  loss …  tok/s …  eta …`` lines to stdout (loss and tokens all-reduced
over ranks); Ray forwards worker stdout to the driver, and to the job logs under Ray Jobs.

Extension points (``loop_cfg["hooks"]``, an object with any of ``after_step(step, rank)``,
``after_train(engine, tokenizer, metrics, rank)``, ``after_calibration(peft_model, tokenizer, device, rank)``
→ {name: tensor} saved in the final checkpoint): tests use them for probes; nothing in the product sets them,
and no environment variable reaches them.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from svd_ray.config import RunConfig

DS_TAG = "ds"
PHASE_TRAIN, PHASE_TRAINED, PHASE_DONE = "train", "trained", "done"


# ============================================================================ pure helpers


def step_examples(examples: list, step: int, *, batch_size: int, world_size: int, rank: int, seed: int) -> list:
    """Examples of ``rank`` for optimizer step ``step`` (0-based).

    Epoch ``e`` uses ``epoch_order(examples, seed, e)`` (the single-process order). The global batch of a
    step is ``batch_size * world_size`` consecutive examples of that order; rank r takes the r-th slice.
    An epoch whose length is not a multiple of the global batch is padded by wrapping around to its start
    (like ``DistributedSampler``), so every rank always has ``batch_size`` examples and every step is a
    full, collective step.
    """
    from svd_ray.training.local import epoch_order

    n = len(examples)
    if n == 0:
        raise ValueError("no training examples")
    per_step = batch_size * world_size
    steps_per_epoch = math.ceil(n / per_step)
    epoch, i = divmod(step, steps_per_epoch)
    order = epoch_order(examples, seed, epoch)
    start = i * per_step + rank * batch_size
    return [order[(start + j) % n] for j in range(batch_size)]


def _emit(line: str) -> None:
    """Write a progress line to the real stdout (bypasses Ray Train's print patch; Ray forwards it)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")



# ============================================================================ DeepSpeed pieces


class DualLossModule(torch.nn.Module):
    """What DeepSpeed wraps: ``forward(batch) → loss`` through ``DualModel`` (the decoding code path).

    Calling the engine (rather than the PEFT model's inner modules) keeps DeepSpeed's top-level forward
    hooks — ZeRO-3's parameter-fetch bookkeeping — in the loop.
    """

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, input_ids, attention_mask, labels=None, logits_only: bool = False):
        from svd_ray.decoding import DualModel
        from svd_ray.training.steps import causal_lm_loss

        dual = DualModel(self.peft_model)
        if logits_only:
            return dual.teacher_forced_logits(input_ids, attention_mask, with_base=False)[0]
        loss, _ = causal_lm_loss(dual, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
        return loss


def _collate(tokenizer, examples, max_length: int, loss_on: str) -> dict:
    from svd_ray.training.batches import collate, encode_example

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return collate([encode_example(tokenizer, e.prompt, e.answer, max_length, loss_on) for e in examples], pad)


def _quiet_worker() -> None:
    """Keep the driver's console readable: progress lines, warnings and errors, not per-report chatter."""
    import logging
    import warnings

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # Ray 2.60 names this module's logger by its file path, so the line above misses its
        # per-report "Reporting training result ..." INFO lines
        from ray.train.v2._internal.execution import context as _train_context

        logging.getLogger(_train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # pragma: no cover - other Ray versions
        pass
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _quiet_deepspeed() -> None:
    import logging

    import deepspeed  # noqa: F401  (import here: workers only)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (35–50 s, gcc) that only its
    # *inference* tensor-parallel all-reduce uses; training collectives go through torch.distributed.
    # Skipping it saves the compile and avoids shared-memory segments shared with other DeepSpeed jobs.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _init_engine(peft_model, cfg: RunConfig, world_size: int, grad_accum: int = 1):
    import deepspeed

    from svd_ray.training.deepspeed_config import deepspeed_config

    module = DualLossModule(peft_model)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=trainable,
        config=deepspeed_config(cfg.cluster, cfg.training, world_size, grad_accum),
        dist_init_required=False,
    )
    return engine


def consolidated_adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """Full fp32 values of every trainable parameter, on every rank (a collective under ZeRO).

    ``safe_get_full_fp32_param`` assembles the optimizer's fp32 master copy for ZeRO-1/2/3 and bf16;
    parameters DeepSpeed does not manage (ZeRO-0 fp32) are complete already.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in peft_model.named_parameters():  # same order on every rank
        if not p.requires_grad:
            continue
        full = safe_get_full_fp32_param(p)
        out[name] = (p.data if full is None else full).detach().to("cpu", torch.float32).clone()
    return out


def load_adapter_state(peft_model, state: dict[str, torch.Tensor]) -> None:
    """Copy trainable-parameter values (by name) into a plain PEFT model; every trainable one must be there."""
    params = dict(peft_model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = trainable - set(state), set(state) - set(params)
    if missing or unexpected:
        raise ValueError(f"adapter state does not fit the model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))


def _fresh_model(cfg: RunConfig, device):
    from svd_ray.training.local import prepare_model

    peft_model, tokenizer, ref = prepare_model(cfg)
    return peft_model.to(device), tokenizer, ref


def _publish(cfg: RunConfig, ref, peft_model, acc, split: dict, metrics: dict) -> dict:
    """Publish (rank 0) with version = run id; a retry of an already-published run returns its manifest."""
    from svd_ray.store import ConflictError, open_store
    from svd_ray.training.publish import publish_bundle

    try:
        m = publish_bundle(cfg, ref, peft_model, acc, split, metrics, version=cfg.run_id)
        existed = False
    except ConflictError:
        m = open_store(cfg.store).manifest(cfg.task, cfg.run_id)
        prov = (m.meta or {}).get("provenance", {})
        if prov.get("run_id") != cfg.run_id:
            raise
        prev = prov.get("config", {})
        if {k: prev.get(k) for k in ("model", "peft", "data", "training")} != {
            k: cfg.model_dump()[k] for k in ("model", "peft", "data", "training")
        }:
            raise ValueError(
                f"store already holds {cfg.task}@{cfg.run_id} from a different config; use a new run_id"
            ) from None
        existed = True
    return {"task": m.task, "version": m.version, "created_at": m.created_at, "already_published": existed,
            "store": cfg.store}


PORTABLE_STATE = "portable_state.safetensors"


def _write_portable_state(d: Path, params: dict, moments: dict, opt_step: float | None) -> None:
    from safetensors.torch import save_file

    tensors = {f"param/{k}": v.contiguous() for k, v in params.items()} | {k: v.contiguous() for k, v in moments.items()}
    save_file(tensors, str(d / PORTABLE_STATE), metadata={"optimizer_step": repr(opt_step)})


def _read_portable_state(ckpt_dir: Path, cfg: RunConfig, state: dict, world: int):
    """(parameter values, AdamW moments, step count) of a checkpoint, for a resume on another worker count."""
    from safetensors import safe_open

    path = ckpt_dir / PORTABLE_STATE
    if not path.is_file():
        raise ValueError(
            f"checkpoint of run {cfg.run_id} was written by {state.get('world_size')} workers and carries no "
            f"portable optimizer state (an older checkpoint, or ZeRO-0 with {cfg.cluster.precision}); it can only "
            f"resume on {state.get('world_size')} workers, this run has {world}"
        )
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        opt_step = float(fh.metadata()["optimizer_step"])
    params = {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}
    moments = {k: v for k, v in tensors.items() if not k.startswith("param/")}
    return params, moments, opt_step


def _save_adapter_state(d: Path, state: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "adapter_state.safetensors"))


def _cpu_group():
    """Process group for the small CPU-tensor all-reduces (progress, μ statistics): the default group under
    gloo; a gloo side group under NCCL, which only reduces GPU tensors. Collective: every rank calls it."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return dist.new_group(backend="gloo")
    return None




# ============================================================================ the worker


@dataclass
class WorkerContext:
    """What every phase needs: this rank, the run config, the checkpointed ``report`` and rank-0 logging."""

    loop_cfg: dict
    cfg: RunConfig
    rank: int
    world: int
    device: torch.device
    cpu_group: object = None
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def tag(self) -> str:
        return f"[{self.cfg.run_id}]"

    def log0(self, line: str) -> None:
        if self.rank == 0:
            _emit(f"{self.tag} {line}")

    def hook(self, name: str, **kwargs):
        fn = getattr(self.loop_cfg.get("hooks"), name, None)
        return fn(**kwargs) if fn is not None else None

    def report(self, phase: str, metrics: dict, files) -> None:
        """Checkpointed report (a barrier). ``files(dir)`` writes this rank's files."""
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory(prefix=f"svd-ray-ckpt-r{self.rank}-") as tmp:
            files(Path(tmp))
            if self.rank == 0:
                payload = {"phase": phase, "fingerprint": self.loop_cfg["fingerprint"], "world_size": self.world,
                           "run_id": self.cfg.run_id, **metrics}
                (Path(tmp) / "state.json").write_text(json.dumps(payload, indent=1, default=str))
            ray.train.report({"phase": phase, "step": metrics.get("step", 0)}, checkpoint=Checkpoint.from_directory(tmp))


def _context(loop_cfg: dict) -> WorkerContext:
    import ray.train
    import ray.train.torch

    _quiet_worker()
    ctx = ray.train.get_context()
    cfg = RunConfig.model_validate(loop_cfg["cfg"])
    if not cfg.cluster.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no "unable to detect GPU" warning per worker
    torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    torch.set_flush_denormal(True)
    device = ray.train.torch.get_device() if cfg.cluster.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return WorkerContext(loop_cfg, cfg, ctx.get_world_rank(), ctx.get_world_size(), device, _cpu_group())


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def train_loop_per_worker(loop_cfg: dict) -> None:
    """The Ray Train worker function: resume → warm-start → calibrate → publish (see the module docstring)."""
    import ray.train

    w = _context(loop_cfg)
    mode = loop_cfg.get("mode", "full")  # "calibrate": no training, a seeded random adapter (tests, diagnostics)
    state: dict = {"phase": PHASE_TRAIN, "step": 0, "metrics": {}}
    ckpt = ray.train.get_checkpoint()
    adapter_state, kept = None, {}
    if ckpt is not None:
        with ckpt.as_directory() as d:
            d = Path(d)
            state = _read_json(d / "state.json")
            if state.get("fingerprint") not in (None, loop_cfg["fingerprint"]):
                raise ValueError(f"{w.tag} checkpoint was made with a different config; use a new run_id")
            w.log0(f"resuming from checkpoint: phase {state['phase']}, step {state['step']}")
            adapter_state, kept, metrics = _resume_or_train(w, mode, state, d)
    else:
        adapter_state, kept, metrics = _resume_or_train(w, mode, state, None)

    if state.get("phase") == PHASE_DONE:  # a completed run was resubmitted: nothing left to do
        pub = state.get("published") or {}
        w.log0(f"run already complete: {pub.get('task')}@{pub.get('version')}")
        w.report(PHASE_DONE, {k: v for k, v in state.items() if k not in ("phase", "fingerprint", "world_size", "run_id")},
                 lambda d: [(d / name).write_bytes(data) for name, data in kept.items()] if w.rank == 0 else None)
        return
    peft_model, tokenizer, ref, acc, cal_metrics, extra_files = calibrate_phase(w, mode, adapter_state)
    published = publish_phase(w, mode, ref, peft_model, acc, metrics, cal_metrics)

    def final_files(d: Path) -> None:
        if w.rank != 0:
            return
        torch.save(acc.state_dict(), d / "calibration.pt")
        for name, tensor in extra_files.items():
            torch.save(tensor, d / f"{name}.pt")

    w.report(PHASE_DONE, {"step": metrics.get("steps", 0), "metrics": metrics, "calibration": cal_metrics,
                          "mu": {"mean": acc.mean(), "median": acc.median(), "sequence": acc.sequence_level()},
                          "published": published, "seconds_this_attempt": round(time.perf_counter() - w.t_start, 3)},
             final_files)


def _resume_or_train(w: WorkerContext, mode: str, state: dict, ckpt_dir: Path | None):
    """(adapter state, files kept from a finished run, training metrics) for the checkpointed phase."""
    metrics = state.get("metrics", {})
    if mode == "calibrate":
        return None, {}, metrics
    if state["phase"] == PHASE_TRAIN:
        adapter_state, metrics = warm_start(w, ckpt_dir, state)
        w.report(PHASE_TRAINED, {"step": metrics["steps"], "metrics": metrics},
                 lambda d: _save_adapter_state(d, adapter_state) if w.rank == 0 else None)
        return adapter_state, {}, metrics
    if state["phase"] == PHASE_TRAINED:
        from safetensors.torch import load_file

        return load_file(str(ckpt_dir / "adapter_state.safetensors")), {}, metrics
    return None, {f.name: f.read_bytes() for f in ckpt_dir.iterdir() if f.suffix == ".pt"}, metrics  # done


def calibrate_phase(w: WorkerContext, mode: str, adapter_state):
    """A fresh fp32 model with the trained adapter on every rank; all-reduced calibration statistics."""
    from svd_ray.training.distributed_calibration import calibrate_distributed, randomize_adapter

    cfg = w.cfg
    peft_model, tokenizer, ref = _fresh_model(cfg, w.device)
    if mode == "calibrate":
        randomize_adapter(peft_model, w.loop_cfg.get("adapter_seed", 0))
    else:
        load_adapter_state(peft_model, adapter_state)
    peft_model.eval()
    examples = w.loop_cfg["calibration"]
    t_cal = time.perf_counter()
    w.log0(f"calibrating μ̄ on {len(examples)} examples over {w.world} worker(s)")
    acc = calibrate_distributed(
        peft_model, tokenizer, examples, alpha=cfg.calibration.alpha, batch_size=cfg.calibration.batch_size,
        max_length=cfg.training.max_length, group=w.cpu_group, progress=f"{w.tag} calibrating (rank 0 shard)",
        progress_write=_emit, trim=cfg.calibration.trim,
    )
    cal_metrics = {"examples": len(examples), "tokens": acc.count, "workers": w.world,
                   "seconds": round(time.perf_counter() - t_cal, 3)}
    w.log0(f"calibrated on {acc.count} answer tokens in {cal_metrics['seconds']:.1f}s: μ̄ mean {acc.mean():+.4f}, "
           f"median {acc.median():+.4f}, sequence {acc.sequence_level():+.4f}")
    extra = w.hook("after_calibration", peft_model=peft_model, tokenizer=tokenizer, device=w.device, rank=w.rank) or {}
    return peft_model, tokenizer, ref, acc, cal_metrics, extra


def publish_phase(w: WorkerContext, mode: str, ref, peft_model, acc, metrics: dict, cal_metrics: dict) -> dict | None:
    """Rank 0 publishes the bundle (version = run id); other ranks and calibrate-only runs publish nothing."""
    if w.rank != 0 or mode != "full":
        return None
    all_metrics = {"train": metrics, "calibration": cal_metrics}
    if w.loop_cfg.get("lr_search"):
        all_metrics["lr_search"] = w.loop_cfg["lr_search"]
    if w.loop_cfg.get("max_final_loss") is not None:  # the driver falls back to the next lr (lr_search.py)
        from svd_ray.training.lr_search import check_final, final_calibration_loss

        check = check_final(w.cfg.training.lr, final_calibration_loss(acc), w.loop_cfg["max_final_loss"])
        if not check["accepted"]:
            w.log0(f"not publishing: {check['reason']}")
            return None
        search = all_metrics["lr_search"]
        all_metrics["lr_search"] = {**search, "chosen": w.cfg.training.lr,
                                    "final_checks": [*search.get("final_checks", []), check]}
    published = _publish(w.cfg, ref, peft_model, acc, w.loop_cfg["split"], all_metrics)
    w.log0(("already published " if published["already_published"] else "published ")
           + f"{published['task']}@{published['version']} to {w.cfg.store}")
    return published


def warm_start(w: "WorkerContext", ckpt_dir, state: dict):
    """Phase ``train``: DeepSpeed warm-start from the step in ``state`` (0, or a checkpoint's); checkpoints
    every ``checkpoint_every`` steps; returns (consolidated adapter state, training metrics).

    The run's data-parallel width (micro-batches per optimizer step) is fixed when it starts; a resume on a
    different number of workers keeps it and loads the portable optimizer state (``svd_ray.training.elastic``)."""
    import torch.distributed as dist

    from svd_ray.training.elastic import gather_training_state, micro_batch_plan, micro_batch_seed
    from svd_ray.training.elastic import restore_training_state, supports_portable_state
    from svd_ray.training.local import planned_steps, prepare_model

    cfg, rank, world, report, log0, cpu_group = w.cfg, w.rank, w.world, w.report, w.log0, w.cpu_group
    _quiet_deepspeed()
    tc = cfg.training
    examples = w.loop_cfg["train"]
    resuming = ckpt_dir is not None and state["phase"] == PHASE_TRAIN and state["step"] > 0
    width = int(state.get("width") or state.get("world_size")) if resuming else cfg.cluster.num_workers
    plan = micro_batch_plan(width, world, rank)
    total = planned_steps(len(examples), cfg, width)
    peft_model, tokenizer, _ = prepare_model(cfg)  # seeded: the same fresh adapter on every rank
    portable = None
    if resuming and state.get("world_size") != world:
        portable = _read_portable_state(ckpt_dir, cfg, state, world)
        load_adapter_state(peft_model, portable[0])  # before initialize: fp32 master and working copy agree
    engine = _init_engine(peft_model, cfg, world, plan.gas)
    step = 0
    m = {"steps": 0, "tokens": 0, "seconds": 0.0, "first_loss": None, "last_loss": None, "losses": [],
         "world_size": world, "width": width, "zero_stage": cfg.cluster.zero_stage, "precision": cfg.cluster.precision,
         "resumed_from": [], "world_sizes": [world]}
    if resuming:
        if portable is None:  # same workers: DeepSpeed's own partitioned checkpoint, bit-exact
            engine.load_checkpoint(str(ckpt_dir / "ds"), tag=DS_TAG, load_module_strict=False,
                                   load_optimizer_states=True, load_lr_scheduler_states=False)
        else:
            restore_training_state(engine, peft_model, *portable)
        step = state["step"]
        m = dict(state["metrics"])
        if portable is not None:
            # The ranks' RNG streams (dropout masks) cannot be split or merged over another worker count: from
            # here on every micro-batch draws from its own seed, a function of (seed, step, micro-batch).
            m["rng"] = "micro-batch"
            log0(f"resuming step {step} on {world} worker(s) (checkpointed by {state.get('world_size')}): "
                 f"{width} micro-batches per step as {plan.gas} accumulation step(s) per worker")
        if m.get("rng") != "micro-batch":
            torch.set_rng_state(torch.load(ckpt_dir / "rng" / f"rank{rank}.pt", weights_only=False))
        m["resumed_from"] = list(m.get("resumed_from", [])) + [step]
        m["world_sizes"] = list(m.get("world_sizes", [state.get("world_size")])) + [world]
        m["world_size"], m["width"] = world, width
    portable_ok = supports_portable_state(engine, peft_model)
    engine.train()
    if step == 0:
        log0(f"warm-start: {cfg.model} + {cfg.peft.method}, {len(examples)} examples, {total} steps × "
             f"{tc.batch_size}×{width} examples, DeepSpeed ZeRO-{cfg.cluster.zero_stage} {cfg.cluster.precision}, "
             f"lr {tc.lr}, loss on {tc.loss_on} tokens" + (f", {world} worker(s)" if world != width else ""))
    t0, step0, seconds0 = time.perf_counter(), step, float(m.get("seconds", 0.0))
    window = torch.zeros(3, dtype=torch.float64)  # Σ loss, micro-batches, tokens since the last log line
    while step < total:
        for j, weight in zip(plan.ids, plan.weights):
            if m.get("rng") == "micro-batch":
                torch.manual_seed(micro_batch_seed(tc.seed, step, j))
            batch = _collate(tokenizer, step_examples(examples, step, batch_size=tc.batch_size, world_size=width,
                                                      rank=j, seed=tc.seed), tc.max_length, tc.loss_on)
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = engine(batch["input_ids"], batch["attention_mask"], batch["labels"])
            engine.backward(loss if weight == 1.0 else loss * weight)
            engine.step()  # an optimizer step only at the accumulation boundary
            if weight:
                window += torch.tensor([float(loss.detach()), 1.0, float(batch["attention_mask"].sum())],
                                       dtype=torch.float64)
        step += 1
        w.hook("after_step", step=step, rank=rank)
        if step == 1 or step % tc.log_every == 0 or step == total:
            dist.all_reduce(window, group=cpu_group)  # mean loss over micro-batches and steps; tokens summed
            mean_loss = float(window[0] / window[1])
            m["tokens"] += int(window[2])
            m["losses"].append([step, round(mean_loss, 6)])
            m["first_loss"] = mean_loss if m["first_loss"] is None else m["first_loss"]
            m["last_loss"] = mean_loss
            elapsed = time.perf_counter() - t0
            m["seconds"] = seconds0 + elapsed
            rate = (m["tokens"] / m["seconds"]) if m["seconds"] else 0.0
            eta = elapsed / (step - step0) * (total - step)
            log0(f"step {step}/{total}  loss {mean_loss:.4f}  {rate:.0f} tok/s  "
                 f"elapsed {_fmt_s(m['seconds'])}  eta {_fmt_s(eta)}")
            window.zero_()
        m["steps"] = step
        if step % tc.checkpoint_every == 0 and step < total:
            m["seconds"] = seconds0 + (time.perf_counter() - t0)

            def files(d: Path, engine=engine, model=peft_model):
                engine.save_checkpoint(str(d / "ds"), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
                (d / "rng").mkdir(exist_ok=True)
                torch.save(torch.get_rng_state(), d / "rng" / f"rank{rank}.pt")
                if portable_ok:  # collectives: every rank gathers, rank 0 writes
                    moments, opt_step = gather_training_state(engine, model)
                    params = consolidated_adapter_state(model)
                    if rank == 0:
                        _write_portable_state(d, params, moments, opt_step)

            # Window statistics not yet logged are dropped from the loss curve on resume (logging only).
            report(PHASE_TRAIN, {"step": step, "width": width, "metrics": dict(m)}, files)
    m["seconds"] = round(seconds0 + (time.perf_counter() - t0), 3)
    m["tokens_per_second"] = round(m["tokens"] / m["seconds"], 2) if m["seconds"] else None
    adapter_state = consolidated_adapter_state(peft_model)
    w.hook("after_train", engine=engine, tokenizer=tokenizer, metrics=m, rank=rank)
    del engine, peft_model
    import gc

    gc.collect()
    return adapter_state, m
