"""The Ray Train driver: warm-start + distributed μ̄ calibration as one ``TorchTrainer`` run with DeepSpeed ZeRO.

``run_ray`` (``svd-ray train``, ``jobs/warmstart.py``, ``svd-ray submit train``) loads the task data once
(disjoint, seeded, recorded splits), optionally chooses the warm-start lr with Ray Tune trials on the same
cluster (``training.lr_search``), ships the examples to the workers in the loop config and starts
``TorchTrainer`` with ``num_workers`` workers (gloo on CPU, NCCL on GPU) running
``svd_ray.training.ray_worker.train_loop_per_worker``.

Run name = ``run_id``; storage = ``<store>/ray-train`` (a local folder for ``file://`` stores, the same bucket
for ``s3://``). Ray Train resumes a run with the same name and storage from its latest checkpoint:
resubmitting a run id continues it instead of starting over; a run id whose checkpoints came from a different
config is refused (``_check_run_record``).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from svd_ray.config import RunConfig
from svd_ray.training.ray_worker import train_loop_per_worker

TRAIN_STORAGE_DIR = "ray-train"
CONFIG_RECORD = "svd_ray_run_config.json"


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


def _check_run_record(cfg: RunConfig) -> None:
    """Refuse to resume a run id whose existing checkpoints came from a different config."""
    fs, path = train_storage(cfg)
    record = {"run_id": cfg.run_id, "fingerprint": config_fingerprint(cfg), "config": cfg.model_dump()}
    key = f"{path}/{cfg.run_id}/{CONFIG_RECORD}"
    if fs is None:
        p = Path(key)
        if p.exists():
            old = json.loads(p.read_text())
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


def worker_count(cluster) -> int | tuple[int, int]:
    """Ray Train's ``num_workers``: fixed, or ``(min, max)`` for an elastic run (``cluster.min_workers``)."""
    if cluster.min_workers is not None and cluster.min_workers < cluster.num_workers:
        return (cluster.min_workers, cluster.num_workers)
    return cluster.num_workers


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
        **(extra or {}),
    }
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if cfg.cluster.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        torch_config=TorchConfig(backend=dist_backend(cfg.cluster)),
        scaling_config=ScalingConfig(num_workers=worker_count(cfg.cluster), use_gpu=cfg.cluster.use_gpu,
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
        out = json.loads((d / "state.json").read_text())
        from svd_ray.calibration import MuAccumulator

        out["accumulator"] = MuAccumulator.from_state_dict(torch.load(d / "calibration.pt", weights_only=False))
        for pt in d.glob("*.pt"):  # tensors saved by an after_calibration hook (tests)
            if pt.name != "calibration.pt":
                out[pt.stem] = torch.load(pt)
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
    from svd_ray.training.lr_search import final_calibration_loss, resolve_lr, train_with_fallback

    cfg, lr_search = resolve_lr(cfg, data.train, data.calibration, log=log)  # Tune trials on this cluster

    def attempt(run: RunConfig, bound, record):
        # the workers check the bound themselves, so a rejected adapter is never published
        result = fit(run, data, extra={"lr_search": record, "max_final_loss": bound} if record else None)
        return result, final_calibration_loss(result["accumulator"]) if record else None

    cfg, out, lr_search = train_with_fallback(cfg, lr_search, attempt, log=log)
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
