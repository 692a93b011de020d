"""A tenant's rate limit holds across ingress replicas: two Ingress replicas behind Serve's proxy share one
ledger, so a tenant with burst 3 gets 3 requests through, not 6 — and both replicas did answer it."""
from __future__ import annotations

import os
import re
import shutil
import tempfile

import pytest
import requests

from conftest import app_args
from serving_helpers import auth, free_port, write_tenants

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_ingress_url(bundles):
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve

    from svd_ray.serving.deployments import make_app

    tenants = write_tenants(bundles["root"] / "tenants-rl.yaml",
                            rates={"slow": {"requests_per_second": 0.01, "burst": 3}})
    temp_dir = tempfile.mkdtemp(prefix="svdrlh-", dir="/tmp")
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20,
             _temp_dir=temp_dir, namespace="serve")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = make_app(app_args(bundles, tenants), model_options={"num_replicas": 1},
                       ingress_options={"num_replicas": 2})
        serve.run(app, name="svd-ray", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


def test_limit_is_shared_by_two_ingress_replicas(two_ingress_url):
    codes = [requests.get(two_ingress_url + "/v1/tasks", headers=auth("slow"), timeout=60).status_code
             for _ in range(24)]
    assert codes.count(200) == 3 and codes.count(429) == 21, codes  # per-replica buckets would allow 6
    # both ingress replicas answered this tenant (each exports its own series, label replica=...)
    seen: dict[str, float] = {}
    for _ in range(40):
        text = requests.get(two_ingress_url + "/metrics", headers=auth("bulk"), timeout=60).text
        for m in re.finditer(r'svd_ray_tenant_requests_total\{([^}]*)\} ([0-9.e+]+)', text):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if labels.get("tenant") == "slow":
                seen[labels["replica"]] = max(seen.get(labels["replica"], 0.0), float(m.group(2)))
        if len(seen) == 2:
            break
    assert len(seen) == 2, seen
    fallback = re.findall(r"svd_ray_rate_limit_fallback_total\{[^}]*\} ([0-9.e+]+)", text)
    assert all(float(v) == 0 for v in fallback)  # every decision came from the shared ledger
