"""Warm-start + distributed μ̄ calibration as one Ray Train ``TorchTrainer`` run with DeepSpeed ZeRO.

Driver (``run_ray`` / ``svd-ray train`` / ``jobs/warmstart.py``)
    loads the task data once (disjoint, seeded, recorded splits), ships the examples to the workers in the
    loop config and starts ``TorchTrainer`` with ``num_workers`` workers (gloo on CPU, NCCL on GPU).
    Run name = ``run_id``; storage = ``<store>/ray-train`` (a local folder for ``file://`` stores, the same
    bucket for ``s3://``). Ray Train resumes a run with the same name and storage from its latest
    checkpoint: resubmitting a run id continues it instead of starting over.

Worker loop (``train_loop_per_worker``), three phases, each ending in a checkpoint:
    train       DeepSpeed engine (ZeRO 0/2/3, fp32/bf16) around the PEFT model. Each step every rank takes
                its slice of the global batch (``step_examples``: a pure function of the step number, so a
                resumed run sees exactly the data it would have seen) and computes ``causal_lm_loss`` through
                ``DualModel`` — the code path decoding uses. Every ``checkpoint_every`` steps: DeepSpeed
                checkpoint (adapter + optimizer partitions, frozen base weights excluded) + per-rank RNG.
    trained     the adapter's full fp32 weights (``safe_get_full_fp32_param``: correct for ZeRO-2/3 and bf16
                master weights) are saved; a fresh fp32 PEFT model is built from them on every rank.
    calibrate   every rank teacher-forces its contiguous shard of the calibration split with the adapter on
                and off, the μ statistics and Σδ are all-reduced, rank 0 publishes the bundle through the
                store (version = run id: a retried publish of the same run is recognised and not duplicated).

Progress: rank 0 writes ``step i/N  loss …  tok/s …  eta …`` lines to stdout (loss and tokens all-reduced
over ranks); Ray forwards worker stdout to the driver, and to the job logs under Ray Jobs.

Fault injection (tests): ``SVD_RAY_TEST_FAIL_AT_STEP=K`` in the *driver's* environment makes rank
``SVD_RAY_TEST_FAIL_RANK`` (default: the last rank) ``os._exit(1)`` right after optimizer step K, once per run
(a marker file records that it happened: next to the run's checkpoints for ``file://`` stores, else in the
temp dir, or ``SVD_RAY_TEST_FAIL_MARKER``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from svd_ray.config import RunConfig

ENV_FAIL_AT_STEP = "SVD_RAY_TEST_FAIL_AT_STEP"
ENV_FAIL_RANK = "SVD_RAY_TEST_FAIL_RANK"
ENV_FAIL_MARKER = "SVD_RAY_TEST_FAIL_MARKER"
TRAIN_STORAGE_DIR = "ray-train"
CONFIG_RECORD = "svd_ray_run_config.json"
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


def config_fingerprint(cfg: RunConfig) -> str:
    """Hash of everything that determines the trained adapter (not cluster size/retries or the store)."""
    relevant = {k: cfg.model_dump()[k] for k in ("model", "peft", "data", "training")}
    relevant["zero_stage"] = cfg.cluster.zero_stage
    relevant["precision"] = cfg.cluster.precision
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def train_storage(cfg: RunConfig):
    """``(pyarrow filesystem or None, path)`` where Ray Train keeps this store's run checkpoints."""
    from svd_ray.store import pyarrow_filesystem_for

    fs, path = pyarrow_filesystem_for(cfg.store)
    return fs, path.rstrip("/") + "/" + TRAIN_STORAGE_DIR


def _emit(line: str) -> None:
    """Write a progress line to the real stdout (bypasses Ray Train's print patch; Ray forwards it)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# ============================================================================ worker side


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


def _init_engine(peft_model, cfg: RunConfig, world_size: int):
    import deepspeed

    from svd_ray.training.deepspeed_config import deepspeed_config

    module = DualLossModule(peft_model)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=trainable,
        config=deepspeed_config(cfg.cluster, cfg.training, world_size),
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


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


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


def _maybe_fail(fail: dict | None, step: int, rank: int) -> None:
    if not fail or step != fail["step"] or rank != fail["rank"]:
        return
    marker = Path(fail["marker"])
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} exited at step {step}\n")
    # Ray Train's controller registers a reported checkpoint when it next polls the workers (every
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S = 2 s); a crash before that loses the newest checkpoint and the run
    # resumes from the one before. Wait past one poll so tests resume from the latest report deterministically.
    time.sleep(fail.get("delay_s", 5.0))
    _emit(f"[fault injection] rank {rank} exits after step {step}")
    os._exit(1)


def train_loop_per_worker(loop_cfg: dict) -> None:
    """The Ray Train worker function (see the module docstring)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from svd_ray.training.distributed_calibration import calibrate_distributed, randomize_adapter

    _quiet_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = RunConfig.model_validate(loop_cfg["cfg"])
    if not cfg.cluster.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no "unable to detect GPU" warning per worker
    torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    torch.set_flush_denormal(True)
    device = ray.train.torch.get_device() if cfg.cluster.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cpu_group = _cpu_group()
    tag = f"[{cfg.run_id}]"
    mode = loop_cfg.get("mode", "full")
    t_start = time.perf_counter()

    def log0(line: str) -> None:
        if rank == 0:
            _emit(f"{tag} {line}")

    # ------------------------------------------------------------------ resume point
    state: dict = {"phase": PHASE_TRAIN, "step": 0, "metrics": {}}
    ckpt = ray.train.get_checkpoint()
    ckpt_dir_ctx = ckpt.as_directory() if ckpt else None
    ckpt_dir = Path(ckpt_dir_ctx.__enter__()) if ckpt_dir_ctx else None
    try:
        if ckpt_dir is not None:
            state = _read_json(ckpt_dir / "state.json")
            if state.get("fingerprint") not in (None, loop_cfg["fingerprint"]):
                raise ValueError(f"{tag} checkpoint was made with a different config; use a new run_id")
            log0(f"resuming from checkpoint: phase {state['phase']}, step {state['step']}")

        def report(phase: str, metrics: dict, files) -> None:
            """Checkpointed report (a barrier). ``files(dir)`` writes this rank's files."""
            with tempfile.TemporaryDirectory(prefix=f"svd-ray-ckpt-r{rank}-") as tmp:
                files(Path(tmp))
                if rank == 0:
                    payload = {"phase": phase, "fingerprint": loop_cfg["fingerprint"], "world_size": world,
                               "run_id": cfg.run_id, **metrics}
                    (Path(tmp) / "state.json").write_text(json.dumps(payload, indent=1, default=str))
                ray.train.report({"phase": phase, "step": metrics.get("step", 0)},
                                 checkpoint=Checkpoint.from_directory(tmp))

        # -------------------------------------------------------------- training
        adapter_state = None
        metrics = state.get("metrics", {})
        if mode == "calibrate":  # test/diagnostic mode: a fixed, seeded adapter, no training
            pass
        elif state["phase"] == PHASE_TRAIN:
            adapter_state, metrics = _train(cfg, loop_cfg, rank, world, device, ckpt_dir, state, report, log0,
                                            cpu_group)
            report(PHASE_TRAINED, {"step": metrics["steps"], "metrics": metrics},
                   lambda d: _save_adapter_state(d, adapter_state) if rank == 0 else None)
        elif state["phase"] == PHASE_TRAINED:
            from safetensors.torch import load_file

            adapter_state = load_file(str(ckpt_dir / "adapter_state.safetensors"))
        else:  # PHASE_DONE: keep the final files to report them again
            kept = {f.name: f.read_bytes() for f in ckpt_dir.iterdir() if f.suffix == ".pt"}
    finally:
        if ckpt_dir_ctx is not None:
            ckpt_dir_ctx.__exit__(None, None, None)

    if state.get("phase") == PHASE_DONE:  # a completed run was resubmitted: nothing left to do
        log0(f"run already complete: {state.get('published', {}).get('task')}@{state.get('published', {}).get('version')}")
        report(PHASE_DONE, {k: v for k, v in state.items() if k not in ("phase", "fingerprint", "world_size", "run_id")},
               lambda d: [(d / name).write_bytes(data) for name, data in kept.items()] if rank == 0 else None)
        return

    # ------------------------------------------------------------------ calibration
    peft_model, tokenizer, ref = _fresh_model(cfg, device)
    if mode == "calibrate":
        randomize_adapter(peft_model, loop_cfg.get("adapter_seed", 0))
    else:
        load_adapter_state(peft_model, adapter_state)
    peft_model.eval()
    examples = loop_cfg["calibration"]
    t_cal = time.perf_counter()
    log0(f"calibrating μ̄ on {len(examples)} examples over {world} worker(s)")
    acc = calibrate_distributed(
        peft_model, tokenizer, examples, alpha=cfg.calibration.alpha, batch_size=cfg.calibration.batch_size,
        max_length=cfg.training.max_length, group=cpu_group, progress=f"{tag} calibrating (rank 0 shard)",
        progress_write=_emit, trim=cfg.calibration.trim,
    )
    cal_metrics = {"examples": len(examples), "tokens": acc.count, "workers": world,
                   "seconds": round(time.perf_counter() - t_cal, 3)}
    log0(f"calibrated on {acc.count} answer tokens in {cal_metrics['seconds']:.1f}s: μ̄ mean {acc.mean():+.4f}, "
         f"median {acc.median():+.4f}, sequence {acc.sequence_level():+.4f}")

    probe = None
    if loop_cfg.get("probe_text"):  # tests: logits of the calibrated model on a fixed text
        enc = tokenizer(loop_cfg["probe_text"], return_tensors="pt")
        with torch.no_grad():
            from svd_ray.decoding import DualModel

            probe = DualModel(peft_model).teacher_forced_logits(enc["input_ids"].to(device), with_base=False)[0].cpu()

    published = None
    if rank == 0 and mode == "full":
        all_metrics = {"train": metrics, "calibration": cal_metrics}
        if loop_cfg.get("lr_search"):
            all_metrics["lr_search"] = loop_cfg["lr_search"]
        published = _publish(cfg, ref, peft_model, acc, loop_cfg["split"], all_metrics)
        log0(("already published " if published["already_published"] else "published ")
             + f"{published['task']}@{published['version']} to {cfg.store}")

    def final_files(d: Path) -> None:
        if rank != 0:
            return
        torch.save(acc.state_dict(), d / "calibration.pt")
        if probe is not None:
            torch.save(probe, d / "probe_logits.pt")

    report(PHASE_DONE, {"step": metrics.get("steps", 0), "metrics": metrics, "calibration": cal_metrics,
                        "mu": {"mean": acc.mean(), "median": acc.median(), "sequence": acc.sequence_level()},
                        "published": published, "seconds_this_attempt": round(time.perf_counter() - t_start, 3)},
           final_files)


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


def _train(cfg: RunConfig, loop_cfg: dict, rank: int, world: int, device, ckpt_dir, state: dict, report, log0,
           cpu_group=None):
    """Phase ``train``: returns (consolidated adapter state, training metrics)."""
    import torch.distributed as dist

    from svd_ray.training.local import planned_steps, prepare_model

    _quiet_deepspeed()
    tc = cfg.training
    examples = loop_cfg["train"]
    total = planned_steps(len(examples), cfg, world)
    peft_model, tokenizer, _ = prepare_model(cfg)  # seeded: the same fresh adapter on every rank
    engine = _init_engine(peft_model, cfg, world)
    step = 0
    m = {"steps": 0, "tokens": 0, "seconds": 0.0, "first_loss": None, "last_loss": None, "losses": [],
         "world_size": world, "zero_stage": cfg.cluster.zero_stage, "precision": cfg.cluster.precision,
         "resumed_from": []}
    if ckpt_dir is not None and state["phase"] == PHASE_TRAIN and state["step"] > 0:
        if state.get("world_size") != world:
            raise ValueError(
                f"checkpoint of run {cfg.run_id} was written by {state.get('world_size')} workers, this run has "
                f"{world}: ZeRO optimizer partitions cannot be resharded; use the same cluster.num_workers"
            )
        engine.load_checkpoint(str(ckpt_dir / "ds"), tag=DS_TAG, load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=False)
        torch.set_rng_state(torch.load(ckpt_dir / "rng" / f"rank{rank}.pt", weights_only=False))
        step = state["step"]
        m = dict(state["metrics"])
        m["resumed_from"] = list(m.get("resumed_from", [])) + [step]
    engine.train()
    if step == 0:
        log0(f"warm-start: {cfg.model} + {cfg.peft.method}, {len(examples)} examples, {total} steps × "
             f"{tc.batch_size}×{world} examples, DeepSpeed ZeRO-{cfg.cluster.zero_stage} {cfg.cluster.precision}, "
             f"lr {tc.lr}, loss on {tc.loss_on} tokens")
    t0, step0, seconds0 = time.perf_counter(), step, float(m.get("seconds", 0.0))
    window = torch.zeros(3, dtype=torch.float64)  # Σ loss, steps, tokens since the last log line
    while step < total:
        batch = _collate(tokenizer, step_examples(examples, step, batch_size=tc.batch_size, world_size=world,
                                                  rank=rank, seed=tc.seed), tc.max_length, tc.loss_on)
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss = engine(batch["input_ids"], batch["attention_mask"], batch["labels"])
        engine.backward(loss)
        engine.step()
        step += 1
        window += torch.tensor([float(loss.detach()), 1.0, float(batch["attention_mask"].sum())], dtype=torch.float64)
        _maybe_fail(loop_cfg.get("fail"), step, rank)
        if step == 1 or step % tc.log_every == 0 or step == total:
            dist.all_reduce(window, group=cpu_group)  # mean loss over ranks and steps; tokens summed over ranks
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

            def files(d: Path, _step=step):
                engine.save_checkpoint(str(d / "ds"), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
                (d / "rng").mkdir(exist_ok=True)
                torch.save(torch.get_rng_state(), d / "rng" / f"rank{rank}.pt")

            # Window statistics not yet logged are dropped from the loss curve on resume (logging only).
            report(PHASE_TRAIN, {"step": step, "metrics": dict(m)}, files)
    m["seconds"] = round(seconds0 + (time.perf_counter() - t0), 3)
    m["tokens_per_second"] = round(m["tokens"] / m["seconds"], 2) if m["seconds"] else None
    adapter_state = consolidated_adapter_state(peft_model)
    probe = loop_cfg.get("probe_text")
    if probe:  # tests: logits through the DeepSpeed engine itself (ZeRO-3: gathered by its hooks)
        engine.eval()
        enc = tokenizer(probe, return_tensors="pt")
        with torch.no_grad():
            m["engine_probe"] = engine(enc["input_ids"].to(engine.device), enc["attention_mask"].to(engine.device),
                                       logits_only=True).float().cpu().tolist()
    del engine, peft_model
    import gc

    gc.collect()
    return adapter_state, m


# ============================================================================ driver side


def _fail_injection(cfg: RunConfig) -> dict | None:
    step = os.environ.get(ENV_FAIL_AT_STEP)
    if not step:
        return None
    fs, path = train_storage(cfg)
    rank = int(os.environ.get(ENV_FAIL_RANK, cfg.cluster.num_workers - 1))
    marker = os.environ.get(ENV_FAIL_MARKER) or (
        str(Path(path) / cfg.run_id / ".fault-injected") if fs is None
        else str(Path(tempfile.gettempdir()) / f"svd-ray-fault-{cfg.run_id}")  # single-node clusters only
    )
    return {"step": int(step), "rank": rank, "marker": marker}


def _check_run_record(cfg: RunConfig) -> None:
    """Refuse to resume a run id whose existing checkpoints came from a different config."""
    fs, path = train_storage(cfg)
    record = {"run_id": cfg.run_id, "fingerprint": config_fingerprint(cfg), "config": cfg.model_dump()}
    key = f"{path}/{cfg.run_id}/{CONFIG_RECORD}"
    if fs is None:
        p = Path(key)
        if p.exists():
            old = _read_json(p)
            if old.get("fingerprint") != record["fingerprint"]:
                raise ValueError(
                    f"run_id {cfg.run_id!r} already has checkpoints in {path} from a different config "
                    "(model/peft/data/training/zero/precision); use a new run_id to start over"
                )
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(record, indent=1, default=str))
        return
    from pyarrow import fs as pafs

    info = fs.get_file_info(key)
    if info.type == pafs.FileType.File:
        with fs.open_input_stream(key) as fh:
            old = json.loads(fh.read())
        if old.get("fingerprint") != record["fingerprint"]:
            raise ValueError(f"run_id {cfg.run_id!r} already has checkpoints from a different config; use a new run_id")
        return
    with fs.open_output_stream(key) as fh:
        fh.write(json.dumps(record, indent=1, default=str).encode())


def build_trainer(cfg: RunConfig, task_data, *, mode: str = "full", extra: dict | None = None):
    """The ``TorchTrainer`` for ``cfg`` (``mode="calibrate"``: no training, a seeded random adapter)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from svd_ray.training.deepspeed_config import dist_backend

    fs, storage = train_storage(cfg)
    if fs is None:
        Path(storage).mkdir(parents=True, exist_ok=True)
    loop_cfg = {
        "cfg": cfg.model_dump(),
        "fingerprint": config_fingerprint(cfg),
        "mode": mode,
        "train": list(task_data.train),
        "calibration": list(task_data.calibration),
        "split": task_data.split,
        "fail": _fail_injection(cfg),
        **(extra or {}),
    }
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if cfg.cluster.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        torch_config=TorchConfig(backend=dist_backend(cfg.cluster)),
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
                                     resources_per_worker=resources),
        run_config=RayRunConfig(
            name=cfg.run_id,
            storage_path=storage,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's per-report INFO lines drown the progress lines; failures/retries are WARNING+.
            logging_config=LoggingConfig(log_level=os.environ.get("SVD_RAY_TRAIN_LOG_LEVEL", "WARNING")),
        ),
    )


def fit(cfg: RunConfig, task_data, *, mode: str = "full", extra: dict | None = None):
    """Run (or resume) the Ray Train run; returns the final checkpoint's ``state.json`` plus paths."""
    if mode == "full":
        _check_run_record(cfg)
    trainer = build_trainer(cfg, task_data, mode=mode, extra=extra)
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError and friends: one readable line for CLIs
        raise RuntimeError(f"training run {cfg.run_id!r} failed: {exc}") from exc
    if result.error is not None:
        raise RuntimeError(f"training run {cfg.run_id!r} failed: {result.error}")
    if result.checkpoint is None:
        raise RuntimeError(f"training run {cfg.run_id!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        out = _read_json(d / "state.json")
        from svd_ray.calibration import MuAccumulator

        out["accumulator"] = MuAccumulator.from_state_dict(torch.load(d / "calibration.pt", weights_only=False))
        if (d / "probe_logits.pt").exists():
            out["probe_logits"] = torch.load(d / "probe_logits.pt")
    out["checkpoint_path"] = result.checkpoint.path
    out["run_path"] = result.path
    return out


def _ensure_ray(address: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address or None)


def run_ray(cfg: RunConfig, log=print, *, address: str | None = None, task_data=None) -> dict:
    """Warm-start + calibrate + publish via Ray Train (what ``run_local`` does before its evaluation).

    Connects to ``address`` / ``$RAY_ADDRESS`` or starts a local Ray. Returns a dict with ``task``,
    ``version``, ``mu`` (chosen estimator's value), ``estimates``, ``train`` and ``calibration`` metrics,
    ``accumulator`` (the all-reduced ``MuAccumulator``), ``task_data`` and the checkpoint path.
    """
    from svd_ray.bundle import steering_from_accumulator
    from svd_ray.training.task_data import load_task_data

    t0 = time.perf_counter()
    data = task_data if task_data is not None else load_task_data(cfg.data)
    log(f"task {data.name}: {len(data.train)} train / {len(data.calibration)} calibration / {len(data.eval_mc)} eval "
        f"(split seed {cfg.data.seed})")
    for note in data.notes:
        log(f"note: {note}")
    log(f"Ray Train: {cfg.cluster.num_workers} worker(s), {'GPU' if cfg.cluster.use_gpu else 'CPU'}, "
        f"DeepSpeed ZeRO-{cfg.cluster.zero_stage} {cfg.cluster.precision}; run {cfg.run_id} "
        f"(checkpoints in {train_storage(cfg)[1]})")
    if not address and not os.environ.get("RAY_ADDRESS"):
        # Local cluster: the workers share this machine's cache, so prepare the base model once here
        # instead of letting N workers wait on one another's build (they still re-check it, and on a
        # multi-node cluster each node builds once under the cache lock).
        from svd_ray.models import resolve_model

        resolve_model(cfg.model)
    _ensure_ray(address)
    from svd_ray.training.lr_search import resolve_lr

    cfg, lr_search = resolve_lr(cfg, data.train, data.calibration, log=log)  # Tune trials on this cluster
    out = fit(cfg, data, extra={"lr_search": lr_search} if lr_search else None)
    acc = out["accumulator"]
    steering = steering_from_accumulator(acc, cfg.calibration.alpha, cfg.calibration.estimator, cfg.calibration.trim)
    pub = out.get("published") or {}
    train = out.get("metrics", {})
    log(f"trained {train.get('steps')} steps, loss {train.get('first_loss') or float('nan'):.4f} → "
        f"{train.get('last_loss') or float('nan'):.4f}, {train.get('tokens_per_second')} tok/s")
    log(f"μ̄ ({steering.estimator}) = {steering.mu:+.4f} over {acc.count} calibration tokens; "
        f"published {pub.get('task')}@{pub.get('version')} to {cfg.store}")
    return {
        "run_id": cfg.run_id,
        "task": pub.get("task", cfg.task),
        "version": pub.get("version"),
        "published": pub,
        "mu": steering.mu,
        "estimator": steering.estimator,
        "estimates": steering.estimates,
        "mu_star": steering.summary,
        "train": train,
        "calibration": out.get("calibration"),
        "accumulator": acc,
        "task_data": data,
        "lr_search": lr_search,
        "checkpoint_path": out["checkpoint_path"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """``python jobs/warmstart.py CONFIG.yaml [--set k=v ...]`` (the Ray Jobs entrypoint)."""
    import argparse

    from svd_ray.training.cli import load_config

    parser = argparse.ArgumentParser(prog="warmstart", description="SVDecode warm-start + calibration on Ray Train")
    parser.add_argument("config", help="YAML run config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except (ValueError, FileNotFoundError) as exc:
        print(f"warmstart: error: {exc}", file=sys.stderr)
        return 2
    result = run_ray(cfg)
    summary = {k: result[k] for k in ("run_id", "task", "version", "mu", "estimator", "estimates", "seconds")}
    print("RESULT " + json.dumps(summary, default=str), flush=True)
    return 0
