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
MAIN_VARIANTS = ("base", "peft", "svdecode", "validated", "mask_only")
COMPARED = ("svdecode", "validated", "mask_only")  # each gets a paired Δ against PEFT
ABLATIONS = (
    "svdecode",
    "validated",
    "svdecode_floor",
    "mask_only",
    "no_mask",
    "static",
    "svdecode_mu_mean",
    "svdecode_mu_median",
    "svdecode_mu_sequence",
    "svdecode_mu_trimmed_mean",
)


def cells(cfg: EvalConfig) -> list[tuple]:
    """Every (family, model, method) the config asks for, in run order."""
    out = [(f, cfg.model, m) for f in cfg.families for m in cfg.methods]
    for extra in cfg.extra_runs:
        out += [(f, extra.model, m) for f in cfg.families if extra.families is None or f.task in extra.families
                for m in extra.methods]
    return out


def cell_name(cfg: EvalConfig, model: str, method: str) -> str:
    """The cell's key in results["runs"][family]: the method, plus the model when it is not the main one."""
    return method if model == cfg.model else f"{method}@{model}"


def run_config_for(cfg: EvalConfig, family, method: str, model: str | None = None) -> RunConfig:
    """The run (and store task name) of one cell. The name ends in a hash of every setting that changes the
    trained bundle, so two configs never share a task name (and "latest" of a task is always the same
    config); the readable prefix is truncated, the hash never is."""
    model = model or cfg.model
    slug = re.sub(r"[^a-z0-9]+", "-", family.task.lower()).strip("-")[:24]
    run = _run_config(cfg, family, method, "pending", model)
    digest = hashlib.sha256(json.dumps(bundle_settings(run), sort_keys=True, default=str).encode()).hexdigest()[:8]
    model_tag = "" if model == cfg.model else "-" + re.sub(r"[^a-z0-9]+", "-", model.lower())[:12]
    prefix = f"{cfg.name}-{slug}-{method.replace('_', '-')}{model_tag}"[: 63 - 9].rstrip("-.")
    return run.model_copy(update={"run_id": f"{prefix}-{digest}"})


# Settings that cannot change the trained bundle, left out of its hash so that finished cells (hours of
# scoring) stay valid when such a setting is added: an elastic run's lower bound changes where its
# micro-batches run, never the update (num_workers, the run's width, stays in the hash).
_NOT_IN_BUNDLE_HASH = {"run_id": None, "task_name": None, "store": None, "cluster": {"min_workers"}}


def bundle_settings(run: RunConfig) -> dict:
    """Every setting of ``run`` that changes its trained bundle (the input of the run id's hash)."""
    out = {}
    for key, value in run.model_dump().items():
        drop = _NOT_IN_BUNDLE_HASH.get(key, set())
        if drop is None:
            continue
        out[key] = {k: v for k, v in value.items() if k not in drop} if drop else value
    return out


def _run_config(cfg: EvalConfig, family, method: str, run_id: str, model: str) -> RunConfig:
    return RunConfig(
        run_id=run_id,
        model=model,
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


def searched_lr(run: RunConfig, data, log, cache=None) -> tuple[RunConfig, dict | None]:
    """``resolve_lr``, reusing the search this cell already ran for the same search config."""
    from svd_ray.training.lr_search import resolve_lr

    search = run.training.lr_search
    saved = cache.lr_search(search.model_dump()) if cache is not None and search is not None else None
    if saved is not None:
        log(f"  reusing the cell's lr search (lr {saved['chosen']:g}; {len(saved['trials'])} trials on disk)")
        return run.model_copy(update={"training": run.training.model_copy(update={"lr": saved["chosen"]})}), saved
    searched, record = resolve_lr(run, data.train, data.calibration, log=log)
    if cache is not None and record is not None:
        cache.save_lr_search(search.model_dump(), record)
    return searched, record


def train_or_reuse(cfg: EvalConfig, run: RunConfig, data, log, cache=None) -> tuple[str, dict]:
    """Return (bundle version, training info)."""
    from svd_ray.store import open_store
    from svd_ray.training.local import calibrate_local, prepare_model, train_local
    from svd_ray.training.lr_search import final_calibration_loss, train_with_fallback
    from svd_ray.training.publish import publish_bundle

    store = open_store(run.store)
    if cfg.reuse_bundles:
        version = _find_identical_bundle(store, run)
        if version is not None:
            log(f"  reusing bundle {run.task}@{version} (identical run config)")
            return version, store.manifest(run.task, version).meta.get("metrics", {})
    t0 = time.perf_counter()
    searched_run, lr_search = searched_lr(run, data, log, cache)

    def attempt(r: RunConfig, _bound, record):
        peft_model, tokenizer, ref = prepare_model(r)
        train = train_local(peft_model, tokenizer, data.train, r, log=lambda s: log("  " + s))
        acc = calibrate_local(peft_model, tokenizer, data.calibration, r)
        return (peft_model, ref, train, acc), final_calibration_loss(acc) if record else None

    trained_run, (peft_model, ref, train, acc), lr_search = train_with_fallback(searched_run, lr_search, attempt,
                                                                                 log=log)
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

    def __init__(self, bundle: dict | str, model: str, threads: int):
        import torch

        from svd_ray.engine import TaskModel
        from svd_ray.eval.mc_eval import standard_variants

        torch.set_num_threads(threads)
        torch.set_flush_denormal(True)
        if isinstance(bundle, dict):  # {"store", "task", "version"}: fetched (and verified) on this actor's node
            from svd_ray.store import open_store

            bundle = str(open_store(bundle["store"]).fetch(bundle["task"], bundle["version"])[0])
        self.tm = TaskModel.from_bundle(bundle, model=model)
        d = self.tm.data
        # "svdecode" is the paper's μ̄ (plain mean) whatever the bundle's default; "validated" is how the
        # validated μ̄ serves the task (steered, plain adapter or mask only)
        self.variants = standard_variants(d.estimates.get("mean", d.mu), d.alpha, d.mean_delta, d.estimates,
                                          d.validation)
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
        paper_mu = self.tm.data.estimates.get("mean", self.tm.data.mu)  # as the "svdecode" scoring column
        for mode in ("off", "svdecode"):
            outs = self.tm.generate([g.prompt for g in gen_items], gen, self.tm.steering(mode=mode, mu=paper_mu))
            for g, o in zip(gen_items, outs):
                gens.append({"id": g.id, "mode": mode, "text": o.text.strip()})
        return gens


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def score_distributed(cfg: EvalConfig, bundle: dict | str, data, log, model: str | None = None, cache=None,
                      on_items=None) -> tuple[list[dict], list[dict]]:
    """Score the eval items on ``num_shards`` actors, fed chunk by chunk; progress with ETA on the driver.

    ``bundle``: ``{"store", "task", "version"}`` — every actor fetches the bundle from the store on its own
    node (so actors on other nodes of a cluster work) — or a local bundle folder (single machine).

    ``cache`` (a :class:`~svd_ray.eval.cells.CellCache`): rows already in it are not scored again and every
    finished chunk is appended to it, so an interrupted run resumes where it stopped. ``on_items(n)`` is
    called as items finish (overall progress)."""
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
    model = model or cfg.model
    if not os.environ.get("RAY_ADDRESS"):  # local shards share this cache: prepare the model once, here
        from svd_ray.models import resolve_model

        resolve_model(model)
    family = next(f for f in cfg.families if f.task == data.name or data.name.startswith(f.task))
    gen_items = data.eval_gen[: family.gen_size]
    done_rows = cache.rows() if cache is not None else {}
    done_gens = cache.gens() if cache is not None else {}
    todo = [i for i in data.eval_mc if (i.source, i.id) not in done_rows]
    # items with one prompt (TruthfulQA's MC1 and MC2 of a question) side by side, so a chunk scores them in
    # one pass (score_items); rows are put back in data order at the end
    from svd_ray.eval.mc_eval import prompt_groups

    todo = [todo[n] for group in prompt_groups(todo) for n in group]
    gen_todo = [g for g in gen_items if not all((g.id, m) in done_gens for m in ("off", "svdecode"))]
    rows = [r for r in done_rows.values()]
    gens = [g for k, g in done_gens.items() if k[0] not in {x.id for x in gen_todo}]
    if len(todo) < len(data.eval_mc) or len(gen_todo) < len(gen_items):
        log(f"  resuming: {len(data.eval_mc) - len(todo)} of {len(data.eval_mc)} items and "
            f"{len(gen_items) - len(gen_todo)} of {len(gen_items)} generations already scored")
    meter = Progress(len(todo) + len(gen_todo), "  scoring", unit="item", write=log)
    if not todo and not gen_todo:
        return _ordered(rows, data), gens
    n_actors = max(1, min(cfg.num_shards, len(todo) + len(gen_todo)))
    actor_cls = ray.remote(num_cpus=cfg.threads_per_shard, max_restarts=2, max_task_retries=2)(_Scorer)
    actors = [actor_cls.remote(bundle, model, cfg.threads_per_shard) for _ in range(n_actors)]
    size = max(1, min(16, -(-len(todo) // (n_actors * 8))))  # ~8 chunks per actor, ≤ 16 items each
    queue = _chunks(todo, size)
    gen_queue = _chunks(gen_todo, max(1, min(8, -(-len(gen_todo) // n_actors)))) if gen_todo else []
    busy: dict = {}

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
            got = ray.get(ready[0])
            (rows if kind == "mc" else gens).extend(got)
            if cache is not None:
                (cache.add_rows if kind == "mc" else cache.add_gens)(got)
            meter.update(n)
            if on_items is not None:
                on_items(n)
            feed(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
    return _ordered(rows, data), gens


def _ordered(rows: list[dict], data) -> list[dict]:
    order = {(i.source, i.id): n for n, i in enumerate(data.eval_mc)}
    return sorted((r for r in rows if (r["source"], r["id"]) in order), key=lambda r: order[(r["source"], r["id"])])


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
    tasks = [k for k in scores if k.endswith("/acc") and not k.startswith("truthfulqa")]
    if len(tasks) > 1:  # every commonsense item pooled: the headline metric, with a paired CI
        for suffix in ("acc", "acc_norm"):
            pooled = scores[f"all/{suffix}"]
            for k in tasks:
                for v, vals in scores[k[: -len("/acc")] + "/" + suffix].items():
                    pooled.setdefault(v, []).extend(vals)
    table = {bm: {v: _ci(s, cfg) for v, s in by_v.items()} for bm, by_v in scores.items()}
    deltas: dict = {}  # variant → benchmark → paired Δ (variant − PEFT) with its CI
    for v in COMPARED:
        for bm, by_v in scores.items():
            if v in by_v and "peft" in by_v:
                deltas.setdefault(v, {})[bm] = metrics.paired_bootstrap_ci(
                    by_v[v], by_v["peft"], n_resamples=cfg.bootstrap_resamples, seed=cfg.seed
                ).to_dict()
    accs = [k for k in table if k.endswith("/acc") and not k.startswith(("truthfulqa", "all/"))]
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
    return {"metrics": table, "deltas": deltas, "outside_mask_token_share": outside,
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


class _Eta:
    """Whole-run progress: eval items scored (cached ones count as done) and cells still to train; the ETA
    extrapolates this invocation's measured seconds per item and per training."""

    def __init__(self, total_items: int, path: Path, log):
        self.total, self.done, self.path, self.log = total_items, 0, path, log
        self.score_s = self.scored = 0.0
        self.train_s, self.trained = 0.0, 0
        self.t0 = time.perf_counter()

    def line(self, untrained: int) -> str:
        parts = [f"{self.done}/{self.total} eval items scored ({100 * self.done / max(self.total, 1):.0f}%)"]
        if self.scored and (self.trained or not untrained):
            per_item = self.score_s / self.scored
            left = (self.total - self.done) * per_item + untrained * (self.train_s / max(self.trained, 1))
            parts.append(f"ETA {left / 3600:.1f} h ({per_item:.2f} s/item, {untrained} cell(s) to train)")
        else:
            parts.append(f"ETA after the first trained and scored cell ({untrained} cell(s) to train)")
        return "progress: " + "; ".join(parts)

    def report(self, untrained: int) -> None:
        line = self.line(untrained)
        self.log(line)
        self.path.write_text(time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n")


def _cell_complete(cache, data, family) -> bool:
    if cache.meta() is None:
        return False
    rows, gens = cache.rows(), cache.gens()
    return (all((i.source, i.id) in rows for i in data.eval_mc)
            and all((g.id, m) in gens for g in data.eval_gen[: family.gen_size] for m in ("off", "svdecode")))


def scoring_settings(cfg: EvalConfig, family) -> dict:
    """Every eval setting that changes a cell's scored rows (beyond the run config in its run id)."""
    return {"gen_size": family.gen_size, "gen_max_new_tokens": family.gen_max_new_tokens}


def _run_evaluation(cfg: EvalConfig, log, command: str | None) -> dict:
    from svd_ray.eval.cells import CellCache, bundle_digest
    from svd_ray.store import open_store
    from svd_ray.training.task_data import load_task_data

    t_start = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells_root = Path(cfg.cells_dir) if cfg.cells_dir else out_dir / "cells"
    results = {"config": cfg.model_dump(), "runs": {}, "command": command or "svd-ray eval CONFIG"}
    plan = cells(cfg)
    datas, caches = {}, []
    for family, model, method in plan:  # the split depends on the family only: load each once
        run = run_config_for(cfg, family, method, model)
        if family.task not in datas:
            datas[family.task] = load_task_data(run.data)
        caches.append(CellCache(cells_root, run.run_id, scoring_settings(cfg, family)))
    sizes = [len(datas[f.task].eval_mc) + min(len(datas[f.task].eval_gen), f.gen_size) for f, _, _ in plan]
    eta = _Eta(sum(sizes), out_dir / "progress.txt", log)
    eta.done = sum(len(c.rows()) + len(c.gens()) // 2 for c in caches)
    untrained = sum(c.meta() is None for c in caches)
    log(f"{len(plan)} cells ({len(datas)} task families); resumable state in {cells_root}")
    eta.report(untrained)
    reused = 0
    for k, ((family, model, method), cache) in enumerate(zip(plan, caches)):
        run = run_config_for(cfg, family, method, model)
        name = cell_name(cfg, model, method)
        data = datas[family.task]
        log(f"[{k + 1}/{len(plan)}] {family.task} × {name}: run {run.run_id}")
        log(f"  data: {len(data.train)} train / {len(data.calibration)} calibration / {len(data.eval_mc)} eval items")
        for note in data.notes:
            log(f"  note: {note}")
        if _cell_complete(cache, data, family):
            log("  reusing the finished cell (scored rows on disk for this exact config)")
            meta, reused = cache.meta(), reused + 1
            rows, gens = _ordered(list(cache.rows().values()), data), list(cache.gens().values())
        else:
            had_meta = cache.meta() is not None
            t_train = time.perf_counter()
            version, train_info = train_or_reuse(cfg, run, data, log, cache)
            manifest = open_store(run.store).manifest(run.task, version)
            if not had_meta:
                eta.train_s += time.perf_counter() - t_train
                eta.trained += 1
                untrained -= 1
            meta = {"version": version, "digest": bundle_digest(manifest), "mu": manifest.meta["mu"],
                    "training": train_info, "model": model, "method": method, "family": family.task}
            cache.bind(meta)
            t_score, before = time.perf_counter(), eta.done

            def on_items(n: int) -> None:
                eta.done += n

            bundle = {"store": run.store, "task": run.task, "version": version}
            rows, gens = score_distributed(cfg, bundle, data, log, model=model, cache=cache, on_items=on_items)
            eta.score_s += time.perf_counter() - t_score
            eta.scored += eta.done - before
        summary = summarise(rows, gens, data, cfg)
        mu = meta["mu"]
        summary.update(
            run_id=run.run_id, version=meta["version"], model=model, method=method, mu=mu["value"],
            mu_estimator=mu["estimator"], mu_estimates=mu["estimates"], mu_star=mu.get("mu_star"),
            validation=mu.get("validation"), default_mode=mu.get("default_mode"), training=meta["training"],
            sizes={"train": len(data.train), "calibration": len(data.calibration), "eval": len(data.eval_mc)},
        )
        results["runs"].setdefault(family.task, {})[name] = summary
        results["seconds"] = round(time.perf_counter() - t_start, 1)
        results["cells"] = {"done": k + 1, "total": len(plan), "reused": reused}
        (out_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
        render_reports(cfg, results)  # a readable partial report after every cell
        eta.report(untrained)
    log(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}, {out_dir / 'results.png'} in {results['seconds']} s")
    return results


def in_plan_order(cfg: EvalConfig, results: dict) -> dict:
    """``results`` with families and cells in the config's plan order, whatever order they were read in
    (results.json is written with sorted keys): the report of a run and a report re-rendered from its
    JSON are the same file."""
    order = {}
    for family, model, method in cells(cfg):
        order.setdefault(family.task, []).append(cell_name(cfg, model, method))
    runs = results["runs"]
    ranked = {f: {c: runs[f][c] for c in sorted(runs[f], key=lambda c: (order.get(f, []) + [c]).index(c))}
              for f in sorted(runs, key=lambda f: (list(order) + [f]).index(f))}
    return {**results, "runs": ranked}


def render_reports(cfg: EvalConfig, results: dict | None = None) -> None:
    """Markdown + PNG from the measured results (read back from output_dir/results.json if not given)."""
    from svd_ray.eval.report import plot_results, render_markdown

    out_dir = Path(cfg.output_dir)
    if results is None:
        path = out_dir / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run the evaluation first")
        results = json.loads(path.read_text())
    # Render what results.json holds (sorted keys), families and cells put back in plan order: a live run
    # and a later re-render write the same bytes; metric columns and dicts come out in sorted order.
    results = in_plan_order(cfg, json.loads(json.dumps(results, sort_keys=True)))
    png = plot_results(results, out_dir / "results.png")
    targets = [out_dir / "results.md"] + ([Path(cfg.results_md)] if cfg.results_md else [])
    for md_path in targets:  # the image link is relative to each file's own folder
        link = None if png is None else os.path.relpath(Path(png).resolve(), md_path.resolve().parent)
        md_path.write_text(render_markdown(results, cfg, png_link=link))

