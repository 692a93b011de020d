"""Object backends: a tiny key/value interface implemented for a local directory and for S3.

Keys are ``/``-separated and relative to the store root. The only primitive with concurrency semantics is
:meth:`Backend.create_once`, which writes a complete object iff no object exists at that key:

* local: the bytes go to a temp file under ``<root>/.tmp`` (same filesystem), are fsync-ed, then
  ``os.link``-ed to the final name; ``link`` fails atomically with ``EEXIST`` if the name exists, and readers
  never see a partially written file;
* S3: ``PutObject`` with ``If-None-Match: *``; the server answers 412 if the key exists (AWS S3, Ceph RGW,
  moto).

Every other write is "last writer wins" and is only used for keys that are private to one publisher
(a per-upload data prefix), so no correctness argument needs ``If-Match``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import NotFoundError, StoreError

__all__ = ["ObjectInfo", "Backend", "LocalBackend", "S3Backend"]


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: key relative to the root, size in bytes, and an opaque change stamp."""

    key: str
    size: int
    stamp: str
    mtime: float = 0.0  # seconds since the epoch (S3 LastModified / file mtime)


class Backend(ABC):
    """Minimal object-store interface used by :class:`~svd_ray.store.bundle_store.BundleStore`."""

    #: True when :meth:`upload_file` may be called from several threads at once with benefit.
    parallel_uploads: bool = False

    @abstractmethod
    def describe(self) -> str:
        """Human-readable location (used in error messages)."""

    @abstractmethod
    def upload_file(self, key: str, src: Path) -> None:
        """Store the file ``src`` at ``key`` (overwrites)."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key`` (overwrites; not used for anything shared between writers)."""

    @abstractmethod
    def create_once(self, key: str, data: bytes) -> bool:
        """Atomically create ``key`` with ``data``; return False (writing nothing) if it already exists."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """Whole object; :class:`NotFoundError` if missing."""

    @abstractmethod
    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[IO[bytes]]:
        """Binary stream of the object; :class:`NotFoundError` if missing."""

    @abstractmethod
    def download_file(self, key: str, dest: Path) -> None:
        """Copy the object to the local file ``dest``; :class:`NotFoundError` if missing."""

    @abstractmethod
    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        """All objects whose key starts with ``prefix`` (recursive), sorted by key."""

    @abstractmethod
    def list_children(self, prefix: str) -> list[str]:
        """Names of the immediate "sub-directories" of ``prefix`` (which ends with ``/``)."""

    @abstractmethod
    def delete(self, keys: list[str]) -> None:
        """Delete the given keys; missing keys are ignored."""

    def ensure_ready(self, create: bool = False) -> None:  # noqa: B027 - optional hook
        """Called before the first write: check that the location exists (create the bucket if ``create``)."""


# --------------------------------------------------------------------------------------------- local


class LocalBackend(Backend):
    """A directory on a local (or POSIX network) filesystem. ``OSError``s surface as :class:`StoreError`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts):
            raise StoreError(f"internal error: bad key {key!r}")
        return self.root.joinpath(*parts)

    def _tmp(self) -> Path:
        tmp = self.root / ".tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp / f"{uuid.uuid4().hex}.part"

    def _missing(self, key: str) -> NotFoundError:
        return NotFoundError(f"{self.describe()}/{key} does not exist")

    def _os_error(self, op: str, key: str, exc: OSError) -> StoreError:
        return StoreError(f"{op} {self.describe()}/{key} failed: {exc.strerror or exc}")

    def _place(self, tmp: Path, key: str, exclusive: bool) -> bool:
        """Move the finished temp file to ``key``: ``os.replace`` or, if ``exclusive``, ``os.link`` (False if
        the name exists). Retries when a concurrent delete pruned the (empty) parent directory."""
        dest = self._path(key)
        for attempt in range(5):
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                if not exclusive:
                    os.replace(tmp, dest)
                    return True
                try:
                    os.link(tmp, dest)
                except FileExistsError:
                    return False
                except OSError as exc:  # no hard links here: O_EXCL create (content may be seen half-written)
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                        raise
                    try:
                        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    except FileExistsError:
                        return False
                    with os.fdopen(fd, "wb") as fh, open(tmp, "rb") as src:
                        shutil.copyfileobj(src, fh)
                        fh.flush()
                        os.fsync(fh.fileno())
                _fsync_dir(dest.parent)
                return True
            except FileNotFoundError:
                if attempt == 4:
                    raise
        return False  # pragma: no cover

    def _write(self, key: str, writer: Callable[[Path], object], exclusive: bool, op: str) -> bool:
        try:
            tmp = self._tmp()
            try:
                writer(tmp)
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                return self._place(tmp, key, exclusive)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise self._os_error(op, key, exc) from exc

    def ensure_ready(self, create: bool = False) -> None:
        """A local store directory is always created on first write."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create store directory {self.root}: {exc.strerror or exc}") from exc

    def upload_file(self, key: str, src: Path) -> None:
        self._write(key, lambda tmp: shutil.copyfile(src, tmp), exclusive=False, op="upload to")

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda tmp: tmp.write_bytes(data), exclusive=False, op="write")

    def create_once(self, key: str, data: bytes) -> bool:
        return self._write(key, lambda tmp: tmp.write_bytes(data), exclusive=True, op="create")

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise self._missing(key) from None
        except OSError as exc:
            raise self._os_error("read", key, exc) from exc

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[IO[bytes]]:
        try:
            fh = open(self._path(key), "rb")
        except (FileNotFoundError, NotADirectoryError):
            raise self._missing(key) from None
        except OSError as exc:
            raise self._os_error("read", key, exc) from exc
        with fh:
            yield fh

    def download_file(self, key: str, dest: Path) -> None:
        try:
            shutil.copyfile(self._path(key), dest)
        except (FileNotFoundError, NotADirectoryError):
            if not dest.parent.is_dir():
                raise
            raise self._missing(key) from None

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        base = self.root
        # Walk only the deepest directory fully contained in the prefix.
        dir_part, _, _ = prefix.rpartition("/")
        start = base.joinpath(*dir_part.split("/")) if dir_part else base
        out: list[ObjectInfo] = []
        if not start.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(start):
            rel_dir = Path(dirpath).relative_to(base).as_posix()
            if rel_dir == ".tmp" or rel_dir.startswith(".tmp/"):
                dirnames[:] = []
                continue
            for name in filenames:
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:  # deleted while listing
                    continue
                out.append(ObjectInfo(key, st.st_size, f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}", st.st_mtime))
        out.sort(key=lambda o: o.key)
        return out

    def list_children(self, prefix: str) -> list[str]:
        d = self.root.joinpath(*[p for p in prefix.split("/") if p])
        try:
            return sorted(e.name for e in os.scandir(d) if e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise self._os_error("list", prefix, exc) from exc

    def delete(self, keys: list[str]) -> None:
        parents: set[Path] = set()
        for key in keys:
            p = self._path(key)
            try:
                p.unlink(missing_ok=True)
            except OSError as exc:
                raise self._os_error("delete", key, exc) from exc
            parents.add(p.parent)
        # Prune directories left empty (deepest first), never the root itself.
        for d in sorted(parents, key=lambda q: len(q.parts), reverse=True):
            while d != self.root and self.root in d.parents:
                try:
                    d.rmdir()
                except OSError:
                    break
                d = d.parent


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ s3


def _client_error_code(exc: Exception) -> tuple[str, int]:
    resp: dict[str, Any] = getattr(exc, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


_LOADER: Any = None
_LOADER_LOCK = threading.Lock()


def _new_session() -> Any:
    """A fresh boto3 session (credentials/region resolved now) sharing one model loader, so clients after
    the first skip re-reading botocore's JSON service models (~0.1 s each)."""
    import boto3
    import botocore.loaders
    import botocore.session

    global _LOADER
    with _LOADER_LOCK:
        if _LOADER is None:
            _LOADER = botocore.loaders.create_loader()
        core = botocore.session.get_session()
        core.register_component("data_loader", _LOADER)
    return boto3.session.Session(botocore_session=core)


class S3Backend(Backend):
    """A bucket + key prefix on S3 or an S3-compatible server (Ceph RGW, moto, ...), via boto3.

    Credentials and region come from the standard AWS chain. With an endpoint override the client uses
    path-style addressing. Request checksums are only sent when an operation requires them (Ceph RGW 16
    rejects the newer default trailing checksums), which the ``AWS_*_CHECKSUM_*`` variables also select.
    """

    parallel_uploads = True

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None, client: Any = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self._client = client
        self._lock = threading.Lock()

    # -- plumbing

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    from botocore.config import Config

                    s3_cfg = (
                        {"addressing_style": os.environ.get("SVD_RAY_S3_ADDRESSING_STYLE", "path")}
                        if (self.endpoint_url)
                        else {}
                    )
                    cfg = Config(
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                        retries={"max_attempts": 4, "mode": "standard"},
                        connect_timeout=10,
                        read_timeout=120,
                        max_pool_connections=16,
                        s3=s3_cfg,
                    )
                    self._client = _new_session().client("s3", endpoint_url=self.endpoint_url, config=cfg)
        return self._client

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        return f"{where} (endpoint {self.endpoint_url})" if self.endpoint_url else where

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def _wrap(self, exc: Exception, what: str) -> StoreError:
        """Translate boto/botocore failures into one-line :class:`StoreError` subclasses."""
        code, status = _client_error_code(exc)
        if code in ("NoSuchKey", "404", "NotFound") or (status == 404 and code != "NoSuchBucket"):
            return NotFoundError(f"{what}: not found in {self.describe()}")
        if code == "NoSuchBucket":
            return StoreError(f"bucket {self.bucket!r} does not exist ({self.describe()})")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or status == 403:
            return StoreError(f"{what}: access denied by {self.describe()} ({code or status}); check AWS credentials")
        name = type(exc).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return StoreError(f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError"):
            return StoreError(f"{what}: cannot reach S3 endpoint of {self.describe()} ({name})")
        msg = str(exc).splitlines()[0] if str(exc) else name
        return StoreError(f"{what}: S3 error from {self.describe()}: {msg}")

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._wrap(exc, what) from exc

    # -- interface

    def ensure_ready(self, create: bool = False) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except (ClientError, BotoCoreError) as exc:
            code, status = _client_error_code(exc)
            missing = status == 404 or code in ("404", "NoSuchBucket", "NotFound")
            if missing and not create:
                raise StoreError(
                    f"bucket {self.bucket!r} does not exist ({self.describe()}); create it or pass create_bucket=True"
                ) from exc
            if not missing:
                raise self._wrap(exc, f"bucket {self.bucket!r}") from exc
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code, _ = _client_error_code(exc)
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._wrap(exc, f"create bucket {self.bucket!r}") from exc

    def upload_file(self, key: str, src: Path) -> None:
        from boto3.exceptions import S3UploadFailedError

        try:
            self._call(
                f"upload {key}", self.client.upload_file, Filename=str(src), Bucket=self.bucket, Key=self._key(key)
            )
        except S3UploadFailedError as exc:
            raise StoreError(f"upload {key} to {self.describe()} failed: {str(exc).splitlines()[0]}") from exc

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(f"put {key}", self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def create_once(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        for attempt in range(6):
            try:
                self.client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*", ContentType="application/json"
                )
                return True
            except ClientError as exc:
                code, status = _client_error_code(exc)
                if status == 412 or code == "PreconditionFailed":
                    return False
                if status == 409 or code == "ConditionalRequestConflict":  # concurrent conditional write in flight
                    time.sleep(0.05 * (2**attempt))
                    continue
                raise self._wrap(exc, f"create {key}") from exc
            except BotoCoreError as exc:
                raise self._wrap(exc, f"create {key}") from exc
        return False

    def read_bytes(self, key: str) -> bytes:
        resp = self._call(key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        with contextlib.closing(resp["Body"]) as body:
            data: bytes = body.read()
        return data

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[IO[bytes]]:
        resp = self._call(key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        with contextlib.closing(resp["Body"]) as body:
            yield body

    def download_file(self, key: str, dest: Path) -> None:
        self._call(key, self.client.download_file, Bucket=self.bucket, Key=self._key(key), Filename=str(dest))

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(
            f"list {prefix}", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)))
        )
        for page in pages:
            for obj in page.get("Contents", []):
                out.append(
                    ObjectInfo(
                        self._rel(obj["Key"]),
                        int(obj["Size"]),
                        f"{obj['Size']}:{obj.get('ETag', '')}",
                        obj["LastModified"].timestamp() if "LastModified" in obj else 0.0,
                    )
                )
        out.sort(key=lambda o: o.key)
        return out

    def list_children(self, prefix: str) -> list[str]:
        full = self._key(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(
            f"list {prefix}", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/"))
        )
        names = set()
        for page in pages:
            for cp in page.get("CommonPrefixes", []):
                names.add(cp["Prefix"][len(full) :].rstrip("/"))
        return sorted(n for n in names if n)

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            resp = self._call(
                "delete", self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
            )
            errors = [e for e in resp.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                e = errors[0]
                raise StoreError(
                    f"delete {e.get('Key')} in {self.describe()} failed: {e.get('Code')} {e.get('Message')}"
                )
