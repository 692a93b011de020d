"""Run by test_multinode.py in its own interpreter (a multi-node Ray must not meet the session's local Ray).

A head with no CPUs and two 1-CPU worker nodes (``ray.cluster_utils.Cluster``, all on this machine): the
2-worker Ray Train run must place one worker per node. After the first checkpoint lands, one worker node is
removed without grace (its raylet and workers die), then:

* ``replace``: a fresh node joins; the run must resume from its checkpoint on two workers, finish, and
  publish a bundle that verifies;
* ``elastic``: no node comes back; the run (``cluster.min_workers: 1``, ZeRO-3, no dropout) must continue
  on the one remaining worker from its checkpoint and end where an uninterrupted two-worker run of the same
  config (run first, on both nodes) ends.

Prints ``RESULT {json}``.
"""
import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
sys.path.insert(0, str(Path(__file__).parent))

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from training_helpers import tiny_config  # noqa: E402


def _wait_for_registered_checkpoint(run_dir: Path) -> int:
    deadline = time.monotonic() + 300
    while not list(run_dir.glob("checkpoint_*/state.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    # Ray Train registers a reported checkpoint at its next poll of the workers (every 2 s): wait past it
    time.sleep(3.0)
    return max(json.loads(f.read_text())["step"] for f in run_dir.glob("checkpoint_*/state.json"))


def _adapter(store, cfg, version: str, dest: Path) -> dict:
    from safetensors.torch import load_file

    path, _ = store.fetch(cfg.task, version, dest_dir=dest)
    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


def main(store: str, tmp: str, mode: str = "replace") -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": tmp,
                                                            "object_store_memory": 150 * 1024**2})
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=150 * 1024**2) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    from svd_ray.store import open_store
    from svd_ray.training.ray_train import fit, train_storage
    from svd_ray.training.task_data import load_task_data

    elastic = mode == "elastic"
    if elastic:
        def make(run_id):
            return tiny_config(Path(store), run_id, peft={"method": "lora", "dropout": 0.0},
                               training={"epochs": 4, "max_steps": 24, "checkpoint_every": 4},
                               cluster={"zero_stage": 3, "max_failures": 3, "min_workers": 1})

        ref_cfg = make("elastic-ref")
        ref = fit(ref_cfg, load_task_data(ref_cfg.data))  # uninterrupted, on both nodes
        cfg = make("elastic")
    else:
        cfg = tiny_config(Path(store), "multinode", training={"epochs": 8, "max_steps": 48, "checkpoint_every": 4},
                          cluster={"zero_stage": 2, "max_failures": 3})
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(out=fit(cfg, load_task_data(cfg.data))), daemon=True)
    runner.start()
    steps_seen = _wait_for_registered_checkpoint(Path(train_storage(cfg)[1]) / cfg.run_id)
    # both worker nodes' single CPU is taken by a training worker (one worker per node)
    from ray._private.state import available_resources_per_node

    free = available_resources_per_node()
    busy_nodes = sum(1 for n in nodes if free.get(n.unique_id, {}).get("CPU", 0.0) == 0.0)
    cluster.remove_node(nodes[1], allow_graceful=False)
    killed_at = time.monotonic()
    if not elastic:
        cluster.add_node(num_cpus=1, object_store_memory=150 * 1024**2)  # the replacement the autoscaler would bring
    runner.join(timeout=600)
    out = result["out"]
    store_ = open_store(cfg.store)
    report = {
        "worker_nodes_before": busy_nodes, "checkpoint_step_at_kill": steps_seen,
        "resumed_from": out["metrics"]["resumed_from"], "steps": out["metrics"]["steps"],
        "world_size": out["metrics"]["world_size"], "world_sizes": out["metrics"].get("world_sizes"),
        "width": out["metrics"].get("width"), "published": out["published"]["version"],
        "verify_problems": store_.verify(cfg.task, out["published"]["version"]),
        "recovery_s": round(time.monotonic() - killed_at, 1),
    }
    if elastic:
        a = _adapter(store_, ref_cfg, "elastic-ref", Path(tmp) / "f-ref")
        b = _adapter(store_, cfg, "elastic", Path(tmp) / "f-el")
        report["adapter_max_rel_diff"] = max(
            float((b[k] - a[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)
        report["mu"] = out["mu"]
        report["mu_ref"] = ref["mu"]
    print("RESULT " + json.dumps(report), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
