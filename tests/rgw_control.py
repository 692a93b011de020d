"""The real Ceph RGW of a test session, shared by tests/store and tests/serving (``pythonpath = tests``).

Found through ``SVD_RAY_S3_ENDPOINT`` (``eval "$(infra/ceph-rgw.sh env)"``; ``infra/run-tests.sh`` starts one
and exports it). Without it the ``s3`` tests skip, unless ``SVD_RAY_REQUIRE_S3=1``, in which case they fail.
The ``rgw`` fixture may stop and start the server, only when this session owns it (``SVD_RAY_CEPH_DIR``).
Conftests import the fixtures they need from here.
"""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

RGW_ENV = "SVD_RAY_S3_ENDPOINT"
REQUIRE_ENV = "SVD_RAY_REQUIRE_S3"
SCRIPT = Path(__file__).resolve().parents[1] / "infra" / "ceph-rgw.sh"


def reachable(endpoint: str) -> bool:
    u = urllib.parse.urlparse(endpoint)
    try:
        with socket.create_connection((u.hostname, u.port or 80), timeout=3):
            return True
    except OSError:
        return False


def answers(endpoint: str) -> bool:
    """Whether an HTTP server answers there (any status)."""
    try:
        urllib.request.urlopen(endpoint, timeout=3)
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def s3_client(endpoint: str) -> Any:
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


def make_bucket(endpoint: str) -> str:
    bucket = f"svd-ray-test-{secrets.token_hex(4)}"
    s3_client(endpoint).create_bucket(Bucket=bucket)
    return bucket


def drop_bucket(endpoint: str, bucket: str) -> None:
    client = s3_client(endpoint)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=bucket)


class RGW:
    """Stops and starts the session's Ceph RGW through infra/ceph-rgw.sh (its own PID bookkeeping)."""

    def __init__(self, state_dir: str, endpoint: str) -> None:
        self.state_dir = state_dir
        self.endpoint = endpoint

    def _sh(self, cmd: str, timeout: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT), "--dir", self.state_dir, cmd], capture_output=True, text=True, timeout=timeout
        )

    def up(self) -> bool:
        return self._sh("status", 30).returncode == 0

    def stop(self) -> None:
        r = self._sh("stop", 120)
        assert r.returncode == 0, r.stderr
        assert not answers(self.endpoint)

    def start(self) -> None:
        r = self._sh("start", 240)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 60
        while not answers(self.endpoint):
            assert time.monotonic() < deadline, "RGW did not come back"
            time.sleep(0.3)


# ------------------------------------------------------------------------------------------------ fixtures


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
    if not reachable(endpoint):
        pytest.fail(f"{RGW_ENV}={endpoint} is set but nothing answers there", pytrace=False)
    return endpoint


@pytest.fixture(scope="session")
def rgw_bucket(rgw_endpoint: str) -> Iterator[str]:
    bucket = make_bucket(rgw_endpoint)
    yield bucket
    drop_bucket(rgw_endpoint, bucket)


@pytest.fixture
def rgw(rgw_endpoint: str) -> Iterator[RGW]:
    """The session's RGW, stopped and started only when its state dir is named explicitly (infra/run-tests.sh
    exports SVD_RAY_CEPH_DIR for the server it started; a shared default server is never stopped) and it
    serves this endpoint. Always left running afterwards."""
    state = os.environ.get("SVD_RAY_CEPH_DIR")
    if not state:
        pytest.skip("SVD_RAY_CEPH_DIR is not set: not stopping a server this test session may not own")
    ports = Path(state) / "ports.env"
    port = dict(line.split("=", 1) for line in ports.read_text().split()).get("RGW_PORT") if ports.exists() else None
    if port is None or not rgw_endpoint.endswith(f":{port}"):
        pytest.skip(f"{RGW_ENV}={rgw_endpoint} is not the RGW of state dir {state}: cannot stop/start it")
    server = RGW(state, rgw_endpoint)
    assert server.up()
    try:
        yield server
    finally:
        if not answers(rgw_endpoint):
            server.start()
