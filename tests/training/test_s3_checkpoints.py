"""Checkpoints and the bundle on S3 (the real Ceph RGW from ``infra/ceph-rgw.sh``): a worker killed
mid-training resumes from checkpoints stored in the bucket, and the bundle is published there.

Run: ``infra/ceph-rgw.sh start && eval "$(infra/ceph-rgw.sh env)" && pytest tests/training -m s3``.
The variables must be exported before pytest starts: the session's Ray workers inherit them.
Skipped without ``SVD_RAY_S3_ENDPOINT`` unless ``SVD_RAY_REQUIRE_S3=1``.
"""
from __future__ import annotations

import os
import uuid

import pytest

from training_helpers import FailOnceHooks, tiny_config

pytestmark = [pytest.mark.s3, pytest.mark.integration]


@pytest.fixture(scope="module")
def s3_bucket():
    endpoint = os.environ.get("SVD_RAY_S3_ENDPOINT")
    if not endpoint:
        if os.environ.get("SVD_RAY_REQUIRE_S3") == "1":
            pytest.fail("SVD_RAY_S3_ENDPOINT is not set (eval \"$(infra/ceph-rgw.sh env)\")")
        pytest.skip("no S3 endpoint (SVD_RAY_S3_ENDPOINT)")
    import boto3

    bucket = f"svd-train-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return bucket


def test_kill_and_resume_with_checkpoints_on_s3(s3_bucket, ray_session, tmp_path, monkeypatch):
    from pyarrow import fs as pafs

    from svd_ray.store import open_store
    from svd_ray.training.ray_train import fit, train_storage
    from svd_ray.training.task_data import load_task_data

    cfg = tiny_config(tmp_path, "s3-killed", training={"max_steps": 6, "checkpoint_every": 2},
                      store=f"s3://{s3_bucket}/store")
    hooks = FailOnceHooks(step=3, rank=cfg.cluster.num_workers - 1, marker=str(tmp_path / "fault-marker"))
    out = fit(cfg, load_task_data(cfg.data), extra={"hooks": hooks})
    assert (tmp_path / "fault-marker").exists()
    assert out["metrics"]["resumed_from"] == [2] and out["metrics"]["steps"] == 6
    fs, path = train_storage(cfg)
    names = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{path}/s3-killed", recursive=False))]
    assert any("checkpoint_" in n for n in names), names
    store = open_store(cfg.store)
    assert store.list_versions(cfg.task) == ["s3-killed"]
    assert store.verify(cfg.task, "s3-killed") == []
