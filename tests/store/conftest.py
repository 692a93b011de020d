"""Fixtures for the task-store tests: bundles, and stores on file://, moto and the real Ceph RGW.

The ``rgw`` backend and its fixtures live in ``tests/rgw_control.py`` (shared with tests/serving).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from store_helpers import make_bundle, make_meta

from svd_ray.store import BundleStore, open_store

from rgw_control import make_bucket, rgw, rgw_bucket, rgw_endpoint  # noqa: F401 - fixtures for this folder


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


@pytest.fixture(scope="session")
def moto_bucket(moto_endpoint: str) -> str:
    return make_bucket(moto_endpoint)


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
