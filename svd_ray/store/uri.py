"""Store URIs: ``file:///abs/dir``, ``file://~/dir``, a plain path, or ``s3://bucket[/prefix]``.

The S3 endpoint comes from (first match): the explicit ``endpoint_url`` argument, ``SVD_RAY_S3_ENDPOINT``,
``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``; region and credentials come from the standard AWS
environment/config chain (boto3 and pyarrow read them themselves).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import StoreError

__all__ = ["StoreURI", "parse_store_uri", "default_store_uri", "resolve_endpoint", "DEFAULT_STORE_URI"]

DEFAULT_STORE_URI = "file://~/.local/share/svd-ray/store"
_ENDPOINT_ENV = ("SVD_RAY_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


@dataclass(frozen=True)
class StoreURI:
    """A parsed store location. ``path`` is the absolute directory (file) or the key prefix (s3, no slashes
    at either end, may be empty)."""

    scheme: str  # "file" or "s3"
    bucket: str  # "" for file
    path: str

    def __str__(self) -> str:
        if self.scheme == "file":
            return "file://" + self.path
        return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"


def default_store_uri() -> str:
    """``$SVD_RAY_STORE`` or ``file://~/.local/share/svd-ray/store``."""
    return os.environ.get("SVD_RAY_STORE") or DEFAULT_STORE_URI


def parse_store_uri(uri: str) -> StoreURI:
    """Parse and normalise a store URI; raise :class:`StoreError` for anything unsupported."""
    if not isinstance(uri, str) or not uri.strip():
        raise StoreError("store URI must be a non-empty string")
    uri = uri.strip()
    if "://" not in uri:  # a plain local path
        return StoreURI("file", "", str(Path(uri).expanduser().resolve()))
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        # file:///abs/dir -> netloc "", path "/abs/dir";  file://~/dir -> netloc "~"
        if parsed.netloc not in ("", "localhost") and not parsed.netloc.startswith("~"):
            raise StoreError(f"unsupported file URI {uri!r}: use file:///absolute/path or file://~/path")
        raw = unquote(parsed.netloc + parsed.path) if parsed.netloc.startswith("~") else unquote(parsed.path)
        if not raw:
            raise StoreError(f"file URI {uri!r} has no path")
        path = Path(raw).expanduser()
        if not path.is_absolute():
            raise StoreError(f"file URI {uri!r} must name an absolute path")
        return StoreURI("file", "", str(path.resolve()))
    if scheme in ("s3", "s3a"):
        bucket = parsed.netloc
        if not bucket or "@" in bucket or ":" in bucket:
            raise StoreError(f"invalid S3 URI {uri!r}: expected s3://bucket[/prefix]")
        if parsed.query or parsed.fragment:
            raise StoreError(f"invalid S3 URI {uri!r}: no query string or fragment allowed")
        prefix = "/".join(p for p in parsed.path.split("/") if p)
        if any(p in (".", "..") for p in prefix.split("/")):
            raise StoreError(f"invalid S3 URI {uri!r}: '.' or '..' in prefix")
        return StoreURI("s3", bucket, prefix)
    raise StoreError(f"unsupported store URI scheme {parsed.scheme!r} in {uri!r} (use file:// or s3://)")


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint override to use, or ``None`` for AWS's default endpoints."""
    if endpoint_url:
        return endpoint_url
    for name in _ENDPOINT_ENV:
        value = os.environ.get(name)
        if value:
            return value
    return None
