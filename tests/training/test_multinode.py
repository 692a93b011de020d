"""Training across two Ray nodes (``ray.cluster_utils.Cluster`` on this machine), one node killed mid-run:
the run resumes from its checkpoint on the replacement node and publishes a bundle that verifies.
Runs in a child interpreter (see multinode_train_run.py) so the multi-node Ray never meets the session's."""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _run(tmp_path, mode: str) -> dict:
    temp = tempfile.mkdtemp(prefix="svdmn-", dir="/tmp")  # short: Ray's socket paths are length-limited
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("multinode_train_run.py")),
                           str(tmp_path / "store"), temp, mode], capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow  # ~2.5 min; the default suite's node-loss test is the elastic one below (also verifies the bundle)
def test_node_killed_mid_training_resumes_on_a_replacement_node(tmp_path):
    r = _run(tmp_path, "replace")
    assert r["worker_nodes_before"] == 2  # the two workers really ran on two nodes
    assert r["resumed_from"] and all(s % 4 == 0 for s in r["resumed_from"]), r  # from a training checkpoint
    assert r["steps"] == 48 and r["world_size"] == 2 and r["published"] == "multinode"
    assert r["verify_problems"] == [], r
    print(f"\nnode killed mid-training: resumed from step {r['resumed_from']}, recovered in {r['recovery_s']} s")


def test_node_killed_without_replacement_continues_on_fewer_workers(tmp_path):
    """Elastic (``cluster.min_workers: 1``), ZeRO-3: one of two worker nodes dies and none replaces it; Ray
    Train restarts the group with the one worker left, which resumes from the checkpoint with the portable
    optimizer state and ends where the uninterrupted two-worker run ends (μ̄ and adapter)."""
    r = _run(tmp_path, "elastic")
    assert r["worker_nodes_before"] == 2, r
    assert r["resumed_from"] and all(s % 4 == 0 for s in r["resumed_from"]), r
    assert r["world_sizes"][0] == 2 and r["world_sizes"][-1] == 1 and r["width"] == 2, r
    assert r["steps"] == 24 and r["verify_problems"] == [], r
    assert r["adapter_max_rel_diff"] < 1e-4, r
    for name in ("mean", "median", "sequence"):
        assert r["mu"][name] == pytest.approx(r["mu_ref"][name], rel=1e-4, abs=1e-6), (name, r)
    print(f"\nnode lost, no replacement: resumed from step {r['resumed_from']} on {r['world_sizes']} workers, "
          f"adapter max rel diff {r['adapter_max_rel_diff']:.1e}, μ̄ {r['mu']['mean']:+.5f} vs {r['mu_ref']['mean']:+.5f}")
