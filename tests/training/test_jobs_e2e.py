"""End to end through the Ray Jobs API: a private Ray head (explicit ports, own temp dir), ``svd-ray submit
train --wait``, ``status``, ``logs``, the published bundle; then exactly the head's processes are stopped."""
from __future__ import annotations

import json

import pytest
import yaml

from ray_head import RayHead, processes_of
from training_helpers import tiny_config

pytestmark = pytest.mark.integration


def test_submit_train_through_jobs_api(tmp_path, capsys):
    from svd_ray.cli import main
    from svd_ray.store import open_store

    cfg = tiny_config(tmp_path / "store", "jobs-e2e", training={"max_steps": 2, "log_every": 1})
    config_file = tmp_path / "run.yaml"
    # a user-style config: only what differs from the defaults, plus a --set override below
    config_file.write_text(yaml.safe_dump({k: v for k, v in cfg.model_dump().items() if k != "calibration"}))

    head = RayHead(num_cpus=2)
    try:
        head.start()
        rc = main(["submit", "train", str(config_file), "--address", head.dashboard_url, "--wait",
                   "--set", "calibration.batch_size=4"])
        out = capsys.readouterr().out
        assert rc == 0, out[-3000:]
        assert "submitted run jobs-e2e" in out
        assert "[jobs-e2e] step 2/2" in out  # progress lines reach the submitter through the job logs
        assert "run jobs-e2e: SUCCEEDED" in out

        assert main(["status", "jobs-e2e", "--address", head.dashboard_url]) == 0
        status = capsys.readouterr().out
        print(status)
        assert "run jobs-e2e: SUCCEEDED" in status and "progress: [jobs-e2e] step 2/2" in status
        result = json.loads(status.split("result: ", 1)[1].splitlines()[0])
        assert result["version"] == "jobs-e2e" and result["task"] == "jobs-e2e"

        assert main(["logs", "jobs-e2e", "--address", head.dashboard_url]) == 0
        assert "RESULT " in capsys.readouterr().out

        assert main(["status", "no-such-run", "--address", head.dashboard_url]) == 2
        assert "no job with submission id 'no-such-run'" in capsys.readouterr().err
    finally:
        signalled = head.stop()
    assert signalled, "no head processes were found to stop"
    assert not processes_of(head.temp_dir)

    store = open_store(cfg.store)
    assert store.list_versions("jobs-e2e") == ["jobs-e2e"]
    path, manifest = store.fetch("jobs-e2e", "jobs-e2e", dest_dir=tmp_path / "bundle")
    assert (path / "adapter" / "adapter_config.json").exists() and (path / "steering.safetensors").exists()
    assert manifest.meta["provenance"]["run_id"] == "jobs-e2e"
    assert manifest.meta["metrics"]["train"]["steps"] == 2
    assert manifest.meta["provenance"]["config"]["calibration"]["batch_size"] == 4
