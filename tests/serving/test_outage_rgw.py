"""Storage outage while serving, against the real Ceph RGW (stopped and started by infra/ceph-rgw.sh).

A model pool serves tasks from an ``s3://`` store on the session's RGW; the server is stopped:
* a task already loaded keeps serving (same version, real generation);
* a task not loaded yet is refused with 503, a clear message and a Retry-After, within bounded time;
* the version refresh of the loaded task backs off (10 s, 20 s, … between tries) and keeps its version;
* a publish during the outage fails cleanly (StoreUnavailable) and nothing of it is visible afterwards;
then the server is started again and the pool recovers by itself: the refresh picks up a newer version and
the cold task loads. (The replica error → HTTP 503 + ``Retry-After`` mapping is tested in test_pool.py.)
"""
from __future__ import annotations

import time

import pytest
from serving_helpers import publish_task
from test_pool import gen_req, make_pool

from svd_ray.serving.errors import TaskUnavailable
from svd_ray.serving.handlers import run_generate
from svd_ray.store import StoreUnavailable, open_store

pytestmark = [pytest.mark.s3, pytest.mark.integration]


def test_rgw_stopped_while_serving(rgw, rgw_bucket, bundles, tmp_path):
    uri = f"s3://{rgw_bucket}/serving-outage"
    first = publish_task(uri, "t-up", "lora", bundles["base"], seed=5)
    publish_task(uri, "t-cold", "lora", bundles["base"], seed=6)
    store = open_store(uri, endpoint_url=rgw.endpoint, cache_dir=tmp_path / "cache")
    pool = make_pool(store, bundles, refresh_s=10.0)
    clock = [1000.0]
    pool.clock = lambda: clock[0]
    before = run_generate(pool.acquire("t-up"), gen_req("t-up", n=3))

    rgw.stop()
    try:
        # a loaded task keeps serving, the same tokens as before the outage
        during = run_generate(pool.acquire("t-up"), gen_req("t-up", n=3))
        assert during["version"] == first.version and during["results"] == before["results"]
        # a cold task: 503 with a clear message and a Retry-After, quickly (default S3 client limits)
        t = time.monotonic()
        with pytest.raises(TaskUnavailable) as err:
            pool.acquire("t-cold")
        took = time.monotonic() - t
        body = err.value.to_dict()
        assert err.value.status == 503 and body["retry_after_s"] >= 1, body
        assert "unreachable" in err.value.message and "t-cold" in err.value.message, err.value.message
        assert took < 30, took
        # the refresh backs off and keeps the loaded version
        waits = []
        for _ in range(3):
            clock[0] += 1e4
            assert pool.due_for_refresh() == ["t-up"]
            pool.refresh("t-up")
            assert pool.get("t-up").version == first.version
            waits.append(round(pool.get("t-up").checked_at + pool.refresh_s - clock[0]))
        assert waits == [10, 20, 40], waits
        # a publish during the outage fails cleanly
        with pytest.raises(StoreUnavailable):
            publish_task(uri, "t-new", "lora", bundles["base"], seed=8)
    finally:
        rgw.start()

    # storage is back: nothing of the failed publish is visible, and the pool recovers by itself
    assert "t-new" not in store.list_tasks()
    second = publish_task(uri, "t-up", "lora", bundles["base"], seed=7)
    clock[0] += 1e4
    assert pool.refresh("t-up") == second.version
    assert pool.acquire("t-cold").task == "t-cold" and pool._refresh_delay == {}
    print(f"\nRGW stopped while serving: loaded task kept serving, cold task 503 in {took:.1f} s, "
          f"refresh backoff {waits} s, recovered after restart")
