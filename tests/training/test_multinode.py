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


def test_node_killed_mid_training_resumes_on_a_replacement_node(tmp_path):
    temp = tempfile.mkdtemp(prefix="svdmn-", dir="/tmp")  # short: Ray's socket paths are length-limited
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("multinode_train_run.py")),
                           str(tmp_path / "store"), temp], capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["worker_nodes_before"] == 2  # the two workers really ran on two nodes
    assert r["resumed_from"] and all(s % 4 == 0 for s in r["resumed_from"]), r  # from a training checkpoint
    assert r["steps"] == 48 and r["world_size"] == 2 and r["published"] == "multinode"
    assert r["verify_problems"] == [], r
    print(f"\nnode killed mid-training: resumed from step {r['resumed_from']}, recovered in {r['recovery_s']} s")
