"""First-use model preparation: concurrent callers, torch.distributed callers, broken and partial entries.

Every test starts from an empty cache directory (``SVD_RAY_CACHE`` → ``tmp_path``), whatever the machine
has in ``~/.cache``: the cold path is what a new user runs.
"""
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from svd_ray.models.cache import ENTRY_MANIFEST, ensure_entry, entry_problems, read_manifest

HELPER = Path(__file__).with_name("cache_helpers.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache: Path) -> dict:
    env = dict(os.environ, SVD_RAY_CACHE=str(cache), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    return env


def _race(model: str, cache: Path, tmp_path: Path) -> list[subprocess.CompletedProcess]:
    """Two plain processes and a 2-rank gloo group (as under Ray Train) ask for ``model`` at the same moment."""
    go = tmp_path / "go"
    port = _free_port()
    cmds = [[model, str(go)], [model, str(go)], [model, str(go), "0", "2", str(port)],
            [model, str(go), "1", "2", str(port)]]
    procs = [subprocess.Popen([sys.executable, str(HELPER), *c], env=_env(cache), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in cmds]
    time.sleep(3.0)  # let the gloo pair rendezvous before anyone starts
    go.write_text("go")
    out = []
    for p, c in zip(procs, cmds):
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(c, p.returncode, stdout, stderr))
    return out


@pytest.mark.integration
@pytest.mark.parametrize("model", ["tiny-llama", "smollm2-135m"])
def test_concurrent_first_use_builds_once_and_every_process_loads(model, tmp_path):
    cache = tmp_path / "cache"
    results = _race(model, cache, tmp_path)
    for r in results:
        assert r.returncode == 0, f"{r.args}: {r.stderr[-2000:]}"
    sums = {r.stdout.split()[-1] for r in results}
    assert len(sums) == 1, f"processes loaded different models: {sums}"
    builds = sum(r.stderr.count(f"svd-ray: preparing {model} ") for r in results)
    assert builds == 1, f"expected exactly one conversion, saw {builds}"
    folder = cache / "models" / model
    assert entry_problems(folder, full=True) == []
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(read_manifest(folder)["files"])


def _plant_old_broken_entry(folder: Path) -> None:
    """What two racing converters of svd-ray ≤ 0.1 left on users' disks: tokenizer files and a marker only."""
    folder.mkdir(parents=True)
    for name in (".complete", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).write_text("{}" if name.endswith(".json") else "ok")


@pytest.mark.integration
def test_broken_entry_from_older_version_is_reported_and_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    _plant_old_broken_entry(cache / "models" / "tiny-llama")
    go = tmp_path / "go"
    go.write_text("go")
    r = subprocess.run([sys.executable, str(HELPER), "tiny-llama", str(go)], env=_env(cache), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [l for l in r.stderr.splitlines() if "is incomplete" in l]
    assert len(lines) == 1 and "config.json missing" in lines[0] and "model.safetensors missing" in lines[0]
    assert entry_problems(cache / "models" / "tiny-llama", full=True) == []
    assert not (cache / "models" / "tiny-llama" / ".complete").exists()


@pytest.mark.integration
def test_truncated_weights_are_detected_and_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("SVD_RAY_CACHE", str(tmp_path / "cache"))
    from svd_ray.models import model_fingerprint, resolve_model

    ref = resolve_model("tiny-llama")
    good = model_fingerprint(ref)["weights_sha256"]
    weights = Path(ref.path) / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    assert any("model.safetensors has" in p for p in entry_problems(Path(ref.path)))
    assert model_fingerprint(resolve_model("tiny-llama"))["weights_sha256"] == good


# ---------------------------------------------------------------------------- ensure_entry, no model


def _check(folder: Path) -> list[str]:
    return [] if (folder / "payload").is_file() else ["payload missing"]


def _build_slowly(count_file: str, tmp: Path) -> None:
    with open(count_file, "a") as fh:
        fh.write("built\n")
    time.sleep(0.5)
    (tmp / "payload").write_text("x" * 1000)


def _ask(folder: str, count_file: str, go: str) -> None:
    while not os.path.exists(go):
        time.sleep(0.005)
    from functools import partial

    ensure_entry(Path(folder), partial(_build_slowly, count_file), name="toy", check=_check)
    assert (Path(folder) / "payload").read_text() == "x" * 1000


def test_many_processes_one_build(tmp_path):
    folder, count, go = tmp_path / "entry", tmp_path / "count", tmp_path / "go"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_ask, args=(str(folder), str(count), str(go))) for _ in range(6)]
    for p in procs:
        p.start()
    time.sleep(1.0)
    go.write_text("go")
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert count.read_text().count("built") == 1
    assert entry_problems(folder, _check, full=True) == []


def test_a_builder_that_writes_an_unusable_folder_publishes_nothing(tmp_path):
    folder = tmp_path / "entry"
    with pytest.raises(RuntimeError, match="payload missing"):
        ensure_entry(folder, lambda tmp: (tmp / "other").write_text("x"), name="toy", check=_check)
    assert not folder.exists() and list(tmp_path.iterdir()) == [tmp_path / ".entry.lock"]


def test_a_builder_that_crashes_leaves_no_entry_and_the_next_caller_builds(tmp_path):
    folder = tmp_path / "entry"

    def crash(tmp):
        (tmp / "payload").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_entry(folder, crash, name="toy", check=_check)
    assert not folder.exists()
    ensure_entry(folder, lambda tmp: (tmp / "payload").write_text("whole"), name="toy", check=_check)
    assert (folder / "payload").read_text() == "whole"


def test_a_file_changed_after_publishing_fails_the_full_check(tmp_path):
    folder = tmp_path / "entry"
    ensure_entry(folder, lambda tmp: (tmp / "payload").write_text("abc"), name="toy", check=_check)
    (folder / "payload").write_text("abd")  # same size: only the hash tells
    assert entry_problems(folder, _check) == []
    assert entry_problems(folder, _check, full=True) == ["payload fails its sha256 check"]
    (folder / ENTRY_MANIFEST).write_text("not json")
    assert "no valid" in entry_problems(folder, _check)[0]
