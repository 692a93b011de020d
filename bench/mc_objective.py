"""Would a choice-ranking calibration objective find the steering gains the validated μ̄ misses?

An analysis of finished TruthfulQA cells of the reproduction (``make reproduce`` first; it reads their
published bundles). Nothing here is served. The validated μ̄ (svd_ray/mu_validation.py) picks μ by the
cross-validated NLL of the calibration items' *gold answer tokens*; evaluation ranks *choices*. On
Gemma-3-270M × LoRA the two disagree in sign (docs/RESULTS-notes.md). This script scores the same
calibration questions as multiple-choice items and runs the same K-fold rule
(``mu_validation.cross_validate``) on a choice-ranking loss per question:

    LL_c(μ) = Σ_t log softmax(z_φ,t + μ · δ_t ⊙ m_t)[y_c,t]            (the validated objective's scoring)
    CE(μ)   = −log softmax_c(LL(μ))[gold]  (MC1)  −  log Σ_{c true} softmax_c(LL(μ))_c  (MC2)

over the μ grid plus the cell's closed-form estimates (so the paper's μ̄ is scored exactly). Folds are a
hash of the question id. The eval split is scored at every μ from the same forward passes: its MC1/MC2 at
the ranking choice μ̂ are held-out numbers; the best eval μ is shown only as an oracle ceiling. The paper-μ̄
row must reproduce docs/RESULTS.md (a check that this script scores exactly as the report does).

    .venv/bin/python bench/mc_objective.py [--cells lora@gemma3-270m,lora,ia3,...] [--out out/mc_objective.json]

Resumable: each finished cell is saved to ``--out`` and skipped on the next run.
"""
from __future__ import annotations

import argparse
import json
import math
import time
import zlib
from pathlib import Path

import torch

from svd_ray.data import load_truthfulqa_mc, truthfulqa_split
from svd_ray.decoding import choice_logits, encode_choices
from svd_ray.eval.cells import CellCache
from svd_ray.eval.config import EvalConfig
from svd_ray.eval.metrics import mc1, mc2, paired_bootstrap_ci
from svd_ray.eval.runner import _Scorer, cell_name, cells, run_config_for, scoring_settings
from svd_ray.mu_validation import FOLDS, MU_GRID, cross_validate, grid_nll
from svd_ray.steering import masked_steering_vector
from svd_ray.store import open_store
from svd_ray.store.errors import NotFoundError


def ranking_loss(lls: torch.Tensor, labels: list[int], kind: str) -> torch.Tensor:
    """CE over choices at every μ: ``lls`` (C, G) → (G,). MC1: −log p(gold); MC2: −log Σ_true p."""
    logp = lls - torch.logsumexp(lls, dim=0, keepdim=True)
    true = torch.tensor(labels, dtype=torch.bool)
    return -torch.logsumexp(logp[true], dim=0) if kind == "mc2" else -logp[true][0]


@torch.inference_mode()
def choice_lls(scorer: _Scorer, items_by_question: dict, mus: torch.Tensor, alpha: float, log) -> dict:
    """{question id: {choice text: LL(μ) for every μ (G,)}} from one pair of forward passes per question."""
    out, t0 = {}, time.perf_counter()
    qids = list(items_by_question)
    scorer._shared_prefix([items_by_question[q][0].prompt for q in qids])  # finds the few-shot primer once
    for n, qid in enumerate(qids):
        items = items_by_question[qid]
        prompt = items[0].prompt
        union = list(dict.fromkeys(c for it in items for c in it.choices))
        prompt_ids, choice_ids = encode_choices(scorer.tm.tokenizer, prompt, union)
        cl = choice_logits(scorer.tm.dual, prompt_ids, choice_ids, with_base=True,
                           prefix=scorer._shared_prefix([prompt]))
        row = {}
        for c, text in enumerate(union):
            valid = cl.valid[c]
            z, zb, y = cl.z_phi[c][valid].float(), cl.z_theta[c][valid].float(), cl.tokens[c][valid]
            delta = masked_steering_vector(z, zb, alpha)
            row[text] = -grid_nll(z, delta, y, mus).sum(0).double()
        out[qid] = row
        if (n + 1) % 20 == 0 or n + 1 == len(qids):
            log(f"    {n + 1}/{len(qids)} questions ({time.perf_counter() - t0:.0f} s)")
    return out


def per_question(items_by_question: dict, lls: dict):
    """(qid, {"mc1"/"mc2": (item, its choices' LL (C, G))}) in question order."""
    for qid, items in items_by_question.items():
        by_kind = {it.source.rsplit("_", 1)[-1]: it for it in items}
        yield qid, {k: (it, torch.stack([lls[qid][c] for c in it.choices])) for k, it in by_kind.items()}


def analyse_cell(cfg: EvalConfig, family, model: str, method: str, log) -> dict:
    run = run_config_for(cfg, family, method, model)
    meta = CellCache(Path(cfg.output_dir) / "cells", run.run_id, scoring_settings(cfg, family)).meta()
    if meta is None:
        raise SystemExit(f"cell {cell_name(cfg, model, method)} is not finished: run `make reproduce` first")
    bundle = str(open_store(run.store).fetch(run.task, meta["version"])[0])
    scorer = _Scorer(bundle, model, torch.get_num_threads())
    d = scorer.tm.data
    grid = list(MU_GRID) + [float(v) for k, v in d.estimates.items() if k != "validated"]
    mus = torch.tensor(grid, dtype=torch.float64)

    split = truthfulqa_split(run.data.data_dir, seed=run.data.seed)
    out = {}
    for part in ("calibration", "eval"):
        ids = sorted(split[part]) if part == "eval" else split[part]
        mc = load_truthfulqa_mc(run.data.data_dir, ids=ids)
        qs: dict = {}
        for it in list(mc.mc1) + list(mc.mc2):
            qs.setdefault(it.id, []).append(it)
        log(f"  {part}: {len(qs)} questions")
        out[part] = list(per_question(qs, choice_lls(scorer, qs, mus, d.alpha, log)))

    # choice-ranking K-fold choice on the calibration questions
    loss = torch.zeros(FOLDS, len(grid), dtype=torch.float64)
    counts = torch.zeros(FOLDS, dtype=torch.float64)
    for qid, kinds in out["calibration"]:
        f = zlib.crc32(qid.encode()) % FOLDS
        counts[f] += 1
        for kind, (it, lls) in kinds.items():
            loss[f] += ranking_loss(lls, it.labels, kind)
    cv = cross_validate(loss, counts, grid)
    steer = cv["steer"]
    mu_rank = grid[cv["best"]] if steer else 0.0

    # held-out evaluation at every μ from the same passes
    scores = {k: torch.tensor([[(mc1 if k == "mc1" else mc2)(kinds[k][1][:, g].tolist(), kinds[k][0].labels)
                                for g in range(len(grid))] for _, kinds in out["eval"]]) for k in ("mc1", "mc2")}
    zero = grid.index(0.0)

    def delta(g: int, k: str) -> dict:
        ci = paired_bootstrap_ci(scores[k][:, g].tolist(), scores[k][:, zero].tolist(),
                                 n_resamples=cfg.bootstrap_resamples, seed=cfg.seed)
        return {"mu": grid[g], "delta": 100 * ci.mean, "low": 100 * ci.low, "high": 100 * ci.high}

    paper = grid.index(float(d.estimates["mean"]))
    oracle = int(torch.argmax(scores["mc1"].mean(0) + scores["mc2"].mean(0)))
    validation = d.validation or {}
    return {
        "cell": cell_name(cfg, model, method),
        "questions": {"calibration": len(out["calibration"]), "eval": len(out["eval"])},
        "peft": {k: 100 * float(scores[k][:, zero].mean()) for k in scores},
        "nll_validated": {"steer": validation.get("steer"), "grid_best_mu": validation.get("grid_best_mu"),
                          "cv_gain": validation.get("cv_gain_per_token"), "se": validation.get("cv_gain_se")},
        "ranking": {"steer": steer, "mu": mu_rank, "best_mu": grid[cv["best"]], "cv_gain": cv["gain"],
                    "se": cv["se"] if math.isfinite(cv["se"]) else None, "fold_picks": cv["picks"],
                    "ce_per_question_at_0": float(loss[:, zero].sum() / counts.sum())},
        "eval": {"paper_mu": {k: delta(paper, k) for k in scores},
                 "ranking_mu": {k: delta(grid.index(mu_rank), k) for k in scores},
                 "ranking_best_mu_unthresholded": {k: delta(cv["best"], k) for k in scores},
                 "oracle_mu_on_eval": {k: delta(oracle, k) for k in scores}},
    }


def fmt(d: dict) -> str:
    return f"{d['delta']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"


def print_table(results: dict) -> None:
    print("| cell | NLL-validated: steer? (grid best μ, gain ± SE nats/token) | ranking: steer? μ̂ "
          "(gain ± SE nats/question) | Δ MC1 / MC2 at paper μ̄ | at ranking μ̂ | at ranking best μ, "
          "no threshold | oracle μ (chosen on eval) |")
    print("|---|---|---|---|---|---|---|")
    for r in results.values():
        v, k, e = r["nll_validated"], r["ranking"], r["eval"]
        se = "–" if k["se"] is None else f"{k['se']:.3g}"
        print(f"| {r['cell']} | {'yes' if v['steer'] else 'no'} ({v['grid_best_mu']:+.3g}, {v['cv_gain']:+.3g} ± "
              f"{v['se']:.2g}) | {'yes' if k['steer'] else 'no'} μ̂ = {k['best_mu']:+.3g} ({k['cv_gain']:+.3g} ± {se}) | "
              + " | ".join(f"μ {e[x]['mc1']['mu']:+.3g}: {fmt(e[x]['mc1'])} / {fmt(e[x]['mc2'])}"
                           for x in ("paper_mu", "ranking_mu", "ranking_best_mu_unthresholded", "oracle_mu_on_eval"))
              + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="jobs/configs/reproduction.yaml")
    ap.add_argument("--cells", default="lora@gemma3-270m,lora,ia3,prompt_tuning,p_tuning_v2")
    ap.add_argument("--out", default="out/mc_objective.json")
    args = ap.parse_args()
    cfg = EvalConfig.from_yaml(args.config)
    torch.set_flush_denormal(True)
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.is_file() else {}
    wanted = args.cells.split(",")
    plan = {cell_name(cfg, m, meth): (fam, m, meth) for fam, m, meth in cells(cfg) if fam.task == "truthfulqa"}
    for name in wanted:
        if name in results:
            print(f"{name}: reused from {path}")
            continue
        print(f"{name}: scoring the calibration and eval questions on {len(MU_GRID)} grid μ + the estimates")
        t0 = time.perf_counter()
        try:
            results[name] = analyse_cell(cfg, *plan[name], log=print)
        except NotFoundError as exc:  # the cell's scored rows are committed, its bundle may not be here
            print(f"{name}: skipped, its bundle is not in the store: {exc}")
            continue
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
    print_table({k: results[k] for k in wanted if k in results})


if __name__ == "__main__":
    main()
