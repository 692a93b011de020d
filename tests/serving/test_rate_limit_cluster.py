"""Cluster-wide rate limits: ingress replicas share one ledger (a Ray actor), so a tenant's limit holds
however many replicas answer it; when the ledger is unreachable each replica falls back to its own buckets
(documented fail-open) and counts it."""
import asyncio
import shutil
import tempfile

import pytest

from svd_ray.serving.auth import RATE_LIMIT_ACTOR, ClusterRateLimiter, RateLimiter, Tenant
from svd_ray.serving.schemas import ApiError, RateLimit

NS = "rl-test"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    temp = tempfile.mkdtemp(prefix="svdrl-", dir="/tmp")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20,
             _temp_dir=temp, namespace=NS)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _admitted(limiters, tenant, n):
    ok, refused = 0, []
    for i in range(n):
        try:
            asyncio.run(limiters[i % len(limiters)].check(tenant))
            ok += 1
        except ApiError as exc:
            refused.append(exc)
    return ok, refused


def test_two_ingress_replicas_share_one_limit(ray_local):
    tenant = Tenant("acme", None, RateLimit(requests_per_second=0.01, burst=5))
    replicas = [ClusterRateLimiter(namespace=NS, timeout_s=60), ClusterRateLimiter(namespace=NS, timeout_s=60)]
    ok, refused = _admitted(replicas, tenant, 20)
    assert [r.fallbacks for r in replicas] == [0, 0]  # every decision came from the shared ledger
    assert ok == 5, ok  # per-replica buckets would have let 10 through
    assert all(r.status == 429 and int(r.headers["Retry-After"]) >= 1 and "this API key" in r.message for r in refused)
    assert [r.fallbacks for r in replicas] == [0, 0]
    # the same traffic through per-replica limiters: twice the limit (what the ledger prevents)
    local = [RateLimiter(), RateLimiter()]
    passed = 0
    for i in range(20):
        try:
            local[i % 2].check(tenant)
            passed += 1
        except ApiError:
            pass
    assert passed == 10


def test_unreachable_ledger_falls_back_to_per_replica_buckets(ray_local):
    ray = ray_local
    tenant = Tenant("beta", None, RateLimit(requests_per_second=0.01, burst=3))
    replica = ClusterRateLimiter(namespace=NS, timeout_s=60, retry_s=600)
    assert _admitted([replica], tenant, 1)[0] == 1  # the ledger exists and answers
    ray.kill(ray.get_actor(RATE_LIMIT_ACTOR, namespace=NS), no_restart=True)
    ok, refused = _admitted([replica], tenant, 6)
    assert replica.fallbacks == 6 and ok == 3 and len(refused) == 3  # the replica's own bucket: burst 3
