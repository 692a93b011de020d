"""Fixtures for the distributed-training tests.

* ``ray_session``: one local Ray for the whole session (2 CPUs, no dashboard, no log forwarding, its own
  short temp dir); shut down at the end. Only this process's Ray is touched.
* ``make_cfg``: a tiny-llama ``RunConfig`` with a unique run id and a private ``file://`` store.

Ray Train V2 resumes a run with the same name and storage, so every test uses its own run id and store.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from training_helpers import tiny_config

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if ray.is_initialized():
        yield ray
        return
    tmp = tempfile.mkdtemp(prefix="svdtr-", dir="/tmp")  # short: Ray's socket paths are length-limited
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=200 * 1024**2,
        _temp_dir=tmp,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def make_cfg(tmp_path):
    def _make(run_id: str | None = None, **sections):
        return tiny_config(tmp_path / "store", run_id, **sections)

    return _make
