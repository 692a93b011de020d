"""Cell identities: a run id changes with every setting that changes the trained bundle, and only those,
so the reproduction's committed cells (hours of scoring) stay reachable from its config."""
from pathlib import Path

from svd_ray.eval.cells import scoring_key
from svd_ray.eval.config import EvalConfig
from svd_ray.eval.runner import bundle_settings, cells, run_config_for, scoring_settings

REPRO = "jobs/configs/reproduction.yaml"


def _first_run(overrides: dict | None = None):
    cfg = EvalConfig.from_yaml(REPRO, overrides or {})
    family, model, method = cells(cfg)[0]
    return cfg, run_config_for(cfg, family, method, model)


def test_run_id_ignores_the_elastic_lower_bound_but_not_the_width_or_training():
    cfg, run = _first_run()
    elastic = run.model_copy(update={"cluster": run.cluster.model_copy(update={"num_workers": 2, "min_workers": 1})})
    wider = run.model_copy(update={"cluster": run.cluster.model_copy(update={"num_workers": 2})})
    assert bundle_settings(elastic) == bundle_settings(wider)
    assert bundle_settings(wider) != bundle_settings(run)  # the run's width changes summation order
    _, other_lr = _first_run({"training": {**cfg.training.model_dump(), "lr": 1e-4}})
    assert other_lr.run_id != run.run_id
    assert run.run_id.startswith("repro-truthfulqa-lora-")


def test_committed_reproduction_cells_are_reachable_from_its_config():
    """A cell folder with scored rows that no planned cell maps to means the run-id or scoring hash drifted
    (e.g. a new config field entered it): the next `make reproduce` would silently redo hours of work."""
    cfg = EvalConfig.from_yaml(REPRO)
    planned = {f"{run_config_for(cfg, f, meth, model).run_id}-{scoring_key(scoring_settings(cfg, f))}"
               for f, model, meth in cells(cfg)}
    committed = [d.name for d in Path(cfg.output_dir, "cells").iterdir() if (d / "rows.jsonl").is_file()]
    assert committed, "the repository carries finished reproduction cells"
    assert set(committed) <= planned, sorted(set(committed) - planned)
