"""``svd-ray serve --config ...`` and ``serve run config.yaml`` as real processes: start, answer, stop.

``svd-ray serve`` must stop everything it started on SIGTERM or Ctrl-C: Serve, the private Ray (gcs,
raylet, and the raylet's agents ``ray::DashboardAgent`` / ``ray::RuntimeEnvAgent`` and workers, which
``ray.shutdown`` alone orphans for about a minute), remove the temp folders it owns, print no C++ stack
dump (Ray's core worker installs one for SIGTERM) and exit 0.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from serving_helpers import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
STOP_BOUND_S = 120  # serve.shutdown (≤ 30 s per Serve) + ray.shutdown + reaping, on a loaded 2-core machine
# what Ray's C++ failure-signal handler (absl) prints, and Python's own traceback header
STACK_DUMP = re.compile(r"SIGTERM received|SIGINT received|logging\.cc:\d+|PC: @|\*\*\* .* \*\*\*|"
                        r"Traceback \(most recent call last\)")


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


class Served:
    """A command started in its own session (so its whole process tree is identifiable), output in files."""

    def __init__(self, cmd: list[str], env: dict, logs: Path):
        self.out_path, self.err_path = logs / "stdout.txt", logs / "stderr.txt"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._out, stderr=self._err, text=True,
                                     start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.cmd = cmd

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_ready(self, url: str, timeout: float = 150.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.cmd[0]} exited early ({self.proc.returncode}): "
                                     f"{self.stdout[-2000:]}\n{self.stderr[-3000:]}")
            try:
                if requests.get(url + "/v1/tasks", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except requests.RequestException:
                pass
            time.sleep(1)
        self.kill()
        raise AssertionError(f"{self.cmd} not ready after {timeout}s")

    def tree(self) -> list[psutil.Process]:
        """Every live process of the command: its descendants and anything else in its session."""
        found = {}
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                found[p.pid] = p
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter():
            try:
                if p.pid != self.proc.pid and os.getsid(p.pid) == self.proc.pid:
                    found.setdefault(p.pid, p)
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
        return list(found.values())

    def kill(self) -> None:
        """Cleanup after a failed assertion: SIGKILL whatever is left of our own session, nothing else."""
        for p in self.tree():
            try:
                p.kill()
            except psutil.Error:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def close(self) -> None:
        self._out.close()
        self._err.close()


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120] or p.name()}")
        except psutil.NoSuchProcess:
            pass
    return out


def _exercise(url: str) -> None:
    r = requests.post(url + "/v1/tasks/t-lora/generate", json={"prompt": "Q: 1 + 1 = ?\nA:", "max_new_tokens": 3},
                      timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 1
    assert requests.get(url + "/healthz", timeout=5).json() == {"status": "ok"}


def _stop_and_check(served: Served, sig: int, temp_dir: str, *, twice: bool = False,
                    temp_ok=lambda: None) -> tuple[float, list]:
    """Signal the command; assert exit 0 within the bound, no stack dump, nothing of its tree left alive and
    ``temp_ok()`` (None, or what is wrong with the temp dir). Every problem is reported at once."""
    before = served.tree()
    names = " ".join(" ".join(p.cmdline()) for p in before if p.is_running())
    # the tree really is the private Ray: otherwise "nothing left" would prove nothing
    for part in ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::ServeController"):
        assert part in names, (part, names[:2000])
    t0 = time.monotonic()
    served.proc.send_signal(sig)
    if twice:  # a second signal while stopping must not cut the cleanup short
        time.sleep(1.0)
        if served.proc.poll() is None:
            served.proc.send_signal(sig)
    try:
        code = served.proc.wait(STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        served.kill()
        raise AssertionError(f"not stopped {STOP_BOUND_S}s after {signal.Signals(sig).name}: {served.stderr[-3000:]}")
    took = time.monotonic() - t0
    err = served.stderr
    problems = []
    if code != 0:
        problems.append(f"exit status {code}")
    dump = STACK_DUMP.search(err)
    if dump is not None:
        problems.append("stack dump on stderr: " + err[max(0, dump.start() - 300): dump.end() + 1000])
    left = _alive(before) + _alive(served.tree())
    left += [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in psutil.process_iter() if _mentions(p, temp_dir)]
    if left:
        problems.append(f"processes left: {sorted(set(left))}")
    bad_temp = temp_ok()
    if bad_temp:
        problems.append(bad_temp)
    assert not problems, "\n".join(problems) + "\n--- stderr tail:\n" + err[-1500:]
    return took, before


def _mentions(p: psutil.Process, path: str) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE and any(path in a for a in p.cmdline())
    except psutil.Error:
        return False


def test_svd_ray_serve_command_stops_cleanly_on_ctrl_c(bundles, tmp_path):
    """Ctrl-C with an existing ``--temp-dir``: the dir stays (not ours), the Ray session inside it goes."""
    port = free_port()
    cfg = _config(bundles, port, tmp_path / "local.yaml")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="svdcli-", dir="/tmp")  # short: Ray's socket paths have a length limit
    url = f"http://127.0.0.1:{port}"
    served = Served([str(VENV_BIN / "svd-ray"), "serve", "--config", str(cfg), "--temp-dir", temp_dir,
                     "--num-cpus", "1"], env, tmp_path)
    try:
        ready = served.wait_ready(url)
        _exercise(url)
        # the proxy hook it installs: a request uvicorn cannot parse still gets the JSON error shape
        bad = requests.request("FOO", url + "/v1/tasks", timeout=10)
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_http", bad.text
        assert any(e.startswith("session_") for e in os.listdir(temp_dir))
        took, _ = _stop_and_check(served, signal.SIGINT, temp_dir,
                                  temp_ok=lambda: None if os.path.isdir(temp_dir) and not os.listdir(temp_dir)
                                  else f"temp dir: {os.listdir(temp_dir) if os.path.isdir(temp_dir) else 'removed'}")
        assert f"serving svd-ray on http://127.0.0.1:{port}" in served.stdout
        print(f"\nsvd-ray serve ready in {ready:.1f}s, stopped by SIGINT in {took:.1f}s")
    finally:
        served.kill()
        served.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_svd_ray_serve_sigterm_stops_everything(bundles, tmp_path):
    """SIGTERM (twice, as an impatient supervisor would): exit 0, no C++ stack dump, no process of the
    private Ray left (DashboardAgent / RuntimeEnvAgent included), and the temp dir it created is gone."""
    port = free_port()
    cfg = _config(bundles, port, tmp_path / "local.yaml")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    parent = tempfile.mkdtemp(prefix="svdcli-", dir="/tmp")
    temp_dir = os.path.join(parent, "ray")  # does not exist yet: the command creates it, so it owns it
    url = f"http://127.0.0.1:{port}"
    served = Served([str(VENV_BIN / "svd-ray"), "serve", "--config", str(cfg), "--temp-dir", temp_dir,
                     "--num-cpus", "1"], env, tmp_path)
    try:
        served.wait_ready(url)
        _exercise(url)
        assert os.path.isdir(temp_dir)
        took, before = _stop_and_check(served, signal.SIGTERM, temp_dir, twice=True,
                                       temp_ok=lambda: os.path.exists(temp_dir) and f"temp dir left: {os.listdir(temp_dir)}")
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/healthz", timeout=5)
        print(f"\nSIGTERM: exit 0 in {took:.1f}s, {len(before)} processes stopped, temp dir removed")
    finally:
        served.kill()
        served.close()
        shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.slow
def test_serve_run_config_file(bundles, tmp_path):
    port = free_port()
    cfg = _config(bundles, port, tmp_path / "local.yaml")
    tmp = tempfile.mkdtemp(prefix="svdrun-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": tmp}
    env.pop("RAY_ADDRESS", None)
    url = f"http://127.0.0.1:{port}"
    served = Served([str(VENV_BIN / "serve"), "run", str(cfg)], env, tmp_path)
    try:
        served.wait_ready(url)
        _exercise(url)
    finally:
        if served.proc.poll() is None:
            served.proc.send_signal(signal.SIGINT)
            try:
                served.proc.wait(60)
            except subprocess.TimeoutExpired:
                served.kill()
        for p in served.tree():  # `serve run` leaves Ray's agents behind for a while: ours only
            try:
                p.kill()
            except psutil.Error:
                pass
        served.close()
        shutil.rmtree(tmp, ignore_errors=True)
