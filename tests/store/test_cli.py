"""`svd-ray tasks ...`: exit codes, one-line errors, and wiring into a parent argparse parser."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from svd_ray.store import open_store
from svd_ray.store.cli import add_tasks_parser, main, run_tasks

from store_helpers import make_meta


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["tasks", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def populated(tmp_path: Path, bundle: Path) -> str:
    uri = f"file://{tmp_path}/clistore"
    store = open_store(uri, cache_dir=tmp_path / "c")
    store.publish("arc", bundle, make_meta(), version="v1")
    store.publish("arc", bundle, make_meta(), version="v2")
    return uri


def test_happy_path(capsys: pytest.CaptureFixture[str], populated: str, tmp_path: Path, bundle: Path) -> None:
    rc, out, _ = run(capsys, "list", "--store", populated)
    assert rc == 0 and out.startswith("arc\t2 version(s)\tlatest v2\tpromoted -")
    rc, out, _ = run(capsys, "list", "arc", "--store", populated, "--json")
    assert rc == 0 and json.loads(out) == [
        {"version": "v1", "promoted": False, "deleted": None},
        {"version": "v2", "promoted": False, "deleted": None},
    ]
    rc, out, _ = run(capsys, "show", "arc", "--store", populated)
    assert rc == 0 and json.loads(out)["version"] == "v2"
    rc, out, _ = run(capsys, "verify", "arc", "--all", "--store", populated)
    assert rc == 0 and "arc v1: OK" in out and "arc v2: OK" in out
    rc, out, _ = run(capsys, "promote", "arc", "v1", "--store", populated)
    assert rc == 0 and "promoted arc v1" in out
    rc, out, _ = run(capsys, "list", "arc", "--store", populated)
    assert "v1  (promoted)" in out
    rc, out, _ = run(
        capsys,
        "fetch",
        "arc",
        "promoted",
        "--store",
        populated,
        "--dest",
        str(tmp_path / "d"),
        "--base-model-id",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    assert rc == 0 and out.strip() == str(tmp_path / "d")
    rc, out, _ = run(capsys, "delete", "arc", "v2", "--store", populated)
    assert rc == 0
    meta_file = tmp_path / "meta.json"
    meta_file.write_text(json.dumps(make_meta()))
    rc, out, _ = run(capsys, "publish", "arc", str(bundle), "--meta", str(meta_file), "--store", populated)
    assert rc == 0 and out.startswith("published arc ")
    rc, out, _ = run(capsys, "gc", "--store", populated, "--min-age", "0")
    assert rc == 0 and out.strip() == "nothing to remove"


BAD_INPUTS = [
    (["show", "../x"], "invalid task name"),
    (["show", "a/b"], "invalid task name"),
    (["show", "arc", "v9"], "does not exist"),
    (["show", "nope"], "no complete versions"),
    (["fetch", "arc", "promoted"], "no promoted version"),
    (["verify", "arc", "../v1"], "invalid version"),
    (["promote", "arc", "v9"], "does not exist"),
    (["delete", "arc", "latest"], "reserved"),
    (["delete", "arc", "v9"], "does not exist"),
    (["fetch", "arc", "v1", "--base-model-id", "google/gemma-3-270m"], "does not match the served base model"),
    (["publish", "arc", "/nonexistent-dir"], "not a directory"),
    (["publish", "arc", ".", "--meta", "/nonexistent.json"], "cannot read --meta"),
    (["publish", "arc", ".", "--version", "v1"], "already exists"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str],
    populated: str,
    argv: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    bundle: Path,
) -> None:
    monkeypatch.chdir(bundle)
    rc, out, err = run(capsys, *argv, "--store", populated)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("svd-ray tasks: error: ") and message in err, err
    assert "Traceback" not in err


def test_bad_store_uri_and_server(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "list", "--store", "gs://bucket/x")
    assert rc == 2 and "unsupported store URI scheme" in err
    rc, _, err = run(capsys, "list", "--store", "s3://b/p", "--endpoint-url", "http://127.0.0.1:9")
    assert rc == 3 and "cannot reach S3 endpoint" in err and err.count("\n") == 1  # 3: storage unavailable


def test_delete_promoted_needs_force(capsys: pytest.CaptureFixture[str], populated: str) -> None:
    assert run(capsys, "promote", "arc", "v2", "--store", populated)[0] == 0
    rc, _, err = run(capsys, "delete", "arc", "v2", "--store", populated)
    assert rc == 2 and "promoted" in err
    assert run(capsys, "delete", "arc", "v2", "--force", "--store", populated)[0] == 0


def test_verify_problems_exit_1(capsys: pytest.CaptureFixture[str], populated: str, tmp_path: Path) -> None:
    store = open_store(populated)
    m = store.manifest("arc", "v1")
    victim = Path(store.backend.root) / "tasks/arc/v1" / m.data_prefix / "mu.safetensors"  # type: ignore[attr-defined]
    victim.write_bytes(b"X" + victim.read_bytes()[1:])
    rc, out, _ = run(capsys, "verify", "arc", "v1", "--store", populated)
    assert rc == 1 and "mu.safetensors: sha256 mismatch" in out
    rc, _, err = run(capsys, "promote", "arc", "v1", "--store", populated)
    assert rc == 2 and "refusing to promote" in err
    rc, _, err = run(capsys, "fetch", "arc", "v1", "--store", populated)
    assert rc == 2 and "fails its sha256 check" in err


def test_default_store_from_env(
    capsys: pytest.CaptureFixture[str], populated: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SVD_RAY_STORE", populated)
    rc, out, _ = run(capsys, "list")
    assert rc == 0 and out.startswith("arc\t")


def test_wiring_into_parent_parser(populated: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="svd-ray")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve")
    add_tasks_parser(sub)
    args: Any = parser.parse_args(["tasks", "list", "--store", populated, "--json"])
    assert args.command == "tasks" and run_tasks(args) == 0
    assert json.loads(capsys.readouterr().out)[0]["task"] == "arc"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["tasks", "frobnicate"])
    assert exc.value.code == 2


def test_module_entry_point(populated: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "svd_ray.store.cli", "tasks", "show", "../etc", "--store", populated],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("svd-ray tasks: error: invalid task name")


def test_deleted_versions(capsys: pytest.CaptureFixture[str], populated: str, bundle: Path) -> None:
    """Deleted versions are listed as such, cannot be shown, fetched or published again, and deleting
    twice says so."""
    rc, out, _ = run(capsys, "delete", "arc", "v1", "--reason", "bad eval", "--store", populated)
    assert rc == 0 and out.startswith("deleted arc v1") and "cannot be published again" in out
    rc, out, _ = run(capsys, "delete", "arc", "v1", "--store", populated)
    assert rc == 0 and out.startswith("arc v1 was already deleted at ")
    rc, out, _ = run(capsys, "list", "arc", "--store", populated)
    lines = out.splitlines()
    assert rc == 0 and lines[0] == "v2" and lines[1].startswith("v1  (deleted ") and lines[1].endswith(": bad eval)")
    rc, out, _ = run(capsys, "list", "arc", "--store", populated, "--json")
    rows = json.loads(out)
    assert rows[1]["version"] == "v1" and rows[1]["deleted"]["reason"] == "bad eval"
    rc, out, _ = run(capsys, "list", "--store", populated)
    assert out.strip() == "arc\t1 version(s)\tlatest v2\tpromoted -\t1 deleted"
    for argv, message in (
        (["show", "arc", "v1"], "was deleted at"),
        (["fetch", "arc", "v1"], "was deleted at"),
        (["verify", "arc", "v1"], "was deleted at"),
        (["promote", "arc", "v1"], "was deleted at"),
        (["publish", "arc", str(bundle), "--version", "v1"], "never reused"),
        (["delete", "arc", "v1", "--reason", "a\nb"], "one printable line"),
    ):
        rc, _, err = run(capsys, *argv, "--store", populated)
        assert rc == 2 and message in err and err.count("\n") == 1, (argv, err)
    # A task whose every version was deleted is still listed (with 0 live versions).
    assert run(capsys, "delete", "arc", "v2", "--store", populated)[0] == 0
    rc, out, _ = run(capsys, "list", "--store", populated, "--json")
    assert json.loads(out) == [{"task": "arc", "versions": 0, "latest": None, "promoted": None, "deleted": 2}]
    rc, out, _ = run(capsys, "list", "--store", populated)
    assert out.strip() == "arc\t0 version(s)\tlatest -\tpromoted -\t2 deleted"
