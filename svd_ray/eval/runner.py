"""The evaluation pipeline: for each task family × PEFT method, warm-start + calibrate (or reuse
the identical bundle), then score the evaluation items — sharded over Ray tasks — under every
steering variant, and report metrics with confidence intervals.

Scoring runs each item's adapter-on/off forward passes once and derives every variant from the
same logits (``svd_ray.eval.mc_eval``), so columns differ only in how logits are combined.
"""
from __future__ import annotations

import hashlib
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
    """The run (and store task name) of one cell. The name ends in a hash of every setting that changes the
    trained bundle, so two configs never share a task name (and "latest" of a task is always the same
    config); the readable prefix is truncated, the hash never is."""
    slug = re.sub(r"[^a-z0-9]+", "-", family.task.lower()).strip("-")[:24]
    run = _run_config(cfg, family, method, "pending")
    settings = {k: v for k, v in run.model_dump().items() if k not in ("run_id", "task_name", "store")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    prefix = f"{cfg.name}-{slug}-{method.replace('_', '-')}"[: 63 - 9].rstrip("-.")
    return run.model_copy(update={"run_id": f"{prefix}-{digest}"})


def _run_config(cfg: EvalConfig, family, method: str, run_id: str) -> RunConfig:
    return RunConfig(
        run_id=run_id,
        model=cfg.model,
        peft=PeftConfig(method=method),
        data=DataConfig(
            task=family.task,
            data_dir=cfg.data_dir,
            seed=cfg.seed,
            train_size=family.train_size,
            calibration_size=family.calibration_size,
            eval_size=family.eval_size,
            split_fractions=family.split_fractions,
            jsonl_duplicates=family.jsonl_duplicates,
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
    from svd_ray.training.lr_search import resolve_lr
    from svd_ray.training.publish import publish_bundle

    store = open_store(run.store)
    if cfg.reuse_bundles:
        version = _find_identical_bundle(store, run)
        if version is not None:
            log(f"  reusing bundle {run.task}@{version} (identical run config)")
            return version, store.manifest(run.task, version).meta.get("metrics", {})
    t0 = time.perf_counter()
    trained_run, lr_search = resolve_lr(run, data.train, data.calibration, log=log)
    peft_model, tokenizer, ref = prepare_model(trained_run)
    train = train_local(peft_model, tokenizer, data.train, trained_run, log=lambda s: log("  " + s))
    acc = calibrate_local(peft_model, tokenizer, data.calibration, trained_run)
    info = {"train": train.to_dict(), "calibration_tokens": acc.count, "seconds": round(time.perf_counter() - t0, 1),
            "lr": trained_run.training.lr}
    if lr_search is not None:
        info["lr_search"] = lr_search
    # provenance is the configured run (so an identical config finds this bundle); the lr used is in info
    manifest = publish_bundle(run, ref, peft_model, acc, data.split, info)
    log(f"  trained + calibrated in {info['seconds']} s → {run.task}@{manifest.version}")
    return manifest.version, info


class _Scorer:
    """A Ray actor per shard: loads the task bundle once, then scores the chunks the driver hands it (so
    the driver sees progress item by item, and a chunk lost with a crashed actor is retried)."""

    def __init__(self, bundle_path: str, model: str, threads: int):
        import torch

        from svd_ray.engine import TaskModel
        from svd_ray.eval.mc_eval import standard_variants

        torch.set_num_threads(threads)
        torch.set_flush_denormal(True)
        self.tm = TaskModel.from_bundle(bundle_path, model=model)
        d = self.tm.data
        self.variants = standard_variants(d.mu, d.alpha, d.mean_delta, d.estimates)
        self.prefix, self.prefix_ids = None, None

    def _shared_prefix(self, prompts: list[str]):
        """A few-shot primer shared by all prompts is encoded once per actor (not once per chunk)."""
        from svd_ray.decoding import SharedPrefix

        if self.prefix is None and len(set(prompts)) > 1:
            ids = [self.tm.tokenizer(p)["input_ids"] for p in sorted(set(prompts))[:2]]
            common = next((k for k, (a, b) in enumerate(zip(*ids)) if a != b), min(map(len, ids)))
            if common >= 32:
                self.prefix_ids = ids[0][: common - 1]
                self.prefix = SharedPrefix(self.tm.dual, self.prefix_ids)
        if self.prefix is not None:  # only if every prompt of this chunk starts with it
            for p in prompts:
                if self.tm.tokenizer(p)["input_ids"][: len(self.prefix_ids)] != self.prefix_ids:
                    return None
        return self.prefix

    def score(self, mc_items: list) -> list[dict]:
        from svd_ray.eval.mc_eval import score_items

        prompts = [i.prompt for i in mc_items]
        return score_items(self.tm.dual, self.tm.tokenizer, mc_items, self.variants, prefix=self._shared_prefix(prompts))

    def generate(self, gen_items: list, gen_tokens: int) -> list[dict]:
        from svd_ray.decoding import GenerationConfig

        gens = []
        gen = GenerationConfig(max_new_tokens=gen_tokens, stop_strings=("\n\n", "\nQ:"))
        for mode in ("off", "svdecode"):
            outs = self.tm.generate([g.prompt for g in gen_items], gen, self.tm.steering(mode=mode))
            for g, o in zip(gen_items, outs):
                gens.append({"id": g.id, "mode": mode, "text": o.text.strip()})
        return gens


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def score_distributed(cfg: EvalConfig, bundle_path: str, data, log) -> tuple[list[dict], list[dict]]:
    """Score the eval items on ``num_shards`` actors, fed chunk by chunk; progress with ETA on the driver."""
    import ray

    from svd_ray.progress import Progress

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # inside a Ray job: join the cluster
            ray.init()
        else:  # embedded default: a local Ray just big enough for the shards
            ray.init(num_cpus=max(cfg.num_shards * cfg.threads_per_shard, 1), include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
    if not os.environ.get("RAY_ADDRESS"):  # local shards share this cache: prepare the model once, here
        from svd_ray.models import resolve_model

        resolve_model(cfg.model)
    family = next(f for f in cfg.families if f.task == data.name or data.name.startswith(f.task))
    gen_items = data.eval_gen[: family.gen_size]
    n_actors = max(1, min(cfg.num_shards, len(data.eval_mc)))
    actor_cls = ray.remote(num_cpus=cfg.threads_per_shard, max_restarts=2, max_task_retries=2)(_Scorer)
    actors = [actor_cls.remote(bundle_path, cfg.model, cfg.threads_per_shard) for _ in range(n_actors)]
    size = max(1, min(16, -(-len(data.eval_mc) // (n_actors * 8))))  # ~8 chunks per actor, ≤ 16 items each
    queue = _chunks(list(data.eval_mc), size)
    gen_queue = _chunks(gen_items, max(1, -(-len(gen_items) // n_actors))) if gen_items else []
    rows, gens = [], []
    busy: dict = {}
    meter = Progress(len(data.eval_mc) + len(gen_items), "  scoring", unit="item", write=log)

    def feed(actor) -> None:
        if queue:
            chunk = queue.pop(0)
            busy[actor.score.remote(chunk)] = (actor, "mc", len(chunk))
        elif gen_queue:
            chunk = gen_queue.pop(0)
            busy[actor.generate.remote(chunk, family.gen_max_new_tokens)] = (actor, "gen", len(chunk))

    try:
        for actor in actors:
            feed(actor)
        while busy:
            ready, _ = ray.wait(list(busy), num_returns=1)
            actor, kind, n = busy.pop(ready[0])
            (rows if kind == "mc" else gens).extend(ray.get(ready[0]))
            meter.update(n)
            feed(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
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
            for note in data.notes:
                log(f"  note: {note}")
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
    targets = [out_dir / "results.md"] + ([Path(cfg.results_md)] if cfg.results_md else [])
    for md_path in targets:  # the image link is relative to each file's own folder
        link = None if png is None else os.path.relpath(Path(png).resolve(), md_path.resolve().parent)
        md_path.write_text(render_markdown(results, cfg, png_link=link))

