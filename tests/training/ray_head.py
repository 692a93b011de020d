"""Start a private Ray head for a test and stop exactly the processes it started (never ``ray stop``).

Other Ray clusters may run on the same machine, so:

* every port a head opens is chosen free here and passed explicitly (GCS, dashboard, dashboard agent,
  runtime-env agent, metrics, Ray client server, node/object manager), everything binds to 127.0.0.1;
* the head gets its own short ``--temp-dir``;
* stopping = SIGTERM, then SIGKILL after a grace period, to every process whose command line, working
  directory or open session files mention that temp dir, plus all their descendants (workers, the job
  supervisor and the job's driver). Processes of other clusters never mention our temp dir and are not
  descendants of ours, so they are untouched.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid → (ppid, cmdline, cwd) for every readable process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                cwd = ""
            out[pid] = (ppid, cmd, cwd)
        except (OSError, IndexError, ValueError):
            continue
    return out


def processes_of(temp_dir: str) -> set[int]:
    """PIDs belonging to the cluster rooted at ``temp_dir`` (matches + all descendants)."""
    table = _proc_table()
    me = os.getpid()
    roots = {pid for pid, (_, cmd, cwd) in table.items() if pid != me and (temp_dir in cmd or cwd.startswith(temp_dir))}
    found = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _, _) in table.items():
            if ppid in found and pid not in found and pid != me:
                found.add(pid)
                changed = True
    return found


class RayHead:
    """``with RayHead(num_cpus=2) as head: head.dashboard_url``"""

    def __init__(self, num_cpus: int = 2, env: dict | None = None):
        self.num_cpus = num_cpus
        self.temp_dir = tempfile.mkdtemp(prefix="svdh-", dir="/tmp")  # short: socket paths are length-limited
        self.env = dict(os.environ)
        venv_bin = str(Path(sys.executable).parent)
        self.env.update(
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            PATH=venv_bin + os.pathsep + self.env.get("PATH", ""),  # the job's `python` = this venv's
        )
        self.env.pop("RAY_ADDRESS", None)
        self.env.update(env or {})
        ports = free_ports(9)
        self.gcs_port, self.dashboard_port = ports[0], ports[1]
        self.args = [
            str(Path(sys.executable).parent / "ray"), "start", "--head",
            f"--port={ports[0]}", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={ports[1]}", "--include-dashboard=true",
            f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
            f"--runtime-env-agent-port={ports[4]}", f"--metrics-export-port={ports[5]}",
            f"--ray-client-server-port={ports[6]}", f"--node-manager-port={ports[7]}",
            f"--object-manager-port={ports[8]}",
            f"--temp-dir={self.temp_dir}", f"--num-cpus={num_cpus}", "--disable-usage-stats",
        ]

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 120.0) -> "RayHead":
        proc = subprocess.run(self.args, env=self.env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        self._wait_for_jobs_api(timeout_s)
        return self

    def _wait_for_jobs_api(self, timeout_s: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.dashboard_url + "/api/version", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"Ray dashboard at {self.dashboard_url} did not come up")

    def stop(self, grace_s: float = 5.0) -> set[int]:
        """SIGTERM our processes; SIGKILL whatever is left after ``grace_s``; returns the PIDs signalled.

        (Ray's gcs_server/raylet take a long graceful shutdown on SIGTERM — ``ray stop`` itself waits 16 s
        before SIGKILL; a throwaway test cluster needs none of it.)"""
        signalled: set[int] = set()

        def signal_all(sig) -> set[int]:
            pids = processes_of(self.temp_dir)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                    signalled.add(pid)
                except ProcessLookupError:
                    pass
            return pids

        signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while processes_of(self.temp_dir) and time.monotonic() < deadline:
            time.sleep(0.25)
        deadline = time.monotonic() + 10
        while signal_all(signal.SIGKILL) and time.monotonic() < deadline:
            time.sleep(0.25)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return signalled

    def __enter__(self) -> "RayHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
