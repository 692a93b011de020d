"""Fixtures for the task-store tests: bundles, and stores on file://, moto and the real Ceph RGW.

The ``rgw`` backend is found through ``SVD_RAY_S3_ENDPOINT`` (``eval "$(infra/ceph-rgw.sh env)"``). Without it
the ``s3`` tests skip, unless ``SVD_RAY_REQUIRE_S3=1``, in which case they fail.
"""

from __future__ import annotations

import os
import secrets
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from store_helpers import make_bundle, make_meta

from svd_ray.store import BundleStore, open_store

RGW_ENV = "SVD_RAY_S3_ENDPOINT"
REQUIRE_ENV = "SVD_RAY_REQUIRE_S3"


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle")


@pytest.fixture
def meta() -> dict[str, Any]:
    return make_meta()


# ------------------------------------------------------------------------------------------- servers


def _default_creds(mp: pytest.MonkeyPatch) -> None:
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        if not os.environ.get(name):
            mp.setenv(name, value)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """An in-memory S3 emulator (moto) on 127.0.0.1, for fast unit tests only."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _reachable(endpoint: str) -> bool:
    u = urllib.parse.urlparse(endpoint)
    try:
        with socket.create_connection((u.hostname, u.port or 80), timeout=3):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def rgw_endpoint() -> str:
    """The real Ceph RGW started by ``infra/ceph-rgw.sh start``."""
    endpoint = os.environ.get(RGW_ENV)
    required = os.environ.get(REQUIRE_ENV) == "1"
    if not endpoint:
        if required:
            pytest.fail(
                f"{REQUIRE_ENV}=1 but {RGW_ENV} is not set: start the server with infra/ceph-rgw.sh "
                'start and eval "$(infra/ceph-rgw.sh env)"',
                pytrace=False,
            )
        pytest.skip(f"{RGW_ENV} not set (start Ceph RGW with infra/ceph-rgw.sh)")
    if not _reachable(endpoint):
        pytest.fail(f"{RGW_ENV}={endpoint} is set but nothing answers there", pytrace=False)
    return endpoint


def _client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID") or "testing",
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or "testing",
        region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
        ),
    )


def _make_bucket(endpoint: str) -> str:
    bucket = f"svd-ray-test-{secrets.token_hex(4)}"
    client = _client(endpoint)
    client.create_bucket(Bucket=bucket)
    return bucket


def _drop_bucket(endpoint: str, bucket: str) -> None:
    client = _client(endpoint)
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=bucket)


@pytest.fixture(scope="session")
def moto_bucket(moto_endpoint: str) -> str:
    return _make_bucket(moto_endpoint)


@pytest.fixture(scope="session")
def rgw_bucket(rgw_endpoint: str) -> Iterator[str]:
    bucket = _make_bucket(rgw_endpoint)
    yield bucket
    _drop_bucket(rgw_endpoint, bucket)


# -------------------------------------------------------------------------------------------- stores

BACKENDS = ["file", "moto", pytest.param("rgw", marks=pytest.mark.s3)]


class StoreFactory:
    """Opens stores on one backend; every call with the same ``name`` sees the same location."""

    def __init__(self, kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.prefix = f"t-{secrets.token_hex(4)}"
        if kind == "file":
            self.endpoint = None
            self.base = f"file://{tmp_path}/store"
        else:
            self.endpoint = request.getfixturevalue(f"{kind}_endpoint")
            bucket = request.getfixturevalue(f"{kind}_bucket")
            self.base = f"s3://{bucket}/{self.prefix}"

    def uri(self, name: str = "main") -> str:
        return f"{self.base}-{name}" if self.kind == "file" else f"{self.base}/{name}"

    def open(self, name: str = "main", cache: str = "cache") -> BundleStore:
        return open_store(self.uri(name), endpoint_url=self.endpoint, cache_dir=self.tmp_path / cache)


@pytest.fixture(params=BACKENDS)
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    return StoreFactory(request.param, request, tmp_path)


@pytest.fixture
def store(stores: StoreFactory) -> BundleStore:
    return stores.open()


@pytest.fixture(autouse=True)
def _store_test_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials for moto when none are exported (RGW's come from `infra/ceph-rgw.sh env`); keep the
    default store and bundle cache inside the test's tmp dir."""
    _default_creds(monkeypatch)
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_REQUIRED")
    monkeypatch.setenv("AWS_RESPONSE_CHECKSUM_VALIDATION", "WHEN_REQUIRED")
    monkeypatch.setenv("SVD_RAY_CACHE_DIR", str(tmp_path / "default-cache"))
    monkeypatch.setenv("SVD_RAY_STORE", f"file://{tmp_path}/default-store")
