"""The quickstart: warm-start → calibrate μ̄ → publish → load from the store → steer, before/after.

``svd-ray demo`` runs it on the embedded default (local storage, SmolLM2-135M, the built-in
addition task): the warm-start and calibration run as a Ray Train job (local Ray, 2 workers,
DeepSpeed ZeRO-2); ``--local`` keeps everything in this process.
"""
from __future__ import annotations

import time

from svd_ray.config import RunConfig
from svd_ray.eval import metrics


def _acc_table(rows: list[dict], names: list[str]) -> dict[str, float]:
    return {n: metrics.mean(metrics.acc(r[n], r["labels"]) for r in rows) for n in names}


def evaluate_bundle(cfg: RunConfig, task_data, log=print, version: str = "latest") -> dict:
    """Fetch the task's bundle from the store (verified against the base model) and measure before/after."""
    from svd_ray.decoding import GenerationConfig
    from svd_ray.engine import TaskModel
    from svd_ray.eval.mc_eval import score_items, standard_variants
    from svd_ray.models import model_fingerprint, resolve_model
    from svd_ray.store import open_store

    ref = resolve_model(cfg.model)
    fp = model_fingerprint(ref)
    store = open_store(cfg.store)
    path, manifest = store.fetch(
        cfg.task,
        version,
        expect={"base_model_id": fp["id"], "weights_sha256": fp["weights_sha256"], "tokenizer_sha256": fp["tokenizer_sha256"]},
    )
    tm = TaskModel.from_bundle(path, model=cfg.model)
    d = tm.data
    log(f"loaded {cfg.task}@{manifest.version} from {store.uri}: μ̄ ({d.estimator}) = {d.mu:+.4f}, α = {d.alpha}")
    variants = standard_variants(d.mu, d.alpha, d.mean_delta)
    rows = score_items(tm.dual, tm.tokenizer, task_data.eval_mc, variants)
    names = ["base", "peft", "svdecode", "svdecode_floor", "mask_only", "no_mask"] + (
        ["static"] if d.mean_delta is not None else []
    )
    mc = _acc_table(rows, names)
    gen_scores = {}
    sample = None
    if task_data.eval_gen:
        gen = GenerationConfig(max_new_tokens=4, stop_strings=("\n",))
        prompts = [g.prompt for g in task_data.eval_gen]
        for mode in ("off", "svdecode"):
            outs = tm.generate(prompts, gen, tm.steering(mode=mode))
            gen_scores["peft" if mode == "off" else "svdecode"] = metrics.mean(
                metrics.exact_match(o.text, g.references) for o, g in zip(outs, task_data.eval_gen)
            )
            if mode == "svdecode":
                sample = (prompts[0], outs[0].text)
    return {"version": manifest.version, "mu": d.mu, "estimates": d.estimates, "mc_acc": mc, "gen_exact_match": gen_scores,
            "sample": sample, "n_mc": len(rows), "n_gen": len(task_data.eval_gen)}


def print_report(result: dict, log=print) -> None:
    log("")
    log(f"μ̄ estimates: " + ", ".join(f"{k} {v:+.4f}" for k, v in result["estimates"].items()))
    log(f"{'variant':<16}{'MC acc (n=' + str(result['n_mc']) + ')':>18}{'gen exact (n=' + str(result['n_gen']) + ')':>22}")
    for name, value in result["mc_acc"].items():
        g = result["gen_exact_match"].get(name)
        log(f"{name:<16}{value:>18.3f}{'' if g is None else f'{g:.3f}':>22}")
    if result["sample"]:
        prompt, text = result["sample"]
        log(f"\nsample (SVDecode): {prompt!r} → {text!r}")
    mc = result["mc_acc"]
    log(f"\nbefore/after: MC accuracy base {mc['base']:.3f} → PEFT {mc['peft']:.3f} → PEFT+SVDecode {mc['svdecode']:.3f}")


def run_local(cfg: RunConfig, log=print) -> dict:
    """Warm-start and calibrate in this process, publish, then evaluate from the store."""
    from svd_ray.training.local import calibrate_local, prepare_model, train_local
    from svd_ray.training.publish import publish_bundle
    from svd_ray.training.task_data import load_task_data

    t0 = time.perf_counter()
    data = load_task_data(cfg.data)
    log(f"task {data.name}: {len(data.train)} train / {len(data.calibration)} calibration / {len(data.eval_mc)} eval")
    peft_model, tokenizer, ref = prepare_model(cfg)
    log(f"model {ref.name} + {cfg.peft.method}; warm-start ({cfg.training.epochs} epoch, lr {cfg.training.lr})")
    train_metrics = train_local(peft_model, tokenizer, data.train, cfg, log=log)
    acc = calibrate_local(peft_model, tokenizer, data.calibration, cfg)
    log(f"calibrated on {acc.count} answer tokens: μ̄ mean {acc.mean():+.4f}, median {acc.median():+.4f}, "
        f"sequence {acc.sequence_level():+.4f}")
    manifest = publish_bundle(cfg, ref, peft_model, acc, data.split, {"train": train_metrics.to_dict()})
    log(f"published {cfg.task}@{manifest.version}")
    result = evaluate_bundle(cfg, data, log=log, version=manifest.version)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print_report(result, log=log)
    return result


def run_ray(cfg: RunConfig, log=print) -> dict:
    """Warm-start and calibrate as a Ray Train job (DeepSpeed ZeRO, N workers), then evaluate from the store."""
    from svd_ray.training.ray_train import run_ray as train_on_ray

    t0 = time.perf_counter()
    out = train_on_ray(cfg, log=log)
    result = evaluate_bundle(cfg, out["task_data"], log=log, version=out["version"])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print_report(result, log=log)
    return result
