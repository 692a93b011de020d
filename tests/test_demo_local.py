"""The single-process pipeline end to end on the tiny model: train → calibrate → publish → fetch → steer."""
import json
import warnings

import pytest
import torch

from svd_ray.config import RunConfig
from svd_ray.demo import run_local
from svd_ray.engine import TaskModel
from svd_ray.store import open_store

warnings.filterwarnings("ignore")


@pytest.mark.integration
def test_run_local_publishes_a_bundle_that_reloads(tmp_path):
    store_uri = (tmp_path / "store").as_uri()
    cfg = RunConfig.model_validate(
        {
            "run_id": "tiny-demo",
            "model": "tiny-llama",
            "store": store_uri,
            "training": {"max_steps": 3, "lr": 1e-3, "max_length": 48},
            "data": {"calibration_size": 6, "eval_size": 5},
        }
    )
    lines = []
    result = run_local(cfg, log=lines.append)
    assert result["n_mc"] == 5
    assert set(result["mc_acc"]) >= {"base", "peft", "svdecode", "mask_only", "no_mask", "static"}
    assert all(0.0 <= v <= 1.0 for v in result["mc_acc"].values())
    assert any("step 3/3" in line for line in lines)

    store = open_store(store_uri)
    versions = store.list_versions("tiny-demo")
    assert versions == [result["version"]]
    manifest = store.manifest("tiny-demo", versions[0])
    meta = manifest.meta
    assert meta["peft"]["method"] == "lora" and meta["base_model"]["id"] == "tiny-llama"
    assert meta["mu"]["value"] == pytest.approx(result["mu"])
    assert set(meta["mu"]["estimates"]) == {"mean", "median", "sequence", "trimmed_mean", "validated"}
    assert meta["mu"]["estimator"] == "validated" and meta["mu"]["default_mode"] in ("svdecode", "off")
    assert meta["mu"]["validation"]["reason"]  # why the task is (not) steered, visible in tasks show
    assert (meta["mu"]["default_mode"] == "off") == (meta["mu"]["validation"]["steer"] is False)
    ids = meta["splits"]["ids"]
    assert set(ids) == {"train", "calibration", "eval"}
    assert not (set(ids["train"]) & set(ids["calibration"])) and not (set(ids["train"]) & set(ids["eval"]))
    assert not (set(ids["calibration"]) & set(ids["eval"]))
    path, _ = store.fetch("tiny-demo", "latest")
    tm = TaskModel.from_bundle(path, model="tiny-llama")
    steering = json.loads((path / "steering.json").read_text())
    assert tm.data.mu == pytest.approx(steering["mu"])
    assert tm.data.mean_delta is not None and tm.data.mean_delta.shape == (len(tm.tokenizer),)
    # the reloaded adapter is the trained one: it differs from the base model
    ids = tm.tokenizer("Q: 1 + 2 = ?\nA:", return_tensors="pt")["input_ids"]
    z_phi, z_theta, _ = tm.dual.prefill(ids, last_only=True)
    assert not torch.allclose(z_phi, z_theta)
