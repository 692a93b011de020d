"""RunConfig: YAML loading, overrides, validation errors that name the field."""
import pytest
from pydantic import ValidationError

from svd_ray.config import RunConfig


def test_yaml_round_trip_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_id: abc\npeft:\n  method: ia3\ntraining:\n  lr: 1.0e-4\n")
    cfg = RunConfig.from_yaml(path, {"training.max_steps": 3, "cluster.zero_stage": 3})
    assert cfg.peft.method == "ia3" and cfg.training.lr == 1e-4 and cfg.training.max_steps == 3
    assert cfg.cluster.zero_stage == 3 and cfg.task == "abc"
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())
    assert RunConfig.from_yaml(again) == cfg
    assert cfg.peft.settings().method == "ia3"


@pytest.mark.parametrize(
    "data, field",
    [
        ({"peft": {"method": "adalora"}}, "peft.method"),
        ({"training": {"lr": 0}}, "training.lr"),
        ({"training": {"lrr": 1}}, "training.lrr"),
        ({"run_id": "../etc"}, "run_id"),
        ({"cluster": {"zero_stage": 1}}, "cluster.zero_stage"),
        ({"calibration": {"alpha": 2}}, "calibration.alpha"),
        ({"calibration": {"estimator": "mode"}}, "calibration.estimator"),
    ],
)
def test_bad_fields_are_named(data, field):
    with pytest.raises(ValidationError) as err:
        RunConfig.model_validate(data)
    assert field in str(err.value).replace("\n", ".").replace(" ", "")


def test_fp16_on_cpu_rejected():
    with pytest.raises(ValidationError, match="fp16"):
        RunConfig.model_validate({"cluster": {"precision": "fp16"}})


def test_top_level_must_be_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        RunConfig.from_yaml(path)
