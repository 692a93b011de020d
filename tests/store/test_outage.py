"""Storage outages: every call fails with ``StoreUnavailable`` within bounded time, and a publish cut off by
an outage leaves nothing visible (a retry completes it cleanly, gc removes what is left otherwise).

Fast variants: a closed port, a server that accepts connections and never answers, a server that answers
503, and injected failures on every backend. The real one: the Ceph RGW of the test session is stopped in
the middle of a publish and started again (``infra/ceph-rgw.sh``).
"""

from __future__ import annotations

import errno
import http.server
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from svd_ray.store import (
    BundleStore,
    DeletedError,
    NotFoundError,
    S3ClientLimits,
    StoreError,
    StoreUnavailable,
    open_store,
    s3_client_limits,
)
from svd_ray.store.backends import LocalBackend, S3Backend
from svd_ray.store.cli import main as cli_main

from rgw_control import RGW
from store_helpers import make_bundle, make_meta, read_tree

FAST = S3ClientLimits(connect_timeout=0.5, read_timeout=0.5, max_attempts=2)


def keys(store: BundleStore, prefix: str) -> list[str]:
    return [o.key for o in store.backend.list_objects(prefix)]


def every_call(store: BundleStore, src: Path, tmp: Path) -> dict[str, Callable[[], Any]]:
    return {
        "publish": lambda: store.publish("t", src, make_meta(), version="v9"),
        "list_tasks": store.list_tasks,
        "list_versions": lambda: store.list_versions("t"),
        "latest": lambda: store.fetch("t", dest_dir=tmp / "latest"),
        "fetch": lambda: store.fetch("t", "v1", dest_dir=tmp / "fetch"),
        "manifest": lambda: store.manifest("t", "v1"),
        "verify": lambda: store.verify("t", "v1"),
        "promote": lambda: store.promote("t", "v1"),
        "promoted": lambda: store.promoted("t"),
        "delete": lambda: store.delete("t", "v1"),
        "deleted_versions": lambda: store.deleted_versions("t"),
        "gc": lambda: store.gc(min_age_s=0),
    }


def assert_unavailable(calls: dict[str, Callable[[], Any]], max_s: float) -> dict[str, float]:
    """Each call raises StoreUnavailable (a StoreError carrying retry_after_s) within ``max_s`` seconds."""
    took = {}
    for name, call in calls.items():
        t = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unavailable") as exc:
            call()
        took[name] = time.monotonic() - t
        assert isinstance(exc.value, StoreError) and exc.value.retry_after_s > 0
        assert "\n" not in str(exc.value)
        assert took[name] < max_s, f"{name} took {took[name]:.1f}s"
    return took


# -------------------------------------------------------------------------------------- fake servers


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A TCP server that accepts connections and never answers (a frozen S3 server)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join()
    for c in conns:
        c.close()
    srv.close()


class _Busy(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)) if self.command != "HEAD" else "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def busy_server() -> Iterator[str]:
    """An S3 endpoint that answers every request with 503 SlowDown (an overloaded server)."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _s3_store(endpoint: str, tmp: Path, limits: S3ClientLimits | None = None) -> BundleStore:
    store = open_store("s3://bucket/p", endpoint_url=endpoint, cache_dir=tmp / "cache")
    if limits is not None:
        assert isinstance(store.backend, S3Backend)
        store.backend._limits = limits
    return store


# ------------------------------------------------------------------------------------------ fast tests


def test_closed_port_fails_fast_with_default_limits(tmp_path: Path, bundle: Path) -> None:
    """Nothing listening: every call raises StoreUnavailable in about a second, with the default limits."""
    store = _s3_store(f"http://127.0.0.1:{_free_port()}", tmp_path)
    assert store.backend.limits == S3ClientLimits()  # type: ignore[attr-defined]
    assert_unavailable(every_call(store, bundle, tmp_path), max_s=15)
    with pytest.raises(StoreUnavailable, match="nothing was published"):
        store.publish("t", bundle, make_meta())


def test_frozen_server_is_bounded_by_the_timeouts(
    blackhole: str, tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that never answers: calls give up after max_attempts x timeouts (no hang), set from the env."""
    monkeypatch.setenv("SVD_RAY_S3_CONNECT_TIMEOUT", "0.5")
    monkeypatch.setenv("SVD_RAY_S3_READ_TIMEOUT", "0.5")
    monkeypatch.setenv("SVD_RAY_S3_MAX_ATTEMPTS", "2")
    store = _s3_store(blackhole, tmp_path)
    assert store.backend.limits == FAST  # type: ignore[attr-defined]
    cfg = store.backend.client.meta.config  # type: ignore[attr-defined]
    assert (cfg.connect_timeout, cfg.read_timeout, cfg.retries["total_max_attempts"]) == (0.5, 0.5, 2)
    calls = every_call(store, bundle, tmp_path)
    took = assert_unavailable({k: calls[k] for k in ("publish", "list_versions", "fetch", "delete")}, max_s=12)
    assert min(took.values()) >= 0.9  # it did wait for the server (2 attempts x 0.5 s), then gave up


def test_overloaded_server_is_unavailable(busy_server: str, tmp_path: Path, bundle: Path) -> None:
    """HTTP 503 SlowDown after the client's retries is StoreUnavailable, not a generic S3 error."""
    store = _s3_store(busy_server, tmp_path, FAST)
    calls = every_call(store, bundle, tmp_path)
    assert_unavailable({k: calls[k] for k in ("publish", "list_tasks", "fetch", "manifest", "delete")}, max_s=15)
    with pytest.raises(StoreUnavailable, match="SlowDown|503"):
        store.list_versions("t")


@pytest.mark.parametrize(
    "value,ok", [("2", True), ("0.25", True), ("0", False), ("-1", False), ("inf", False), ("nan", False), ("x", False)]
)
def test_limit_env_validation(monkeypatch: pytest.MonkeyPatch, value: str, ok: bool) -> None:
    monkeypatch.setenv("SVD_RAY_S3_READ_TIMEOUT", value)
    if ok:
        assert s3_client_limits().read_timeout == float(value)
    else:
        with pytest.raises(StoreError, match="SVD_RAY_S3_READ_TIMEOUT"):
            s3_client_limits()
    monkeypatch.delenv("SVD_RAY_S3_READ_TIMEOUT")
    monkeypatch.setenv("SVD_RAY_S3_MAX_ATTEMPTS", "1.5")
    with pytest.raises(StoreError, match="integer"):
        s3_client_limits()


def test_wrapped_transfer_and_stream_errors_are_unavailable() -> None:
    """boto3's transfer wrappers and a body cut off mid-stream map to StoreUnavailable too."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from botocore.exceptions import ClientError, ReadTimeoutError
    from urllib3.exceptions import ProtocolError

    backend = S3Backend("b", "p", endpoint_url="http://127.0.0.1:9", limits=FAST)
    assert isinstance(backend._wrap(RetriesExceededError(ReadTimeoutError(endpoint_url="x")), "k"), StoreUnavailable)
    busy = ClientError({"Error": {"Code": "ServiceUnavailable"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "Put")
    try:
        raise S3UploadFailedError("Failed to upload") from busy
    except S3UploadFailedError as exc:
        assert isinstance(backend._wrap(exc, "k"), StoreUnavailable)
    denied = ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Put")
    assert not isinstance(backend._wrap(denied, "k"), StoreUnavailable)  # a permanent error stays one

    class Body:
        def read(self, amt: int | None = None) -> bytes:
            raise ProtocolError("Connection broken: IncompleteRead")

    from svd_ray.store.backends import _GuardedStream

    with pytest.raises(StoreUnavailable):
        _GuardedStream(Body(), backend, "k").read(10)


def test_local_io_errors_are_unavailable(
    tmp_path: Path, bundle: Path, meta: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file:// store on a mount that fails with EIO/ESTALE: StoreUnavailable, not "not found" or "empty"."""
    store = open_store(f"file://{tmp_path}/store", cache_dir=tmp_path / "c")
    store.publish("t", bundle, meta, version="v1")
    real_stat, real_read = os.stat, Path.read_bytes
    root = str(tmp_path / "store")

    def dead_stat(path: Any, *a: Any, **k: Any) -> Any:
        if str(path).startswith(root):
            raise OSError(errno.EIO, "Input/output error")
        return real_stat(path, *a, **k)

    def dead_read(self: Path) -> bytes:
        if str(self).startswith(root):
            raise OSError(errno.ESTALE, "Stale file handle")
        return real_read(self)

    monkeypatch.setattr(os, "stat", dead_stat)
    monkeypatch.setattr(Path, "read_bytes", dead_read)
    for call in (lambda: store.list_versions("t"), lambda: store.fetch("t"), lambda: store.manifest("t", "v1")):
        with pytest.raises(StoreUnavailable, match="storage unavailable"):
            call()
    monkeypatch.undo()
    # A permanent local error (permission denied) stays a plain StoreError.
    assert not isinstance(LocalBackend(root)._os_error("read", "k", PermissionError(errno.EACCES, "no")), StoreUnavailable)


def test_publish_cut_off_leaves_nothing_visible(
    store: BundleStore, bundle: Path, meta: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On every backend: an outage after some files were uploaded -> StoreUnavailable, the version is not
    visible, and a retry of the same version succeeds and removes the cut-off upload."""
    store.max_workers = 1  # upload one file after the other: the cut falls between two files
    real_upload = store.backend.upload_file
    uploaded: list[str] = []

    def flaky(key: str, src: Path) -> None:
        if uploaded:
            raise StoreUnavailable("injected: connection refused")
        real_upload(key, src)
        uploaded.append(key)

    monkeypatch.setattr(store.backend, "upload_file", flaky)
    with pytest.raises(StoreUnavailable, match="nothing was published") as exc:
        store.publish("t", bundle, meta, version="v1")
    assert exc.value.retry_after_s == 5
    monkeypatch.undo()
    assert store.list_versions("t") == [] and store.list_tasks() == []
    with pytest.raises(NotFoundError) as nf:
        store.fetch("t", "v1")
    assert not isinstance(nf.value, DeletedError) and store.tombstone("t", "v1") is None
    assert keys(store, "tasks/t/v1/") == uploaded  # only the invisible partial upload is stored

    m = store.publish("t", bundle, meta, version="v1")  # a clean, complete retry
    assert store.list_versions("t") == ["v1"] and store.verify("t", "v1") == []
    assert keys(store, "tasks/t/v1/") == sorted(
        ["tasks/t/v1/manifest.json", *(f"tasks/t/v1/{m.data_prefix}/{f.path}" for f in m.files)]
    )
    path, _ = store.fetch("t", "v1", dest_dir=tmp_path / "d")
    assert read_tree(path) == read_tree(bundle)


def test_cli_exit_code_3_when_storage_is_unavailable(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["tasks", "list", "--store", "s3://b/p", "--endpoint-url", f"http://127.0.0.1:{_free_port()}"])
    err = capsys.readouterr().err
    assert rc == 3 and err.startswith("svd-ray tasks: error: ") and "unavailable" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------- the real server (RGW)


@pytest.mark.s3
@pytest.mark.integration
def test_rgw_outage_during_publish_and_reads(
    rgw: RGW, rgw_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stop the real server in the middle of a publish, use the store during the outage, start it again."""
    uri = f"s3://{rgw_bucket}/outage-{secrets.token_hex(3)}"
    store = open_store(uri, endpoint_url=rgw.endpoint, cache_dir=tmp_path / "c")  # default limits
    src = make_bundle(tmp_path / "src")
    store.publish("t", src, make_meta(), version="v1")
    served, _ = store.fetch("t", "v1")  # a copy a server already holds

    # 1. The server dies after the first file of v2 was uploaded.
    store.max_workers = 1
    real_upload = store.backend.upload_file
    uploaded: list[str] = []

    def upload_then_die(key: str, path: Path) -> None:
        real_upload(key, path)
        uploaded.append(key)
        if len(uploaded) == 1:
            rgw.stop()

    store.backend.upload_file = upload_then_die  # type: ignore[method-assign]
    try:
        t = time.monotonic()
        with pytest.raises(StoreUnavailable, match="nothing was published"):
            store.publish("t", src, make_meta(), version="v2")
        assert time.monotonic() - t < 60  # includes the ~6 s the stop takes

        # 2. During the outage: clean, fast, specific errors everywhere; the CLI says so with exit code 3.
        took = assert_unavailable(every_call(store, src, tmp_path), max_s=15)
        assert sum(took.values()) < 60, took
        with capsys.disabled():  # shown with -s: what the outage costs each call
            print("\ncalls during the RGW outage (s):", {k: round(v, 2) for k, v in took.items()})
        rc = cli_main(["tasks", "list", "t", "--store", uri, "--endpoint-url", rgw.endpoint])
        assert rc == 3 and "unavailable" in capsys.readouterr().err
        assert read_tree(served) == read_tree(src)  # what was already fetched stays usable
    finally:
        store.backend.upload_file = real_upload  # type: ignore[method-assign]
        rgw.start()

    # 3. Storage is back: no trace of v2 or v9 anywhere a reader looks; only v2's invisible partial upload.
    assert store.list_versions("t") == ["v1"] and store.list_tasks() == ["t"]
    for v in ("v2", "v9"):
        with pytest.raises(NotFoundError):
            store.fetch("t", v)
        assert store.tombstone("t", v) is None
    assert keys(store, "tasks/t/v2/") == uploaded and keys(store, "tasks/t/v9/") == []
    assert store.verify("t", "v1") == []

    # 4. A clean retry of v2 completes and removes the cut-off upload.
    m = store.publish("t", src, make_meta(), version="v2")
    assert store.list_versions("t") == ["v1", "v2"] and store.verify("t", "v2") == []
    assert set(keys(store, "tasks/t/v2/")) == {"tasks/t/v2/manifest.json"} | {
        f"tasks/t/v2/{m.data_prefix}/{f.path}" for f in m.files
    }

    # 5. The server dies just before the manifest create: the outcome is reported unknown, nothing shows up
    #    once storage is back, and gc() removes the kept data.
    real_create = store.backend.create_once

    def die_then_create(key: str, data: bytes) -> bool:
        rgw.stop()
        return real_create(key, data)

    store.backend.create_once = die_then_create  # type: ignore[method-assign]
    try:
        with pytest.raises(StoreUnavailable, match="outcome is unknown"):
            store.publish("t", src, make_meta(), version="v3")
    finally:
        store.backend.create_once = real_create  # type: ignore[method-assign]
        rgw.start()
    assert store.list_versions("t") == ["v1", "v2"]
    with pytest.raises(NotFoundError):
        store.manifest("t", "v3")
    assert keys(store, "tasks/t/v3/")  # the data was kept (a manifest might have referenced it) ...
    assert [p for p in store.gc("t", min_age_s=0) if "/v3/" in p]  # ... until gc
    assert keys(store, "tasks/t/v3/") == []
    assert store.publish("t", src, make_meta(), version="v3").version == "v3"

