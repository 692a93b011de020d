"""Task bundle store: where trained tasks live between training and serving.

    from svd_ray.store import open_store
    store = open_store("s3://svd-ray/store")              # or "file:///abs/dir"; default $SVD_RAY_STORE
    m = store.publish("arc_easy", "out/bundle", meta)      # files, then a create-once manifest
    path, m = store.fetch("arc_easy", "promoted", expect={"base_model_id": ..., "weights_sha256": ...})
    store.delete("arc_easy", m.version, reason="bad eval")  # leaves a tombstone: the name is never reused

See ``docs/STORE.md`` for the layout and the guarantees.
"""

from __future__ import annotations

from pathlib import Path

from .arrowfs import pyarrow_filesystem_for
from .backends import Backend, LocalBackend, ObjectInfo, S3Backend, S3ClientLimits, s3_client_limits
from .bundle_store import MARKER_NAME, BundleStore, default_cache_dir
from .errors import (
    ConflictError,
    DeletedError,
    IntegrityError,
    InvalidNameError,
    MismatchError,
    NotFoundError,
    StoreError,
    StoreUnavailable,
)
from .manifest import SCHEMA_VERSION, FileEntry, Manifest, PromotionRecord, Tombstone
from .names import new_version, validate_relpath, validate_task_name, validate_version
from .uri import DEFAULT_STORE_URI, StoreURI, default_store_uri, parse_store_uri, resolve_endpoint

__all__ = [
    "open_store",
    "BundleStore",
    "Manifest",
    "FileEntry",
    "PromotionRecord",
    "Tombstone",
    "SCHEMA_VERSION",
    "MARKER_NAME",
    "StoreError",
    "InvalidNameError",
    "NotFoundError",
    "DeletedError",
    "ConflictError",
    "IntegrityError",
    "MismatchError",
    "StoreUnavailable",
    "validate_task_name",
    "validate_version",
    "validate_relpath",
    "new_version",
    "pyarrow_filesystem_for",
    "parse_store_uri",
    "default_store_uri",
    "resolve_endpoint",
    "default_cache_dir",
    "StoreURI",
    "DEFAULT_STORE_URI",
    "Backend",
    "LocalBackend",
    "S3Backend",
    "S3ClientLimits",
    "s3_client_limits",
    "ObjectInfo",
]


def open_store(
    uri: str | None = None,
    endpoint_url: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    create_bucket: bool = False,
) -> BundleStore:
    """Open the store at ``uri`` (default: ``$SVD_RAY_STORE`` or ``file://~/.local/share/svd-ray/store``).

    For ``s3://`` the endpoint is ``endpoint_url``, else ``$SVD_RAY_S3_ENDPOINT``, else
    ``$AWS_ENDPOINT_URL_S3``/``$AWS_ENDPOINT_URL``, else AWS. ``create_bucket`` creates a missing bucket on
    the first publish (otherwise a missing bucket is a :class:`StoreError`). Opening does no I/O. S3 requests
    are bounded by :class:`S3ClientLimits` (``SVD_RAY_S3_CONNECT_TIMEOUT``/``_READ_TIMEOUT``/``_MAX_ATTEMPTS``);
    an unreachable backend raises :class:`StoreUnavailable`.
    """
    loc = parse_store_uri(uri if uri is not None else default_store_uri())
    backend: Backend
    if loc.scheme == "file":
        backend = LocalBackend(loc.path)
    else:
        backend = S3Backend(loc.bucket, loc.path, endpoint_url=resolve_endpoint(endpoint_url))
    return BundleStore(backend, str(loc), cache_dir=cache_dir, create_bucket=create_bucket)
