"""Warm-start lr chosen on calibration loss by Ray Tune trials (tiny model): the trials are the real thing
(each equals a trial run in this process), the choice is their argmin, and the Ray Train job trains at the
chosen lr and records the search in its bundle."""
import math

import pytest

from svd_ray.training.lr_search import calibration_loss, choose, run_trial, search_lr
from training_helpers import tiny_config

LRS = [1e-9, 3e-3, 3e-2]


def _cfg(tmp_path, run_id=None):
    return tiny_config(tmp_path / "store", run_id, training={"max_steps": 6, "lr_search": {"lrs": LRS, "steps": 4}})


def test_choose_is_the_argmin_and_refuses_all_diverged():
    trials = [{"lr": 1e-3, "calibration_loss": 2.0}, {"lr": 1e-4, "calibration_loss": 1.5},
              {"lr": 1e-2, "calibration_loss": float("inf")}]
    assert choose(trials) == 1e-4
    assert choose([{"lr": 2e-3, "calibration_loss": 1.0}, {"lr": 1e-3, "calibration_loss": 1.0}]) == 1e-3  # tie
    with pytest.raises(RuntimeError, match="diverged"):
        choose([{"lr": 1.0, "calibration_loss": float("inf")}])


def test_tune_trials_equal_in_process_trials_and_the_choice_is_their_argmin(ray_session, tmp_path):
    from svd_ray.training.local import prepare_model
    from svd_ray.training.task_data import load_task_data

    cfg = _cfg(tmp_path)
    data = load_task_data(cfg.data)
    record = search_lr(cfg, data.train, data.calibration, log=lambda *_: None)
    assert [t["lr"] for t in record["trials"]] == LRS and record["steps"] == 4
    losses = {t["lr"]: t["calibration_loss"] for t in record["trials"]}
    assert record["chosen"] == min(LRS, key=losses.get)
    for lr in (1e-9, record["chosen"]):  # Tune ran the real trial: same number as a trial in this process
        assert losses[lr] == pytest.approx(run_trial(cfg, lr, data.train, data.calibration)["calibration_loss"],
                                           rel=1e-6)
    # lr ≈ 0 leaves the fresh adapter: its loss is the untrained model's; a useful lr must beat it
    fresh, tok, _ = prepare_model(cfg)
    untrained = calibration_loss(fresh, tok, data.calibration, cfg)
    assert losses[1e-9] == pytest.approx(untrained, rel=1e-5)
    assert losses[record["chosen"]] < untrained and all(math.isfinite(v) for v in losses.values())


def test_ray_train_job_trains_at_the_chosen_lr_and_records_the_search(ray_session, tmp_path):
    from svd_ray.store import open_store
    from svd_ray.training.ray_train import run_ray

    cfg = _cfg(tmp_path)
    out = run_ray(cfg, log=lambda *_: None)
    record = out["lr_search"]
    assert record["chosen"] in LRS
    manifest = open_store(cfg.store).manifest(cfg.task, out["version"])
    assert manifest.meta["metrics"]["lr_search"]["chosen"] == record["chosen"]
    trained = manifest.meta["provenance"]["config"]["training"]
    assert trained["lr"] == record["chosen"] and trained["lr_search"]["lrs"] == LRS


def test_lr_search_config_is_validated():
    from pydantic import ValidationError

    from svd_ray.config import LrSearchConfig

    assert LrSearchConfig(lrs=[1e-3, 1e-4]).lrs == [1e-4, 1e-3]
    for bad in ([], [0.0], [1e-3, 1e-3], [float("nan")]):
        with pytest.raises(ValidationError):
            LrSearchConfig(lrs=bad)
