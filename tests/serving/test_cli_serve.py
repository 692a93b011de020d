"""``svd-ray serve --config ...`` and ``serve run config.yaml`` as real processes: start, answer, stop on Ctrl-C."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml

from serving_helpers import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _config(bundles, port: int, path: Path) -> Path:
    raw = yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())
    raw["http_options"]["port"] = port
    app = raw["applications"][0]
    app["args"]["store"] = bundles["store"]
    app["args"]["cache_dir"] = str(bundles["root"] / "cli-cache")
    app["args"]["base_models"] = [bundles["base"]]
    for d in app["deployments"]:
        d["ray_actor_options"]["num_cpus"] = 0.25
    path.write_text(yaml.safe_dump(raw))
    return path


def _run_until_ready(cmd: list[str], env: dict, url: str, timeout: float = 150.0):
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{cmd[0]} exited early: {proc.stdout.read()[-3000:]}")
        try:
            if requests.get(url + "/v1/tasks", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(1)
    _stop(proc)
    raise AssertionError(f"{cmd} not ready after {timeout}s")


def _stop(proc, timeout: float = 60.0) -> tuple[int | None, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own process group only
            proc.wait(10)
    return proc.returncode, proc.stdout.read()


def _exercise(url: str) -> None:
    r = requests.post(url + "/v1/tasks/t-lora/generate", json={"prompt": "Q: 1 + 1 = ?\nA:", "max_new_tokens": 3},
                      timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 1
    assert requests.get(url + "/healthz", timeout=5).json() == {"status": "ok"}


def test_svd_ray_serve_command(bundles, tmp_path):
    port = free_port()
    cfg = _config(bundles, port, tmp_path / "local.yaml")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="svdcli-", dir="/tmp")
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    proc = _run_until_ready([str(VENV_BIN / "svd-ray"), "serve", "--config", str(cfg), "--temp-dir", temp_dir,
                             "--num-cpus", "1"], env, url)
    ready = time.monotonic() - t0
    try:
        _exercise(url)
    finally:
        code, out = _stop(proc)
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert f"serving svd-ray on http://127.0.0.1:{port}" in out
    assert code == 0, out[-2000:]
    print(f"\nsvd-ray serve ready in {ready:.1f}s")


@pytest.mark.slow
def test_serve_run_config_file(bundles, tmp_path):
    port = free_port()
    cfg = _config(bundles, port, tmp_path / "local.yaml")
    tmp = tempfile.mkdtemp(prefix="svdrun-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": tmp}
    env.pop("RAY_ADDRESS", None)
    url = f"http://127.0.0.1:{port}"
    proc = _run_until_ready([str(VENV_BIN / "serve"), "run", str(cfg)], env, url)
    try:
        _exercise(url)
    finally:
        _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
