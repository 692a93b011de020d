"""Give Ray Train (``RunConfig(storage_path=..., storage_filesystem=...)``) the store's storage settings.

pyarrow ignores ``AWS_ENDPOINT_URL``; the endpoint override is passed explicitly here. Credentials come
from the standard AWS environment. Against Ceph RGW also export
``AWS_REQUEST_CHECKSUM_CALCULATION=WHEN_REQUIRED`` and ``AWS_RESPONSE_CHECKSUM_VALIDATION=WHEN_REQUIRED``
(``infra/ceph-rgw.sh env`` prints them) — for the driver *and* the Ray workers (``runtime_env``).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

from .errors import StoreError
from .uri import parse_store_uri, resolve_endpoint

__all__ = ["pyarrow_filesystem_for", "s3_endpoint_parts"]


def s3_endpoint_parts(endpoint_url: str) -> tuple[str, str]:
    """``http://127.0.0.1:7480`` -> ``("127.0.0.1:7480", "http")``."""
    parsed = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
    if not parsed.netloc:
        raise StoreError(f"invalid S3 endpoint {endpoint_url!r}")
    return parsed.netloc, parsed.scheme or "https"


def pyarrow_filesystem_for(uri: str, endpoint_url: str | None = None) -> tuple[Any | None, str]:
    """``(filesystem, path)`` for Ray Train's ``storage_filesystem`` / ``storage_path``.

    ``file://`` -> ``(None, "/abs/dir")``; ``s3://bucket/prefix`` -> ``(pyarrow.fs.S3FileSystem, "bucket/prefix")``
    with the endpoint from ``endpoint_url`` / ``SVD_RAY_S3_ENDPOINT`` / ``AWS_ENDPOINT_URL(_S3)``.
    """
    loc = parse_store_uri(uri)
    if loc.scheme == "file":
        return None, loc.path
    from pyarrow import fs as pafs

    from .backends import s3_client_limits

    # The same bounds as the store's boto3 client (SVD_RAY_S3_CONNECT_TIMEOUT / _READ_TIMEOUT / _MAX_ATTEMPTS).
    # (pyarrow documents request_timeout as applied on Windows and macOS only.)
    limits = s3_client_limits()
    kwargs: dict[str, Any] = {
        "connect_timeout": limits.connect_timeout,
        "request_timeout": limits.read_timeout,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=limits.max_attempts),
    }
    endpoint = resolve_endpoint(endpoint_url)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
        kwargs["endpoint_override"], kwargs["scheme"] = s3_endpoint_parts(endpoint)
        kwargs["region"] = region or "us-east-1"
    elif region:
        kwargs["region"] = region
    path = f"{loc.bucket}/{loc.path}" if loc.path else loc.bucket
    return pafs.S3FileSystem(**kwargs), path
