"""Warm-start learning rate chosen per task on calibration loss only: a small Ray Tune grid search.

The paper's lr 5e-5 for one epoch was tuned for 7B models; on a 135M model it barely moves the adapter, so
δ has little to work with. Each trial warm-starts a fresh adapter (same seed, same data order) for
``lr_search.steps`` steps at one candidate lr and reports the adapter's mean NLL on the calibration split's
answer tokens — the data calibration uses anyway, never evaluation data:

    lr* = argmin_lr  (1/T) Σ_{t ∈ calibration answer tokens} −log p_φ(lr)(y_t | y_<t)

Trials run as Ray Tune trials on whatever Ray cluster the job has (a local Ray for the embedded default).
The full warm-start then runs at lr*, and the record (candidates, losses, choice) is kept in the bundle's
manifest (``meta.metrics.lr_search``). ``training.lr_search: null`` (the default) keeps ``training.lr`` as
given — the paper's setting is one config away.

A trial sees only the first ``steps`` steps; the full warm-start at the same lr can still diverge later
(measured: TruthfulQA × P-Tuning v2, lr 3e-3: 1.70 nats/token after the 48-step trial, 7.1 after the
327-step run, an adapter that generates nothing). So the full run is checked on the same objective —
the plain adapter's calibration NLL, which calibration computes anyway (μ = 0 of the validation grid):

    accept lr  iff  L_final(lr) ≤ FINAL_LOSS_RATIO · L_trial(lr)

and otherwise the warm-start is redone at the next lr in trial order (``train_with_fallback``); a rejected
adapter is never published, and every check is recorded in ``lr_search.final_checks``.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time

import torch

from svd_ray.config import RunConfig

# How much worse than its own trial a full warm-start may end before its lr is rejected. A longer run at a
# sound lr ends below its trial (measured: 0.18–0.94× on the seven other SmolLM2 cells of the reproduction,
# 4.2× on the one that diverged); 1.25 leaves
# room for noise on small calibration splits and still catches a run that drifted or blew up.
FINAL_LOSS_RATIO = 1.25


@torch.no_grad()
def calibration_loss(peft_model, tokenizer, examples, cfg: RunConfig) -> float:
    """Token-weighted mean NLL of the adapter on ``examples``' answer tokens (no dropout)."""
    from svd_ray.decoding import DualModel
    from svd_ray.training.batches import batches
    from svd_ray.training.steps import causal_lm_loss

    dual = DualModel(peft_model)
    was_training = peft_model.training
    peft_model.eval()
    total, tokens = 0.0, 0
    try:
        for batch in batches(tokenizer, examples, cfg.calibration.batch_size, cfg.training.max_length, "answer"):
            loss, n = causal_lm_loss(dual, batch)
            if n:
                total += float(loss) * n
                tokens += n
    finally:
        peft_model.train(was_training)
    if tokens == 0:
        raise ValueError("the calibration split has no answer tokens to score the lr trials on")
    return total / tokens


def trial_config(cfg: RunConfig, lr: float) -> RunConfig:
    """The run one trial trains: ``cfg`` at ``lr`` for the search's step budget (never more than the run's)."""
    search = cfg.training.lr_search
    steps = search.steps if cfg.training.max_steps is None else min(search.steps, cfg.training.max_steps)
    training = cfg.training.model_copy(update={"lr": lr, "max_steps": steps, "lr_search": None})
    return cfg.model_copy(update={"training": training})


def run_trial(cfg: RunConfig, lr: float, train, calibration, threads: int = 1) -> dict:
    """One trial in this process: fresh adapter → ``steps`` warm-start steps at ``lr`` → calibration loss."""
    from svd_ray.training.local import prepare_model, train_local

    torch.set_num_threads(max(1, threads))
    torch.set_flush_denormal(True)
    run = trial_config(cfg, lr)
    t0 = time.perf_counter()
    peft_model, tokenizer, _ = prepare_model(run)
    metrics = train_local(peft_model, tokenizer, train, run, log=lambda _line: None)
    loss = calibration_loss(peft_model, tokenizer, calibration, run)
    return {"lr": lr, "calibration_loss": loss if math.isfinite(loss) else float("inf"),
            "train_loss": metrics.last_loss, "steps": metrics.steps, "seconds": round(time.perf_counter() - t0, 1)}


def _tune_trainable(config: dict, cfg: dict, train, calibration, threads: int) -> None:
    from ray import tune

    tune.report(run_trial(RunConfig.model_validate(cfg), config["lr"], train, calibration, threads))


def choose(trials: list[dict]) -> float:
    """The lr with the lowest calibration loss; ties go to the smaller lr (the more conservative step)."""
    finite = [t for t in trials if math.isfinite(t["calibration_loss"])]
    if not finite:
        raise RuntimeError("every lr trial diverged (non-finite calibration loss)")
    return min(finite, key=lambda t: (t["calibration_loss"], t["lr"]))["lr"]


def search_lr(cfg: RunConfig, train, calibration, log=print) -> dict:
    """Run the grid as Ray Tune trials (starting a local Ray if none is running) and return the record
    ``{"candidates", "trials", "chosen", "steps", "seconds"}`` (trials sorted by lr)."""
    import ray
    from ray import tune

    search = cfg.training.lr_search
    if search is None:
        raise ValueError("training.lr_search is not set")
    t0 = time.perf_counter()
    threads = max(1, int(search.cpus_per_trial))
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as the eval shards (platform notes: Ray 2.60)
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            from svd_ray.models import resolve_model

            resolve_model(cfg.model)  # trials share this machine's cache: build the model once, here
            ray.init(num_cpus=max(threads, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
    log(f"  lr search (Ray Tune): {len(search.lrs)} trials × {trial_config(cfg, search.lrs[0]).training.max_steps} "
        f"steps, lrs {', '.join(f'{lr:g}' for lr in search.lrs)}; scored on {len(calibration)} calibration examples")
    storage = tempfile.mkdtemp(prefix="svd-ray-tune-")
    try:
        trainable = tune.with_parameters(_tune_trainable, cfg=cfg.model_dump(), train=list(train),
                                         calibration=list(calibration), threads=threads)
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": search.cpus_per_trial}),
            param_space={"lr": tune.grid_search(list(search.lrs))},
            tune_config=tune.TuneConfig(metric="calibration_loss", mode="min",
                                        max_concurrent_trials=search.max_concurrent_trials),
            run_config=tune.RunConfig(name=f"lr-{cfg.run_id}", storage_path=storage, verbose=0),
        )
        grid = tuner.fit()
        errors = [r.error for r in grid if r.error is not None]
        if errors:
            raise RuntimeError(f"lr search trial failed: {errors[0]}")
        trials = sorted(({k: r.metrics[k] for k in ("lr", "calibration_loss", "train_loss", "steps", "seconds")}
                         for r in grid), key=lambda t: t["lr"])
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    chosen = choose(trials)
    for t in trials:
        log(f"    lr {t['lr']:<8g} calibration loss {t['calibration_loss']:.4f}  (train loss {t['train_loss']:.4f})"
            + ("  ← chosen" if t["lr"] == chosen else ""))
    return {"candidates": list(search.lrs), "trials": trials, "chosen": chosen,
            "steps": trials[0]["steps"], "seconds": round(time.perf_counter() - t0, 1)}


def fallback_order(record: dict) -> list[float]:
    """The searched lrs to try for the full warm-start, best trial first (``choose``'s order; diverged
    trials are never tried)."""
    finite = [t for t in record["trials"] if math.isfinite(t["calibration_loss"])]
    return [t["lr"] for t in sorted(finite, key=lambda t: (t["calibration_loss"], t["lr"]))]


def final_loss_bound(record: dict, lr: float) -> float:
    """The highest calibration loss the full warm-start at ``lr`` may end with: FINAL_LOSS_RATIO × its
    trial's loss."""
    trial = next(t for t in record["trials"] if t["lr"] == lr)
    return FINAL_LOSS_RATIO * trial["calibration_loss"]


def final_calibration_loss(acc) -> float:
    """The trained adapter's calibration loss, from calibration's own sums: the validation's NLL per answer
    token at μ = 0 unmasked — the same objective ``calibration_loss`` scores the trials on."""
    if acc.validation is None:
        raise ValueError("this accumulator has no μ validation (it holds the μ = 0 NLL the check needs)")
    return float(acc.validation.choose()["nll_per_token_at_0"])


def check_final(lr: float, loss: float, bound: float) -> dict:
    """One full warm-start's verdict, JSON-ready (recorded in the bundle whether accepted or not)."""
    ok = math.isfinite(loss) and loss <= bound
    return {"lr": lr, "final_calibration_loss": loss, "bound": bound, "accepted": ok,
            "reason": (f"lr {lr:g}: final calibration loss {loss:.4f} ≤ {bound:.4f}, the bound its trial sets" if ok
                       else f"lr {lr:g}: final calibration loss {loss:.4f} > {bound:.4f}, the bound its trial "
                       f"sets: the full warm-start drifted past its trial")}


def retry_run(run: RunConfig, lr: float, attempt: int) -> RunConfig:
    """``run`` at ``lr``; later attempts get their own run id (checkpoints, bundle version), same task."""
    training = run.training.model_copy(update={"lr": lr})
    update = {"training": training}
    if attempt:
        update |= {"run_id": f"{run.run_id[:58]}-r{attempt}", "task_name": run.task}
    return run.model_copy(update=update)


def train_with_fallback(run: RunConfig, record: dict | None, attempt, log=print):
    """Warm-start at the searched lr, falling back to the next lr while the full run fails its check.

    ``attempt(run, bound, record) -> (result, final loss)`` trains ``run`` (``bound``: the check it must
    pass, None without a search; ``record``: the search record with the checks so far, for the bundle).
    Returns ``(the run that was accepted, its result, the record with every check)``."""
    if record is None:
        return run, attempt(run, None, None)[0], None
    checks: list[dict] = []
    for i, lr in enumerate(fallback_order(record)):
        r = retry_run(run, lr, i)
        bound = final_loss_bound(record, lr)
        result, loss = attempt(r, bound, {**record, "final_checks": list(checks)})
        checks.append(check_final(lr, loss, bound))
        log(f"  warm-start check: {checks[-1]['reason']}")
        if checks[-1]["accepted"]:
            return r, result, {**record, "chosen": lr, "final_checks": checks}
    raise RuntimeError("every searched lr failed the full warm-start check: "
                       + "; ".join(c["reason"] for c in checks))


def resolve_lr(cfg: RunConfig, train, calibration, log=print) -> tuple[RunConfig, dict | None]:
    """(the run to train — at the searched lr when ``training.lr_search`` is set — and the search record)."""
    if cfg.training.lr_search is None:
        return cfg, None
    record = search_lr(cfg, train, calibration, log=log)
    return cfg.model_copy(update={"training": cfg.training.model_copy(update={"lr": record["chosen"]})}), record
