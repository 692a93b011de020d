"""Run by test_multinode_serving.py in its own interpreter (a multi-node Ray must not meet other tests').

``ray.cluster_utils.Cluster`` on this machine: a head for Serve's controller, proxy and ingress (custom
resource ``ingress``), two worker nodes with one ``model`` resource each, so the two model replicas land on
different nodes. Under a steady load of generate requests one model node is removed without grace; a
replacement node joins (what an autoscaler would bring). Prints ``RESULT {json}``: every request's status,
how many replicas were running before / after, and the time until two were running again.
"""
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).parent))

import ray  # noqa: E402
import requests  # noqa: E402
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from serving_helpers import auth, free_port, make_sharp_base, publish_task, write_tenants  # noqa: E402

MB = 1024**2


def running_replicas() -> int:
    status = serve.status().applications["svd-ray"].deployments["TaskModels"]
    return status.replica_states.get("RUNNING", 0)


def main(root: str) -> None:
    root = Path(root)
    base = make_sharp_base(root / "sharp-tiny")
    store = (root / "store").as_uri()
    publish_task(store, "t-lora", "lora", base, seed=0)
    tenants = write_tenants(root / "tenants.yaml")
    temp = tempfile.mkdtemp(prefix="svdmns-", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"ingress": 1},
                                                            "temp_dir": temp, "object_store_memory": 150 * MB})
    nodes = [cluster.add_node(num_cpus=1, resources={"model": 1}, object_store_memory=150 * MB) for _ in range(2)]
    ray.init(address=cluster.address, namespace="serve", log_to_driver=False)
    port = free_port()
    try:
        from svd_ray.serving.deployments import make_app

        # one proxy, on the head: all "nodes" share 127.0.0.1 here, so per-node proxies would share the port
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        args = {"store": store, "cache_dir": str(root / "cache"), "base_models": [base],
                "auth": {"mode": "keys", "tenants_file": str(tenants)},
                "pool": {"max_tasks": 2, "max_bytes": "1GiB", "refresh_s": 5.0, "device": "cpu"},
                "request_timeout_s": 60, "retries": 1}
        app = make_app(args, model_options={"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5,
                                                                                      "resources": {"model": 1}}},
                       ingress_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.2,
                                                                                  "resources": {"ingress": 0.1}}})
        serve.run(app, name="svd-ray", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/tasks/t-lora/generate"
        before = running_replicas()
        stop = threading.Event()
        results: list = []

        def one(i: int):
            try:
                r = requests.post(url, json={"prompt": f"item {i}", "max_new_tokens": 8}, headers=auth("bulk"),
                                  timeout=120)
                return r.status_code, r.headers.get("content-type", "")
            except Exception as exc:  # a lost request
                return repr(exc), ""

        def load():
            with ThreadPoolExecutor(max_workers=6) as pool:
                i = 0
                while not stop.is_set():
                    futures = [pool.submit(one, i + k) for k in range(6)]
                    i += 6
                    results.extend(f.result() for f in futures)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        time.sleep(8)  # steady load on both replicas
        cluster.remove_node(nodes[1], allow_graceful=False)
        killed = time.monotonic()
        cluster.add_node(num_cpus=1, resources={"model": 1}, object_store_memory=150 * MB)
        back, noticed = None, False
        while time.monotonic() - killed < 240:
            running = running_replicas()
            noticed = noticed or running < 2  # the controller saw the replica die
            if noticed and running == 2:
                back = round(time.monotonic() - killed, 1)
                break
            time.sleep(0.5)
        time.sleep(5)  # load keeps running on the recovered deployment
        stop.set()
        loader.join(timeout=180)
        print("RESULT " + json.dumps({"replicas_before": before, "recovered_after_s": back,
                                      "replicas_after": running_replicas(), "statuses": [s for s, _ in results],
                                      "json_errors": all("json" in c for s, c in results if s != 200)}), flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1])
