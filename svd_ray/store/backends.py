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

Failures of the storage itself (connection refused/reset, timeouts after the client's bounded retries,
HTTP 5xx and throttling, local I/O errors of a vanished mount) raise :class:`StoreUnavailable`. The S3
client's timeouts and attempts are bounded (``SVD_RAY_S3_CONNECT_TIMEOUT``, ``SVD_RAY_S3_READ_TIMEOUT``,
``SVD_RAY_S3_MAX_ATTEMPTS``; see :func:`s3_client_limits`), so no call hangs on a dead or frozen server.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import stat
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import NotFoundError, StoreError, StoreUnavailable

__all__ = ["ObjectInfo", "Backend", "LocalBackend", "S3Backend", "S3ClientLimits", "s3_client_limits"]

#: errno values of a local/network filesystem that is failing (not of a bad request): StoreUnavailable.
_UNAVAILABLE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EIO", "ETIMEDOUT", "ESTALE", "ENOTCONN", "EHOSTDOWN", "EHOSTUNREACH", "ENETDOWN", "ENETUNREACH")
    if hasattr(errno, name)
)


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
        msg = f"{op} {self.describe()}/{key} failed: {exc.strerror or exc}"
        if exc.errno in _UNAVAILABLE_ERRNOS:
            return StoreUnavailable(f"storage unavailable: {msg}")
        return StoreError(msg)

    def _place(self, tmp: Path, key: str, exclusive: bool) -> bool:
        """Move the finished temp file to ``key``: ``os.replace`` or, if ``exclusive``, ``os.link`` (False if
        the name exists). Retries when a concurrent delete pruned the (empty) parent directory."""
        dest = self._path(key)
        for attempt in range(5):
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
            except (FileNotFoundError, FileExistsError):
                # A concurrent delete pruned a directory while mkdir was creating the chain: pathlib then
                # reports "File exists" (made, then gone before its is_dir check) or "No such file".
                if attempt == 4:
                    raise
                continue
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
        except OSError as exc:
            if exc.errno in _UNAVAILABLE_ERRNOS:
                raise self._os_error("read", key, exc) from exc
            raise

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        base = self.root
        # Walk only the deepest directory fully contained in the prefix.
        dir_part, _, _ = prefix.rpartition("/")
        start = base.joinpath(*dir_part.split("/")) if dir_part else base
        out: list[ObjectInfo] = []
        try:
            if not stat.S_ISDIR(os.stat(start).st_mode):
                return out
        except (FileNotFoundError, NotADirectoryError):
            return out
        except OSError as exc:  # e.g. EIO from a dead mount: not "empty"
            raise self._os_error("list", prefix, exc) from exc

        def onerror(exc: OSError) -> None:
            if not isinstance(exc, (FileNotFoundError, NotADirectoryError)):  # vanished while listing: fine
                raise self._os_error("list", prefix, exc) from exc

        for dirpath, dirnames, filenames in os.walk(start, onerror=onerror):
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
                except OSError as exc:
                    raise self._os_error("list", key, exc) from exc
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


@dataclass(frozen=True)
class S3ClientLimits:
    """Bounds of every S3 request: seconds to connect, seconds without a byte while reading (a socket
    timeout, not a limit on a whole transfer), and total attempts per request (first try included; retries
    cover connection errors, timeouts, 5xx and throttling with botocore's "standard" backoff). Worst case for
    one request: about ``max_attempts * read_timeout`` plus a few seconds of backoff against a server that
    accepts connections but never answers, ``max_attempts * connect_timeout`` against a host that drops
    packets, about a second against a closed port. A download may take one more transfer-level attempt."""

    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 3


S3_LIMIT_ENV = {
    "connect_timeout": "SVD_RAY_S3_CONNECT_TIMEOUT",
    "read_timeout": "SVD_RAY_S3_READ_TIMEOUT",
    "max_attempts": "SVD_RAY_S3_MAX_ATTEMPTS",
}


def s3_client_limits() -> S3ClientLimits:
    """The defaults of :class:`S3ClientLimits`, overridden by ``SVD_RAY_S3_CONNECT_TIMEOUT`` / ``_READ_TIMEOUT``
    (seconds, > 0) and ``SVD_RAY_S3_MAX_ATTEMPTS`` (integer >= 1). A bad value is a :class:`StoreError`."""
    values: dict[str, Any] = {}
    for name, env in S3_LIMIT_ENV.items():
        raw = os.environ.get(env, "").strip()
        if not raw:
            continue
        try:
            value: float | int = int(raw) if name == "max_attempts" else float(raw)
        except ValueError:
            value = 0
        if not (value > 0 and math.isfinite(value)):
            kind = "an integer >= 1" if name == "max_attempts" else "a number of seconds > 0"
            raise StoreError(f"{env}={raw!r} is invalid: it must be {kind}")
        values[name] = value
    return S3ClientLimits(**values)


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

    def __init__(
        self,
        bucket: str,
        prefix: str,
        endpoint_url: str | None = None,
        client: Any = None,
        limits: S3ClientLimits | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self._client = client
        self._limits = limits
        self._lock = threading.Lock()

    @property
    def limits(self) -> S3ClientLimits:
        """The request bounds in force (explicit ``limits``, else the environment, else the defaults)."""
        if self._limits is None:
            self._limits = s3_client_limits()
        return self._limits

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
                    lim = self.limits
                    cfg = Config(
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                        retries={"total_max_attempts": lim.max_attempts, "mode": "standard"},
                        connect_timeout=lim.connect_timeout,
                        read_timeout=lim.read_timeout,
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

    def _wrap(self, exc: BaseException, what: str) -> StoreError:
        """Translate boto/botocore failures into one-line :class:`StoreError` subclasses; failures of the
        server or the network (not of the request) become :class:`StoreUnavailable`."""
        if isinstance(exc, StoreError):
            return exc
        inner = getattr(exc, "last_exception", None)  # boto3 RetriesExceededError (download_file)
        if isinstance(inner, BaseException):
            return self._wrap(inner, what)
        if type(exc).__name__ == "S3UploadFailedError" and isinstance(exc.__cause__, BaseException):
            return self._wrap(exc.__cause__, what)
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
        lim = self.limits
        if _is_unreachable(exc):
            return StoreUnavailable(
                f"{what}: storage unavailable: cannot reach S3 endpoint of {self.describe()} ({name}; "
                f"{lim.max_attempts} attempt(s), connect/read timeouts {lim.connect_timeout:g}/{lim.read_timeout:g} s)"
            )
        if status in (500, 502, 503, 504) or code in _UNAVAILABLE_CODES:
            return StoreUnavailable(
                f"{what}: storage unavailable: S3 endpoint of {self.describe()} answered {code or status} "
                f"after {lim.max_attempts} attempt(s)"
            )
        msg = str(exc).splitlines()[0] if str(exc) else name
        return StoreError(f"{what}: S3 error from {self.describe()}: {msg}")

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise self._wrap(exc, what) from exc
        except (ConnectionError, TimeoutError, *_urllib3_errors()) as exc:  # a socket error botocore did not wrap
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
        self._call(f"upload {key}", self.client.upload_file, Filename=str(src), Bucket=self.bucket, Key=self._key(key))

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
            except (BotoCoreError, ConnectionError, TimeoutError) as exc:
                raise self._wrap(exc, f"create {key}") from exc
        return False

    def read_bytes(self, key: str) -> bytes:
        resp = self._call(key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        with contextlib.closing(resp["Body"]) as body:
            data: bytes = self._call(key, body.read)
        return data

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[IO[bytes]]:
        resp = self._call(key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        with contextlib.closing(resp["Body"]) as body:
            yield _GuardedStream(body, self, key)  # type: ignore[misc]

    def download_file(self, key: str, dest: Path) -> None:
        from boto3.s3.transfer import TransferConfig

        # botocore already retries each request; one more attempt at the transfer level covers a body cut
        # off mid-stream, and keeps the worst case bounded (see S3ClientLimits).
        cfg = TransferConfig(num_download_attempts=2)
        self._call(
            key, self.client.download_file, Bucket=self.bucket, Key=self._key(key), Filename=str(dest), Config=cfg
        )

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


_UNAVAILABLE_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "BadGateway",
        "GatewayTimeout",
    }
)


def _urllib3_errors() -> tuple[type[BaseException], ...]:
    try:
        import urllib3.exceptions

        return (urllib3.exceptions.HTTPError,)
    except ImportError:  # pragma: no cover - urllib3 ships with botocore
        return ()


def _is_unreachable(exc: BaseException) -> bool:
    """Connection refused/reset/closed, timeouts, broken streams: the server or network, not the request."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, ResponseStreamingError

    if isinstance(exc, (BotoConnectionError, HTTPClientError, ResponseStreamingError, _urllib3_errors())):
        return True
    return isinstance(exc, (ConnectionError, TimeoutError))


class _GuardedStream:
    """A response body whose read errors (a server dying mid-stream) surface as :class:`StoreUnavailable`."""

    def __init__(self, body: Any, backend: S3Backend, key: str) -> None:
        self._body = body
        self._backend = backend
        self._key = key

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._backend._call(self._key, self._body.read, **({"amt": n} if n >= 0 else {}))
        return data
