"""Fixtures: tiny real bundles in a file:// store, and one Serve application on a private local Ray.

The Serve app (``serve_app``) is module-scoped (one per HTTP test module): Ray start +
deployment take ~20-25 s on 2 CPUs. Ray runs with token auth off, 2 CPUs, no dashboard, its own
temp dir, and is shut down at the end (nothing else on the machine is touched).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from serving_helpers import TASKS, free_port, make_sharp_base, publish_task, write_tenants

from rgw_control import rgw, rgw_bucket, rgw_endpoint  # noqa: F401 - the real S3 server (outage tests)

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def bundles(tmp_path_factory):
    """{"base": sharp tiny base folder, "store": file:// URI, "tasks": {task: method}, "root": Path}."""
    root = tmp_path_factory.mktemp("serving")
    base = make_sharp_base(root / "sharp-tiny")
    store_uri = (root / "store").as_uri()
    for i, (task, method) in enumerate(TASKS.items()):
        publish_task(store_uri, task, method, base, seed=i)
    return {"base": base, "store": store_uri, "tasks": dict(TASKS), "root": root}


@pytest.fixture(scope="session")
def store(bundles):
    from svd_ray.store import open_store

    return open_store(bundles["store"], cache_dir=bundles["root"] / "test-cache")


ENGINE_MAX_KV_TOKENS = 4096


def app_args(bundles, tenants_file: Path, **over) -> dict:
    args = {
        "store": bundles["store"],
        "cache_dir": str(bundles["root"] / "replica-cache"),
        "base_models": [bundles["base"]],
        "auth": {"mode": "keys", "tenants_file": str(tenants_file)},
        "limits": {"max_body_bytes": 16384, "max_prompts": 4, "max_new_tokens": 256, "max_beams": 3,
                   "max_choices": 6, "max_prompt_chars": 4000, "max_prompt_tokens": 512},
        "pool": {"max_tasks": 4, "max_bytes": "1GiB", "refresh_s": 1.0, "device": "cpu"},
        # the KV budget is what a long /score request runs into (tests of the memory bound); the rest: defaults
        "engine": {"max_kv_tokens": ENGINE_MAX_KV_TOKENS},
        "request_timeout_s": 60,
        "retries": 1,
        "listing_ttl_s": 1.0,
    }
    args.update(over)
    return args


@pytest.fixture(scope="module")
def serve_app(bundles):
    """Base URL of a running svd-ray Serve app (2 model replicas, 1 ingress) on a private Ray."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from svd_ray.serving.deployments import make_app

    tenants = write_tenants(bundles["root"] / "tenants.yaml",
                            rates={"slow": {"requests_per_second": 0.2, "burst": 2}})
    temp_dir = tempfile.mkdtemp(prefix="svdsrv-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20,
             _temp_dir=temp_dir, namespace="serve")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = app_args(bundles, tenants)
        app = make_app(args, model_options={"num_replicas": 2}, ingress_options={"num_replicas": 1})
        serve.run(app, name="svd-ray", route_prefix="/")
        print(f"\n[serve_app] ready in {time.perf_counter() - t0:.1f}s on port {port}")
        yield {"url": f"http://127.0.0.1:{port}", "bundles": bundles, "tenants": tenants, "args": args}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
