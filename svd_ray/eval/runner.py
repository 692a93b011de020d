"""The evaluation pipeline: for each task family × PEFT method, warm-start + calibrate (or reuse
the identical bundle), then score the evaluation items — sharded over Ray tasks — under every
steering variant, and report metrics with confidence intervals.

Scoring runs each item's adapter-on/off forward passes once and derives every variant from the
same logits (``svd_ray.eval.mc_eval``), so columns differ only in how logits are combined.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections import defaultdict
from pathlib import Path

from svd_ray.config import DataConfig, PeftConfig, RunConfig
from svd_ray.eval import metrics
from svd_ray.eval.config import EvalConfig

TQA_METRICS = ("mc1", "mc2", "mc3", "paper_mc1", "paper_mc2", "paper_mc3")
MAIN_VARIANTS = ("base", "peft", "svdecode")
ABLATIONS = (
    "svdecode",
    "svdecode_floor",
    "mask_only",
    "no_mask",
    "static",
    "svdecode_mu_mean",
    "svdecode_mu_median",
    "svdecode_mu_sequence",
    "svdecode_mu_trimmed_mean",
)


def run_config_for(cfg: EvalConfig, family, method: str) -> RunConfig:
    slug = re.sub(r"[^a-z0-9]+", "-", family.task.lower()).strip("-")[:24]
    return RunConfig(
        run_id=f"{cfg.name}-{slug}-{method.replace('_', '-')}"[:63],
        model=cfg.model,
        peft=PeftConfig(method=method),
        data=DataConfig(
            task=family.task,
            data_dir=cfg.data_dir,
            seed=cfg.seed,
            train_size=family.train_size,
            calibration_size=family.calibration_size,
            eval_size=family.eval_size,
        ),
        training=cfg.training,
        calibration=cfg.calibration,
        store=cfg.store,
    )


def _find_identical_bundle(store, run: RunConfig) -> str | None:
    """Newest version of ``run.task`` trained from exactly this config (reuse instead of retraining)."""
    try:
        versions = store.list_versions(run.task)
    except Exception:  # noqa: BLE001 — an unknown task simply has no versions
        return None
    wanted = run.model_dump()
    for version in reversed(versions):
        meta = store.manifest(run.task, version).meta
        if meta.get("provenance", {}).get("config") == wanted:
            return version
    return None


def train_or_reuse(cfg: EvalConfig, run: RunConfig, data, log) -> tuple[str, dict]:
    """Return (bundle version, training info)."""
    from svd_ray.store import open_store
    from svd_ray.training.local import calibrate_local, prepare_model, train_local
    from svd_ray.training.publish import publish_bundle

    store = open_store(run.store)
    if cfg.reuse_bundles:
        version = _find_identical_bundle(store, run)
        if version is not None:
            log(f"  reusing bundle {run.task}@{version} (identical run config)")
            return version, store.manifest(run.task, version).meta.get("metrics", {})
    t0 = time.perf_counter()
    peft_model, tokenizer, ref = prepare_model(run)
    train = train_local(peft_model, tokenizer, data.train, run, log=lambda s: log("  " + s))
    acc = calibrate_local(peft_model, tokenizer, data.calibration, run)
    info = {"train": train.to_dict(), "calibration_tokens": acc.count, "seconds": round(time.perf_counter() - t0, 1)}
    manifest = publish_bundle(run, ref, peft_model, acc, data.split, info)
    log(f"  trained + calibrated in {info['seconds']} s → {run.task}@{manifest.version}")
    return manifest.version, info


def _shards(items: list, n: int) -> list[list]:
    return [items[i::n] for i in range(n) if items[i::n]]


def _score_shard(bundle_path: str, model: str, mc_items: list, gen_items: list, gen_tokens: int, threads: int):
    """Runs inside a Ray task: load the task once, score its MC items, generate for its gen items."""
    import torch

    from svd_ray.decoding import GenerationConfig, SharedPrefix
    from svd_ray.engine import TaskModel
    from svd_ray.eval.mc_eval import score_items, standard_variants

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    tm = TaskModel.from_bundle(bundle_path, model=model)
    d = tm.data
    variants = standard_variants(d.mu, d.alpha, d.mean_delta, d.estimates)
    prefix = None
    prompts = [i.prompt for i in mc_items]
    if len(set(prompts)) > 1:  # a few-shot primer shared by all prompts is encoded once
        ids = [tm.tokenizer(p)["input_ids"] for p in sorted(set(prompts))[:2]]
        common = next((k for k, (a, b) in enumerate(zip(*ids)) if a != b), min(map(len, ids)))
        if common >= 32:
            prefix = SharedPrefix(tm.dual, ids[0][: common - 1])
    rows = score_items(tm.dual, tm.tokenizer, mc_items, variants, prefix=prefix)
    gens = []
    if gen_items:
        gen = GenerationConfig(max_new_tokens=gen_tokens, stop_strings=("\n\n", "\nQ:"))
        for mode in ("off", "svdecode"):
            outs = tm.generate([g.prompt for g in gen_items], gen, tm.steering(mode=mode))
            for g, o in zip(gen_items, outs):
                gens.append({"id": g.id, "mode": mode, "text": o.text.strip()})
    return rows, gens


def score_distributed(cfg: EvalConfig, bundle_path: str, data, log) -> tuple[list[dict], list[dict]]:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # inside a Ray job: join the cluster
            ray.init()
        else:  # embedded default: a local Ray just big enough for the shards
            ray.init(num_cpus=max(cfg.num_shards * cfg.threads_per_shard, 1), include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
    task = ray.remote(num_cpus=cfg.threads_per_shard, max_retries=2)(_score_shard)
    family = next(f for f in cfg.families if f.task == data.name or data.name.startswith(f.task))
    gen_items = data.eval_gen[: family.gen_size]
    mc_shards = _shards(data.eval_mc, cfg.num_shards)
    gen_shards = _shards(gen_items, len(mc_shards)) if gen_items else []
    refs = [
        task.remote(bundle_path, cfg.model, shard, gen_shards[i] if i < len(gen_shards) else [],
                    family.gen_max_new_tokens, cfg.threads_per_shard)
        for i, shard in enumerate(mc_shards)
    ]
    rows, gens = [], []
    pending, done = list(refs), 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        r, g = ray.get(ready[0])
        rows += r
        gens += g
        done += 1
        log(f"  scored shard {done}/{len(refs)} ({len(rows)}/{len(data.eval_mc)} items)")
    order = {(i.source, i.id): n for n, i in enumerate(data.eval_mc)}
    rows.sort(key=lambda r: order[(r["source"], r["id"])])
    return rows, gens


# ------------------------------------------------------------------------------ metrics
def _ci(scores: list[float], cfg: EvalConfig) -> dict:
    return metrics.bootstrap_ci(scores, n_resamples=cfg.bootstrap_resamples, seed=cfg.seed).to_dict()


def variant_names(rows: list[dict]) -> list[str]:
    return [k for k in rows[0] if isinstance(rows[0][k], list) and k not in
            ("labels", "choices", "num_tokens") and not k.endswith("__outside_mask_tokens")]


def per_item_scores(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """benchmark/metric → variant → per-item scores (TruthfulQA: per question)."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    variants = variant_names(rows)
    by_source = defaultdict(list)
    for r in rows:
        by_source[r["source"]].append(r)
    if "truthfulqa_mc1" in by_source:
        mc2_rows = {r["id"]: r for r in by_source.pop("truthfulqa_mc2", [])}
        for r1 in by_source.pop("truthfulqa_mc1"):
            r2 = mc2_rows[r1["id"]]
            for v in variants:
                m = metrics.truthfulqa_mc_metrics(r1[v], r1["labels"], r2[v], r2["labels"])
                for k in TQA_METRICS:
                    out[f"truthfulqa/{k}"][v].append(m[k])
    for source, items in by_source.items():
        for r in items:
            lengths = metrics.choice_lengths(r["choices"])
            for v in variants:
                out[f"{source}/acc"][v].append(metrics.acc(r[v], r["labels"]))
                out[f"{source}/acc_norm"][v].append(metrics.acc_norm(r[v], r["labels"], lengths))
    return out


def summarise(rows: list[dict], gens: list[dict], data, cfg: EvalConfig) -> dict:
    scores = per_item_scores(rows)
    table = {bm: {v: _ci(s, cfg) for v, s in by_v.items()} for bm, by_v in scores.items()}
    deltas = {}
    for bm, by_v in scores.items():
        if "svdecode" in by_v and "peft" in by_v:
            deltas[bm] = metrics.paired_bootstrap_ci(
                by_v["svdecode"], by_v["peft"], n_resamples=cfg.bootstrap_resamples, seed=cfg.seed
            ).to_dict()
    accs = [k for k in table if k.endswith("/acc") and not k.startswith("truthfulqa")]
    if len(accs) > 1:  # macro average over commonsense tasks
        for v in table[accs[0]]:
            table.setdefault("average/acc", {})[v] = {"mean": metrics.mean(table[a][v]["mean"] for a in accs), "n": len(accs)}
    outside = {}
    for key in rows[0]:
        if key.endswith("__outside_mask_tokens"):
            tot = sum(sum(r[key]) for r in rows)
            toks = sum(sum(r["num_tokens"]) for r in rows)
            outside[key.split("__")[0]] = tot / max(toks, 1)
    gen_summary = {}
    if gens:
        items = {g.id: g for g in data.eval_gen}
        for mode in ("off", "svdecode"):
            preds = [g for g in gens if g["mode"] == mode]
            per = metrics_gen(preds, items)
            gen_summary["peft" if mode == "off" else "svdecode"] = {k: _ci(v, cfg) for k, v in per.items()}
    return {"metrics": table, "svdecode_minus_peft": deltas, "outside_mask_token_share": outside,
            "generation": gen_summary, "n_items": len(rows)}


def metrics_gen(preds: list[dict], items: dict) -> dict[str, list[float]]:
    from svd_ray.eval.truthfulqa_gen import truthfulqa_gen_metrics

    out = defaultdict(list)
    for p in preds:
        it = items[p["id"]]
        m = truthfulqa_gen_metrics(p["text"], it.references, it.negatives)
        for k in ("bleu_acc", "bleu_diff", "rougeL_acc", "rougeL_diff"):
            out[k].append(m[k])
    return out


# ------------------------------------------------------------------------------ driver
def run_evaluation(cfg: EvalConfig, log=print, command: str | None = None) -> dict:
    """Train/reuse, score and report every family × method; writes results.json/.md/.png."""
    import ray

    owns_ray = not ray.is_initialized()  # a Ray we start for the scoring shards is stopped at the end
    try:
        return _run_evaluation(cfg, log, command)
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()


def _run_evaluation(cfg: EvalConfig, log, command: str | None) -> dict:
    from svd_ray.store import open_store
    from svd_ray.training.task_data import load_task_data

    t_start = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"config": cfg.model_dump(), "runs": {}, "command": command or "svd-ray eval CONFIG"}
    for family in cfg.families:
        for method in cfg.methods:
            run = run_config_for(cfg, family, method)
            log(f"[{family.task} × {method}] run {run.run_id}")
            t0 = time.perf_counter()
            data = load_task_data(run.data)
            log(f"  data: {len(data.train)} train / {len(data.calibration)} calibration / {len(data.eval_mc)} eval items")
            version, train_info = train_or_reuse(cfg, run, data, log)
            store = open_store(run.store)
            path, manifest = store.fetch(run.task, version)
            rows, gens = score_distributed(cfg, str(path), data, log)
            summary = summarise(rows, gens, data, cfg)
            mu = manifest.meta["mu"]
            summary.update(
                run_id=run.run_id, version=version, mu=mu["value"], mu_estimator=mu["estimator"],
                mu_estimates=mu["estimates"], mu_star=mu.get("mu_star"), training=train_info,
                seconds=round(time.perf_counter() - t0, 1),
                sizes={"train": len(data.train), "calibration": len(data.calibration), "eval": len(data.eval_mc)},
            )
            results["runs"].setdefault(family.task, {})[method] = summary
            (out_dir / f"rows-{run.run_id}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    render_reports(cfg, results)
    log(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}, {out_dir / 'results.png'} in {results['seconds']} s")
    return results


def render_reports(cfg: EvalConfig, results: dict | None = None) -> None:
    """Markdown + PNG from the measured results (read back from output_dir/results.json if not given)."""
    from svd_ray.eval.report import plot_results, render_markdown

    out_dir = Path(cfg.output_dir)
    if results is None:
        path = out_dir / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run the evaluation first")
        results = json.loads(path.read_text())
    png = plot_results(results, out_dir / "results.png")
    md = render_markdown(results, cfg, png_path=png)
    (out_dir / "results.md").write_text(md)
    if cfg.results_md:
        Path(cfg.results_md).write_text(md)

