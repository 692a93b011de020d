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
    # the full run was checked against its trial, and the check is in the bundle
    from svd_ray.training.lr_search import final_calibration_loss

    (check,) = manifest.meta["metrics"]["lr_search"]["final_checks"]
    assert check["accepted"] and check["lr"] == record["chosen"]
    assert check["final_calibration_loss"] == pytest.approx(final_calibration_loss(out["accumulator"]), rel=1e-9)


def test_lr_search_config_is_validated():
    from pydantic import ValidationError

    from svd_ray.config import LrSearchConfig

    assert LrSearchConfig(lrs=[1e-3, 1e-4]).lrs == [1e-4, 1e-3]
    for bad in ([], [0.0], [1e-3, 1e-3], [float("nan")]):
        with pytest.raises(ValidationError):
            LrSearchConfig(lrs=bad)


# ---------------------------------------------------------------- the full warm-start is checked on its trial
def _record(losses: dict) -> dict:
    trials = [{"lr": lr, "calibration_loss": loss, "train_loss": loss, "steps": 4, "seconds": 0.0}
              for lr, loss in sorted(losses.items())]
    return {"candidates": sorted(losses), "trials": trials, "chosen": choose(trials), "steps": 4, "seconds": 0.0}


def test_a_full_run_that_drifts_past_its_trial_falls_back_to_the_next_lr(tmp_path):
    from svd_ray.training.lr_search import FINAL_LOSS_RATIO, train_with_fallback

    run = tiny_config(tmp_path / "store", "drift")
    record = _record({1e-4: 1.2, 1e-3: 1.0, 1e-2: float("inf"), 3e-4: 1.1})
    final = {1e-3: 4.2, 3e-4: 1.1 * FINAL_LOSS_RATIO, 1e-4: 0.9}  # 3e-4 ends exactly on its bound: accepted
    seen = []

    def attempt(r, bound, rec):
        seen.append((r.run_id, r.task, r.training.lr, bound, [c["lr"] for c in rec["final_checks"]]))
        return f"trained at {r.training.lr}", final[r.training.lr]

    trained, result, out = train_with_fallback(run, record, attempt, log=lambda *_: None)
    assert seen == [("drift", "drift", 1e-3, FINAL_LOSS_RATIO * 1.0, []),
                    ("drift-r1", "drift", 3e-4, pytest.approx(FINAL_LOSS_RATIO * 1.1), [1e-3])]
    assert trained.training.lr == 3e-4 and trained.task == "drift" and result == "trained at 0.0003"
    assert out["chosen"] == 3e-4 and [c["accepted"] for c in out["final_checks"]] == [False, True]
    assert out["final_checks"][0]["final_calibration_loss"] == 4.2 and record["chosen"] == 1e-3  # input untouched

    final[3e-4], final[1e-4] = float("nan"), 9.0  # nothing passes: a clear error naming every lr tried
    with pytest.raises(RuntimeError, match=r"every searched lr failed.*lr 0\.001.*lr 0\.0003.*lr 0\.0001"):
        train_with_fallback(run, record, attempt, log=lambda *_: None)
    assert [s[2] for s in seen[2:]] == [1e-3, 3e-4, 1e-4]  # the diverged trial (inf) is never tried


def test_the_check_scores_the_same_objective_as_the_trials(tmp_path):
    """The final loss comes from calibration's own sums; it must equal the trials' calibration_loss on the
    same adapter, or the bound would compare two different numbers."""
    from svd_ray.training.local import calibrate_local, prepare_model, train_local
    from svd_ray.training.lr_search import final_calibration_loss
    from svd_ray.training.task_data import load_task_data

    cfg = tiny_config(tmp_path / "store", calibration={"estimator": "validated"})
    data = load_task_data(cfg.data)
    peft_model, tok, _ = prepare_model(cfg)
    train_local(peft_model, tok, data.train, cfg, log=lambda *_: None)
    acc = calibrate_local(peft_model, tok, data.calibration, cfg, progress=None)
    assert final_calibration_loss(acc) == pytest.approx(calibration_loss(peft_model, tok, data.calibration, cfg),
                                                        rel=1e-5)


def test_ray_train_job_never_publishes_an_adapter_that_fails_its_check(ray_session, tmp_path, monkeypatch):
    from svd_ray.store import open_store
    from svd_ray.training import lr_search
    from svd_ray.training.ray_train import run_ray

    monkeypatch.setattr(lr_search, "FINAL_LOSS_RATIO", 0.5)  # a bound no warm-start meets (trained < trial/2)
    cfg = tiny_config(tmp_path / "store", training={"max_steps": 6, "lr_search": {"lrs": [1e-9, 3e-3], "steps": 4}})
    lines = []
    with pytest.raises(RuntimeError, match=r"every searched lr failed.*lr 0\.003.*lr 1e-09"):
        run_ray(cfg, log=lines.append)
    assert sum("warm-start check" in line for line in lines) == 2
    assert open_store(cfg.store).list_versions(cfg.task) == []  # neither attempt was published
