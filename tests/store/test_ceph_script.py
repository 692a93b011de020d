"""infra/ceph-rgw.sh: argument handling (fast), and a full private start/use/stop cycle (slow)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "ceph-rgw.sh"


def sh(*args: str, env: dict[str, str] | None = None, timeout: int = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def test_usage_and_empty_state(tmp_path: Path) -> None:
    assert sh().returncode == 2
    assert sh("frobnicate").returncode == 2
    state = str(tmp_path / "state")
    r = sh("--dir", state, "env")
    assert r.returncode != 0 and "run" in r.stderr and "start" in r.stderr
    r = sh("--dir", state, "stop")
    assert r.returncode == 0 and "nothing running" in r.stderr
    assert sh("--dir", state, "status").returncode != 0
    r = sh("purge", env={"SVD_RAY_CEPH_DIR": str(tmp_path)})  # not a state dir: refused
    assert r.returncode != 0 and tmp_path.exists()


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.integration
def test_private_cluster_lifecycle(tmp_path: Path) -> None:
    """Start a second, private cluster in a temp dir, use it, and check `stop` kills exactly its PIDs."""
    if not shutil.which("radosgw"):
        pytest.skip("Ceph is not installed (infra/ceph-rgw.sh install)")
    state = str(tmp_path / "ceph")
    r = sh("--dir", state, "start", timeout=180)
    try:
        assert r.returncode == 0, r.stderr
        pids = {p.stem: int(p.read_text()) for p in (tmp_path / "ceph" / "pids").glob("*.pid")}
        assert set(pids) == {"mon", "osd", "radosgw"}
        env_lines = sh("--dir", state, "env").stdout
        env = dict(line.removeprefix("export ").split("=", 1) for line in env_lines.splitlines())
        assert env["SVD_RAY_S3_ENDPOINT"].startswith("http://127.0.0.1:")
        code = (
            "import boto3,os; c=boto3.client('s3', endpoint_url=os.environ['SVD_RAY_S3_ENDPOINT']);"
            "c.create_bucket(Bucket='life'); print(len(c.list_buckets()['Buckets']))"
        )
        out = subprocess.run(
            [os.sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ, **env}
        )
        assert out.returncode == 0, out.stderr
        assert sh("--dir", state, "status").returncode == 0
    finally:
        r = sh("--dir", state, "stop", timeout=120)
    assert r.returncode == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids.values())
    assert sh("--dir", state, "purge").returncode == 0 and not (tmp_path / "ceph").exists()
