"""Backend-specific behaviour: S3 errors and settings, Ray Train's pyarrow filesystem, multi-process races."""

from __future__ import annotations

import multiprocessing
import secrets
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from svd_ray.store import Manifest, StoreError, open_store, pyarrow_filesystem_for

from rgw_control import s3_client
from store_helpers import make_bundle, make_meta, publish_in_process, read_tree


def test_missing_bucket_is_a_clear_error(moto_endpoint: str, bundle: Path, meta: dict[str, Any]) -> None:
    store = open_store("s3://no-such-bucket-xyz/p", endpoint_url=moto_endpoint)
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-xyz' does not exist"):
        store.publish("t", bundle, meta)
    with pytest.raises(StoreError, match="does not exist"):
        store.list_tasks()


def test_create_bucket_on_first_publish(moto_endpoint: str, bundle: Path, meta: dict[str, Any], tmp_path: Path) -> None:
    bucket = f"created-{secrets.token_hex(4)}"
    store = open_store(f"s3://{bucket}", endpoint_url=moto_endpoint, cache_dir=tmp_path / "c", create_bucket=True)
    m = store.publish("t", bundle, meta)
    assert store.list_versions("t") == [m.version]
    assert store.uri == f"s3://{bucket}"


def test_endpoint_from_environment(
    moto_endpoint: str,
    moto_bucket: str,
    bundle: Path,
    meta: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.delenv("SVD_RAY_S3_ENDPOINT", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    uri = f"s3://{moto_bucket}/env-{secrets.token_hex(3)}"
    open_store(uri).publish("t", bundle, meta, version="v1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("SVD_RAY_S3_ENDPOINT", moto_endpoint)  # takes precedence
    assert open_store(uri, cache_dir=tmp_path / "c").list_versions("t") == ["v1"]


def test_unreachable_endpoint_is_a_clear_error(moto_bucket: str) -> None:
    store = open_store("s3://b/p", endpoint_url="http://127.0.0.1:9")
    with pytest.raises(StoreError, match="cannot reach S3 endpoint"):
        store.list_tasks()


def _pyarrow_round_trip(uri: str, endpoint: str | None, tmp_path: Path) -> None:
    fs, path = pyarrow_filesystem_for(uri, endpoint_url=endpoint)
    with fs.open_output_stream(f"{path}/ray-train/checkpoint_000/model.bin") as out:
        out.write(b"checkpoint-bytes")
    with fs.open_input_stream(f"{path}/ray-train/checkpoint_000/model.bin") as inp:
        assert inp.read() == b"checkpoint-bytes"
    # The same settings reach the bundle store: it sees the object pyarrow wrote.
    store = open_store(uri, endpoint_url=endpoint, cache_dir=tmp_path / "c")
    assert store.backend.read_bytes("ray-train/checkpoint_000/model.bin") == b"checkpoint-bytes"


def test_pyarrow_filesystem_for_file(tmp_path: Path) -> None:
    fs, path = pyarrow_filesystem_for(f"file://{tmp_path}/runs")
    assert fs is None and path == f"{tmp_path}/runs"


def test_pyarrow_filesystem_uses_the_store_client_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train's checkpoint filesystem is bounded like the store's own client (same env settings)."""
    monkeypatch.setenv("SVD_RAY_S3_CONNECT_TIMEOUT", "2.5")
    monkeypatch.setenv("SVD_RAY_S3_READ_TIMEOUT", "7")
    fs, _ = pyarrow_filesystem_for("s3://b/p", endpoint_url="http://127.0.0.1:9")
    args = fs.__reduce__()[1][0]  # the constructor arguments pyarrow would pickle
    assert args["connect_timeout"] == 2.5 and args["request_timeout"] == 7.0
    monkeypatch.setenv("SVD_RAY_S3_MAX_ATTEMPTS", "0")
    with pytest.raises(StoreError, match="SVD_RAY_S3_MAX_ATTEMPTS"):
        pyarrow_filesystem_for("s3://b/p", endpoint_url="http://127.0.0.1:9")


def test_pyarrow_filesystem_for_moto(moto_endpoint: str, moto_bucket: str, tmp_path: Path) -> None:
    _pyarrow_round_trip(f"s3://{moto_bucket}/pa-{secrets.token_hex(3)}", moto_endpoint, tmp_path)


@pytest.mark.s3
def test_pyarrow_filesystem_for_rgw(rgw_endpoint: str, rgw_bucket: str, tmp_path: Path) -> None:
    _pyarrow_round_trip(f"s3://{rgw_bucket}/pa-{secrets.token_hex(3)}", rgw_endpoint, tmp_path)


@pytest.mark.s3
def test_rgw_large_multipart_file(rgw_endpoint: str, rgw_bucket: str, tmp_path: Path) -> None:
    """A file above boto3's multipart threshold (8 MiB) round-trips and verifies on the real server."""
    src = make_bundle(tmp_path / "big")
    (src / "big.bin").write_bytes(secrets.token_bytes(9 * 1024 * 1024))
    store = open_store(
        f"s3://{rgw_bucket}/big-{secrets.token_hex(3)}", endpoint_url=rgw_endpoint, cache_dir=tmp_path / "c"
    )
    m = store.publish("t", src, make_meta())
    path, _ = store.fetch("t", m.version)
    assert read_tree(path) == read_tree(src)
    assert store.verify("t", m.version) == []


def test_concurrent_publisher_processes_file(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/store"
    srcs = [str(make_bundle(tmp_path / f"src{i}", seed=f"p{i}")) for i in range(4)]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(4, mp_context=ctx) as pool:
        # the worker lives in store_helpers: a spawned child must not import this module, whose
        # ``from conftest import`` can resolve to another test folder's conftest in a full run
        results = list(pool.map(publish_in_process, [(uri, s, "v1") for s in srcs]))
    assert sorted(results) == ["conflict"] * 3 + ["won"]
    store = open_store(uri, cache_dir=tmp_path / "c")
    assert store.verify("race", "v1") == []
    path, m = store.fetch("race", "v1")
    assert isinstance(m, Manifest)
    assert read_tree(path) == read_tree(Path(srcs[results.index("won")]))
    assert not any((tmp_path / "store" / ".tmp").iterdir())


def test_s3_client_settings(moto_endpoint: str) -> None:
    store = open_store("s3://b/p", endpoint_url=moto_endpoint)
    cfg = store.backend.client.meta.config  # type: ignore[attr-defined]
    assert cfg.request_checksum_calculation == "when_required"
    assert cfg.s3["addressing_style"] == "path"
    assert s3_client(moto_endpoint).list_buckets()["Buckets"] is not None
