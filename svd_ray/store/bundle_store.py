"""``BundleStore``: publish, list, fetch (verified), verify, promote and delete task bundles.

Layout under the store root (a directory or an S3 bucket/prefix)::

    tasks/<task>/<version>/manifest.json                 create-once, sealed; its existence = "complete"
    tasks/<task>/<version>/tombstone.json                create-once, sealed; its existence = "deleted for good"
    tasks/<task>/<version>/data-<upload-id>/<file ...>   the bundle's files, private to one publish attempt
    tasks/<task>/_promoted/<seq, 10 digits>.json         append-only promotion log (create-once records)

* **Visibility**: a version is live iff its manifest exists and its tombstone does not. Both are create-once
  objects and a tombstone is never removed, so "deleted" is a terminal state: nothing stored under a
  tombstoned version can ever become visible again, whatever order writers and deleters run in.
* **Publish** refuses a tombstoned or existing name, uploads every file into a fresh ``data-<upload-id>/``
  prefix, then creates the manifest with a conditional create (the commit point), then checks for a
  tombstone once more: a delete that got in first wins and the publish reports :class:`ConflictError`.
  A losing concurrent publisher never overwrites the winner's files; it gets :class:`ConflictError` and
  removes its own upload. The winner removes stale uploads of earlier failed attempts at the same version.
* **Delete** creates the tombstone first (the commit point), then removes the manifest, then every other
  object under the version. Readers check the tombstone, so the version disappears atomically; a reader that
  had already read the manifest and then finds files missing gets :class:`DeletedError`, not corrupt data.
* **Files without a manifest** (a crashed or losing publisher, a publish cut off by an outage) are invisible
  to ``list_versions``/``fetch`` and are removed by :meth:`BundleStore.gc` (or by a successful retry).
* **Order**: versions sort by the manifest's ``created_at`` (set when the manifest is written), then name.
  ``latest`` is the last live one. A version whose manifest is unreadable keeps its place (by the object's
  modification time) so that ``latest`` fails loudly rather than silently falling back to an older bundle.
* **Promotion**: the current pointer is the record with the highest sequence number; a writer that loses
  the race for ``seq`` retries with ``seq + 1``. No ``If-Match`` is needed and the pointer is never torn.
* **Fetch** verifies size and sha256 of every file while installing into a temp directory, then renames it
  into place with a marker (``.svd-ray-bundle.json``) recording the manifest hash and each file's size and
  mtime. A later fetch of the same version reuses the directory if the marker matches and every file still
  has its recorded size and mtime (cheap); ``full_verify=True`` re-hashes instead.
* **Outages**: a backend that cannot be reached raises :class:`StoreUnavailable` (bounded timeouts/retries,
  see ``backends.S3ClientLimits``); a publish that fails that way leaves nothing visible.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from .backends import Backend, LocalBackend, ObjectInfo
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
from .manifest import (
    MANIFEST_NAME,
    TOMBSTONE_NAME,
    TOMBSTONE_REASON_MAX,
    FileEntry,
    Manifest,
    PromotionRecord,
    Tombstone,
    canonical_json,
    utc_now_iso,
)
from .names import new_version, validate_relpath, validate_task_name, validate_version

__all__ = ["BundleStore", "MARKER_NAME", "default_cache_dir", "sha256_file"]

log = logging.getLogger(__name__)

MARKER_NAME = ".svd-ray-bundle.json"
_PROMOTED_DIR = "_promoted"
_SEQ_RE = re.compile(r"(\d{10})\.json", re.ASCII)
_CHUNK = 1 << 20
_T = TypeVar("_T")


def default_cache_dir() -> Path:
    """``$SVD_RAY_CACHE_DIR``, else ``$SVD_RAY_CACHE/bundles`` (the one cache root models also use), else
    ``~/.cache/svd-ray/bundles``."""
    env = os.environ.get("SVD_RAY_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    root = os.environ.get("SVD_RAY_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "svd-ray") / "bundles"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sha256_stream(stream: Any) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    while chunk := stream.read(_CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def _iso_from_ts(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_DEFAULT_VERSION_RE = re.compile(r"(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})(\d{6})Z-[0-9a-f]{6}", re.ASCII)


def _fallback_created(version: str, info: ObjectInfo) -> str:
    """Sort position of a version whose manifest cannot be read: the time in a default version name, else
    the manifest object's mtime, rounded *up* to the end of its second when the backend only has second
    resolution (when in doubt the broken version counts as newer, so ``latest`` fails instead of silently
    serving an older bundle)."""
    match = _DEFAULT_VERSION_RE.fullmatch(version)
    if match:
        y, mo, d, h, mi, se, us = match.groups()
        return f"{y}-{mo}-{d}T{h}:{mi}:{se}.{us}Z"
    ts = info.mtime
    if ts == int(ts):
        ts += 0.999999
    return _iso_from_ts(ts)


class BundleStore:
    """Task bundle store on a :class:`~svd_ray.store.backends.Backend`. Use :func:`svd_ray.store.open_store`."""

    def __init__(
        self,
        backend: Backend,
        uri: str,
        *,
        cache_dir: str | Path | None = None,
        create_bucket: bool = False,
        max_workers: int = 8,
    ) -> None:
        self.backend = backend
        self._uri = uri
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.create_bucket = create_bucket
        self.max_workers = max_workers if backend.parallel_uploads else 1
        self._ready = False
        self._manifest_cache: dict[tuple[str, str], tuple[str, Manifest | StoreError]] = {}
        self._tombstone_cache: dict[tuple[str, str], tuple[str, Tombstone]] = {}

    def __repr__(self) -> str:
        return f"BundleStore({self._uri!r})"

    @property
    def uri(self) -> str:
        """The normalised store URI (``file:///abs/dir`` or ``s3://bucket/prefix``)."""
        return self._uri

    # ------------------------------------------------------------------------------------------- keys

    @staticmethod
    def _version_prefix(task: str, version: str) -> str:
        return f"tasks/{task}/{version}/"

    def _manifest_key(self, task: str, version: str) -> str:
        return f"tasks/{task}/{version}/{MANIFEST_NAME}"

    def _tombstone_key(self, task: str, version: str) -> str:
        return f"tasks/{task}/{version}/{TOMBSTONE_NAME}"

    @staticmethod
    def _promoted_prefix(task: str) -> str:
        return f"tasks/{task}/{_PROMOTED_DIR}/"

    def _where(self, task: str, version: str) -> str:
        return f"task {task!r} version {version!r}"

    def _map(self, fn: Callable[[Any], _T], items: Iterable[Any]) -> list[_T]:
        """``[fn(i) for i in items]`` on a thread pool. Fails fast: the first exception cancels the calls
        that have not started yet (so an outage costs one round of timeouts, not one per file)."""
        items = list(items)
        if self.max_workers <= 1 or len(items) <= 1:
            return [fn(i) for i in items]
        pool = ThreadPoolExecutor(max_workers=min(self.max_workers, len(items)))
        try:
            futures = [pool.submit(fn, i) for i in items]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                if f in done and f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # ---------------------------------------------------------------------------------------- listing

    def list_tasks(self, *, include_deleted: bool = False) -> list[str]:
        """Tasks that have at least one live version (``include_deleted``: or only deleted ones), by name."""
        out = []
        for name in self.backend.list_children("tasks/"):
            try:
                validate_task_name(name)
            except InvalidNameError:
                continue
            states = self._version_objects(name)
            if any(MANIFEST_NAME in d and TOMBSTONE_NAME not in d for d in states.values()) or (
                include_deleted and any(TOMBSTONE_NAME in d for d in states.values())
            ):
                out.append(name)
        return out

    def _version_objects(self, task: str) -> dict[str, dict[str, ObjectInfo]]:
        """``{version: {"manifest.json": info, "tombstone.json": info}}`` (whichever exist), from one listing."""
        found: dict[str, dict[str, ObjectInfo]] = {}
        for obj in self.backend.list_objects(f"tasks/{task}/"):
            parts = obj.key.split("/")
            if len(parts) == 4 and parts[3] in (MANIFEST_NAME, TOMBSTONE_NAME):
                try:
                    validate_version(parts[2])
                except InvalidNameError:
                    continue
                found.setdefault(parts[2], {})[parts[3]] = obj
        return found

    def _cached_manifest(self, task: str, version: str, info: ObjectInfo) -> Manifest | StoreError:
        hit = self._manifest_cache.get((task, version))
        if hit and hit[0] == info.stamp:
            return hit[1]
        try:
            value: Manifest | StoreError = self._read_manifest(task, version)
        except StoreUnavailable:
            raise
        except NotFoundError as exc:  # deleted since listing
            value = exc
        except StoreError as exc:
            value = exc
        self._manifest_cache[(task, version)] = (info.stamp, value)
        return value

    def _sorted_versions(self, task: str) -> list[tuple[str, Manifest | StoreError]]:
        states = self._version_objects(task)
        objs = {v: d[MANIFEST_NAME] for v, d in states.items() if MANIFEST_NAME in d and TOMBSTONE_NAME not in d}
        loaded = self._map(lambda v: (v, self._cached_manifest(task, v, objs[v])), sorted(objs))
        rows = []
        for version, m in loaded:
            if isinstance(m, NotFoundError):
                continue
            created = m.created_at if isinstance(m, Manifest) else _fallback_created(version, objs[version])
            rows.append((created, version, m))
        rows.sort(key=lambda r: (r[0], r[1]))
        return [(v, m) for _, v, m in rows]

    def list_versions(self, task: str) -> list[str]:
        """Live versions of ``task`` (manifest present, no tombstone), oldest to newest; [] if unknown."""
        validate_task_name(task)
        return [v for v, _ in self._sorted_versions(task)]

    def deleted_versions(self, task: str) -> list[Tombstone]:
        """Tombstones of ``task``'s deleted versions, in the order the versions were created (then deleted).

        A tombstone whose record cannot be read still marks its version deleted; it is listed with the
        object's modification time as ``deleted_at`` and the problem as ``reason``."""
        validate_task_name(task)
        states = self._version_objects(task)
        names = sorted(v for v, d in states.items() if TOMBSTONE_NAME in d)
        tombs = self._map(lambda v: self._cached_tombstone(task, v, states[v][TOMBSTONE_NAME]), names)
        return sorted(tombs, key=lambda t: (t.created_at or t.deleted_at, t.deleted_at, t.version))

    def _cached_tombstone(self, task: str, version: str, info: ObjectInfo) -> Tombstone:
        hit = self._tombstone_cache.get((task, version))
        if hit and hit[0] == info.stamp:
            return hit[1]
        try:
            tomb = self.tombstone(task, version) or Tombstone(task, version, _iso_from_ts(info.mtime), "(vanished)")
        except StoreUnavailable:
            raise
        except StoreError as exc:
            tomb = Tombstone(task, version, _iso_from_ts(info.mtime), f"(tombstone record unreadable: {exc})")
        self._tombstone_cache[(task, version)] = (info.stamp, tomb)
        return tomb

    def tombstone(self, task: str, version: str) -> Tombstone | None:
        """The tombstone of a deleted version, or ``None`` if it was never deleted.
        :class:`IntegrityError` if the record is unreadable (the version still counts as deleted)."""
        validate_task_name(task)
        validate_version(version)
        key = self._tombstone_key(task, version)
        try:
            raw = self.backend.read_bytes(key)
        except NotFoundError:
            return None
        tomb = Tombstone.from_bytes(raw, where=f"tombstone {key} in {self.uri}")
        if tomb.task != task or tomb.version != version:
            raise IntegrityError(f"tombstone {key} in {self.uri} names task {tomb.task!r} version {tomb.version!r}")
        return tomb

    def _tombstoned(self, task: str, version: str) -> bool:
        """Whether the version has a tombstone (its presence counts, readable or not)."""
        try:
            self.backend.read_bytes(self._tombstone_key(task, version))
            return True
        except NotFoundError:
            return False

    def _tombstone_or_none(self, task: str, version: str):
        """The version's tombstone record, or None when it cannot be read (its presence still counts)."""
        try:
            return self.tombstone(task, version)
        except StoreUnavailable:
            raise
        except StoreError:
            return None

    def _deleted_error(self, task: str, version: str, what: str = "") -> DeletedError:
        tomb = self._tombstone_or_none(task, version)
        when = f" at {tomb.deleted_at}" if tomb else ""
        why = f" (reason: {tomb.reason})" if tomb and tomb.reason else ""
        return DeletedError(
            f"{self._where(task, version)} was deleted{when}{what} in {self.uri}{why}; "
            "a deleted version cannot be fetched, promoted or published again"
        )

    def _check_not_deleted(self, task: str, version: str, what: str = "") -> None:
        if self._tombstoned(task, version):
            raise self._deleted_error(task, version, what)

    def resolve(self, task: str, version: str = "latest") -> str:
        """Turn ``latest``/``promoted`` into a concrete version name (validated)."""
        validate_task_name(task)
        validate_version(version, allow_alias=True)
        if version == "latest":
            versions = self.list_versions(task)
            if not versions:
                raise NotFoundError(f"task {task!r} has no complete versions in {self.uri}")
            return versions[-1]
        if version == "promoted":
            promoted = self.promoted(task)
            if promoted is None:
                raise NotFoundError(
                    f"task {task!r} has no promoted version in {self.uri} (run `svd-ray tasks promote {task} VERSION`)"
                )
            return promoted
        return version

    # --------------------------------------------------------------------------------------- manifest

    def _read_manifest(self, task: str, version: str) -> Manifest:
        where = f"manifest of {self._where(task, version)} in {self.uri}"
        try:
            raw = self.backend.read_bytes(self._manifest_key(task, version))
        except NotFoundError:
            raise NotFoundError(
                f"{self._where(task, version)} does not exist in {self.uri} (or is incomplete)"
            ) from None
        m = Manifest.from_json(raw, where=where)
        if m.task != task or m.version != version:
            raise IntegrityError(f"{where} is for task {m.task!r} version {m.version!r} (moved or copied?)")
        return m

    def _read_live_manifest(self, task: str, version: str) -> Manifest:
        """The validated manifest of a version that is not deleted (:class:`DeletedError` if it is)."""
        try:
            m = self._read_manifest(task, version)
        except StoreUnavailable:
            raise
        except StoreError:  # missing or unreadable: a tombstone explains both
            self._check_not_deleted(task, version)
            raise
        self._check_not_deleted(task, version)
        return m

    def manifest(self, task: str, version: str = "latest") -> Manifest:
        """The validated manifest of a live version (aliases allowed); :class:`DeletedError` if deleted."""
        return self._read_live_manifest(task, self.resolve(task, version))

    # ---------------------------------------------------------------------------------------- publish

    def _scan(self, src: Path) -> list[tuple[str, Path]]:
        files: list[tuple[str, Path]] = []
        for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                rel = p.relative_to(src).as_posix()
                if rel == MARKER_NAME:  # our own fetch marker: never part of a bundle
                    continue
                validate_relpath(rel)
                if not p.is_file():
                    raise StoreError(f"cannot publish {p}: not a regular file")
                files.append((rel, p))
        return files

    def _ensure_ready(self) -> None:
        if not self._ready:
            self.backend.ensure_ready(create=self.create_bucket)
            self._ready = True

    def publish(self, task: str, src_dir: str | Path, meta: dict[str, Any], version: str | None = None) -> Manifest:
        """Upload every file under ``src_dir`` (recursively), then create the manifest (create-once).

        ``version`` defaults to a sortable UTC timestamp with a random suffix (see ``names.new_version``).
        Raises :class:`ConflictError` if the version already exists (also when another publisher wins a
        race for it) or was ever deleted (a tombstone keeps the name: never reused, even for identical bytes),
        :class:`InvalidNameError` for bad names and :class:`StoreError` for bad input.

        :class:`StoreUnavailable` if the backend fails: "nothing was published" when it failed before the
        manifest create (the partial upload is invisible; a retry or ``gc()`` removes it), "the outcome is
        unknown" when the manifest create itself could not be confirmed (then the data is kept, and
        ``manifest()`` tells once storage is back). A publish that overlaps a delete of the same version
        returns normally if its manifest was the one deleted (it took effect first), and raises
        :class:`ConflictError` if the tombstone came first (its manifest never became visible).
        """
        validate_task_name(task)
        version = validate_version(version) if version is not None else new_version()
        if not isinstance(meta, dict):
            raise StoreError(f"meta must be a dict, got {type(meta).__name__}")
        try:
            canonical_json(meta)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"meta is not JSON-serializable (no NaN/inf, str keys): {exc}") from None
        base = meta.get("base_model")
        if base is not None and not isinstance(base, dict):
            raise StoreError("meta['base_model'] must be a dict with id/weights_sha256/tokenizer_sha256")
        src = Path(src_dir)
        if not src.is_dir():
            raise StoreError(f"cannot publish {src}: not a directory")
        files = self._scan(src)
        if not files:
            raise StoreError(f"cannot publish {src}: it contains no files")

        where = self._where(task, version)
        try:
            self._ensure_ready()
            self._refuse_taken(task, version)
        except StoreUnavailable as exc:
            raise StoreUnavailable(
                f"publish of {where} to {self.uri} failed, nothing was published (nothing was written): {exc}",
                retry_after_s=exc.retry_after_s,
            ) from exc

        mkey = self._manifest_key(task, version)
        stats = {rel: p.stat() for rel, p in files}
        entries = self._map(lambda f: FileEntry(f[0], stats[f[0]].st_size, sha256_file(f[1])), files)
        data_prefix = f"data-{secrets.token_hex(8)}"
        vprefix = self._version_prefix(task, version)
        uploaded_prefix = f"{vprefix}{data_prefix}/"
        # "upload": nothing references our data yet; "commit": the manifest create was sent (our data may be
        # referenced, never delete it); "confirm": the manifest is ours, checking for a concurrent delete.
        phase = "upload"
        try:
            self._map(lambda f: self.backend.upload_file(uploaded_prefix + f[0], f[1]), files)
            for rel, p in files:
                st = p.stat()
                if (st.st_size, st.st_mtime_ns) != (stats[rel].st_size, stats[rel].st_mtime_ns):
                    raise StoreError(f"cannot publish {src}: {rel} changed while it was being published")
            m = Manifest(
                task=task, version=version, created_at=utc_now_iso(), files=entries, meta=meta, data_prefix=data_prefix
            )
            data = m.to_bytes()
            phase = "commit"
            try:
                created = self.backend.create_once(mkey, data)
            except StoreError:
                if not self._holds(mkey, data):  # if this check fails too, the outcome is unknown
                    phase = "upload"
                    raise
                created = True
            if not created and not self._holds(mkey, data):
                phase = "upload"
                if self._tombstoned(task, version):
                    raise ConflictError(
                        f"{where} was deleted while this publish was in flight in {self.uri}; "
                        "version names are never reused: publish under a new version"
                    )
                raise ConflictError(
                    f"{where} was published concurrently by another writer in {self.uri}; "
                    "this publish lost and was discarded"
                )
            phase = "confirm"
            tomb = self._existing_tombstone(task, version)
            if tomb is not None and tomb.manifest_sha256 == m.manifest_sha256:
                # Our manifest was live and a concurrent delete removed exactly it: the publish took effect
                # and was deleted afterwards (as if the delete had come a second later). Report the publish.
                log.warning("%s was deleted right after it was published to %s", where, self.uri)
            elif tomb is not None:
                # The tombstone was there before our manifest (it names another manifest, or none): our
                # manifest was never visible and never will be. Remove it and our data, and say so.
                phase = "discarded"
                self._purge_version_quietly(task, version)
                raise ConflictError(
                    f"{where} was deleted while this publish was in flight in {self.uri}; it stays deleted, "
                    "this publish was discarded (version names are never reused: publish under a new version)"
                )
        except StoreUnavailable as exc:
            if phase == "upload":
                # Do not spend another round of timeouts on cleanup: the partial upload is invisible and a
                # successful retry or gc() removes it.
                raise StoreUnavailable(
                    f"publish of {where} to {self.uri} failed, nothing was published: {exc}; the partial upload "
                    "is invisible and is removed by a successful retry or by `svd-ray tasks gc`",
                    retry_after_s=exc.retry_after_s,
                ) from exc
            raise StoreUnavailable(
                f"publish of {where} to {self.uri}: storage failed after the manifest was sent, the outcome is "
                f"unknown ({exc}); once storage is back, `svd-ray tasks show {task} {version}` tells whether it "
                "was published",
                retry_after_s=exc.retry_after_s,
            ) from exc
        except BaseException:
            if phase == "upload":
                self._delete_prefix_quietly(uploaded_prefix)
            raise
        self._remove_stale_uploads(task, version, data_prefix)
        log.info("published %s %s (%d files, %d bytes) to %s", task, version, len(entries), m.total_size, self.uri)
        return m

    def _refuse_taken(self, task: str, version: str) -> None:
        """:class:`ConflictError` if the version exists or was deleted (names are never reused)."""
        where = self._where(task, version)
        if self._tombstoned(task, version):
            tomb = self._tombstone_or_none(task, version)
            when = f" at {tomb.deleted_at}" if tomb else ""
            raise ConflictError(
                f"{where} was deleted{when} in {self.uri}; version names are never reused, even for identical "
                "bytes: publish under a new version"
            )
        if self.backend.list_objects(self._manifest_key(task, version)):
            raise ConflictError(f"{where} already exists in {self.uri}; versions are immutable")

    def _remove_stale_uploads(self, task: str, version: str, keep: str) -> None:
        """After a successful publish, remove other ``data-*`` prefixes of the same version: uploads of earlier
        attempts that failed (e.g. cut off by an outage) or of writers that lost. Safe because the manifest is
        create-once and names ``keep``: no other upload of this version can ever be referenced."""
        vprefix = self._version_prefix(task, version)
        try:
            stale = [
                o.key
                for o in self.backend.list_objects(vprefix)
                if o.key.count("/") >= 4 and o.key.split("/")[3].startswith("data-") and o.key.split("/")[3] != keep
            ]
            if stale:
                self.backend.delete(stale)
        except Exception as exc:  # best effort: gc() removes leftovers later
            log.warning("could not remove stale uploads of %s %s in %s: %s", task, version, self.uri, exc)

    def _create_once_idempotent(self, key: str, data: bytes) -> bool:
        """``create_once`` that also reports success when the object already holds exactly ``data``: a
        retried request whose first attempt was committed but whose response was lost gets 412, yet the
        object is ours (our bytes are unique: they contain a random data prefix / a µs timestamp)."""
        try:
            if self.backend.create_once(key, data):
                return True
        except StoreError:
            if self._holds(key, data):
                return True
            raise
        return self._holds(key, data)

    def _holds(self, key: str, data: bytes) -> bool:
        try:
            return self.backend.read_bytes(key) == data
        except NotFoundError:
            return False

    def _purge_version(self, task: str, version: str) -> list[str]:
        """Remove everything stored under a tombstoned version except the tombstone: the manifest first, then
        the rest. Returns the removed keys. Only ever called once the tombstone exists."""
        mkey = self._manifest_key(task, version)
        tkey = self._tombstone_key(task, version)
        self.backend.delete([mkey])
        self._manifest_cache.pop((task, version), None)
        rest = [o.key for o in self.backend.list_objects(self._version_prefix(task, version)) if o.key != tkey]
        self.backend.delete(rest)
        return rest

    def _purge_version_quietly(self, task: str, version: str) -> None:
        try:
            self._purge_version(task, version)
        except Exception as exc:  # best effort: gc() removes leftovers later
            log.warning("could not remove the files of deleted %s %s in %s: %s", task, version, self.uri, exc)

    def _delete_prefix_quietly(self, prefix: str) -> None:
        try:
            self.backend.delete([o.key for o in self.backend.list_objects(prefix)])
        except Exception as exc:  # best effort: gc() removes leftovers later
            log.warning("could not clean up %s in %s: %s", prefix, self.uri, exc)

    # ------------------------------------------------------------------------------------------ fetch

    def fetch(
        self,
        task: str,
        version: str = "latest",
        dest_dir: str | Path | None = None,
        expect: dict[str, Any] | None = None,
        *,
        full_verify: bool = False,
    ) -> tuple[Path, Manifest]:
        """Download a verified copy of a version; return ``(directory, manifest)``.

        ``version``: a name, ``latest`` (newest complete) or ``promoted`` (the promoted pointer; no
        fallback: :class:`NotFoundError` if nothing was promoted). ``dest_dir`` defaults to
        ``<cache_dir>/<task>/<version>`` for remote stores; a ``file://`` store's own (verified, immutable)
        version folder is returned without a copy. ``expect`` (``base_model_id``, ``weights_sha256``,
        ``tokenizer_sha256`` or dotted meta paths; ``None`` values skipped) is checked against the manifest
        before anything is downloaded: :class:`MismatchError`. Any size/sha256 difference or missing file
        raises :class:`IntegrityError` and nothing is installed at ``dest_dir``. A deleted version raises
        :class:`DeletedError` (also when the delete happens while the files are being downloaded), and an
        unreachable backend :class:`StoreUnavailable`.
        """
        version = self.resolve(task, version)
        m = self._read_live_manifest(task, version)
        if expect:
            problems = m.mismatches(expect)
            if problems:
                raise MismatchError(
                    f"{self._where(task, version)} does not match the served base model: " + "; ".join(problems)
                )
        try:
            return self._fetch_files(m, dest_dir, full_verify)
        except IntegrityError:
            # Missing or changed files under a manifest we had read: a concurrent delete (tombstone first,
            # then the files) explains it cleanly; otherwise the bundle really is damaged.
            self._check_not_deleted(task, version, " while it was being fetched")
            raise

    def _fetch_files(self, m: Manifest, dest_dir: str | Path | None, full_verify: bool) -> tuple[Path, Manifest]:
        task, version = m.task, m.version
        user_dest = dest_dir is not None
        if not user_dest and isinstance(self.backend, LocalBackend):
            return self._verified_in_place(m), m  # a local store's files are already on this disk
        dest = Path(dest_dir).expanduser() if dest_dir is not None else self.cache_dir / task / version
        dest = dest.absolute()
        try:
            if self._reusable(dest, m, full_verify):
                return dest, m
            if user_dest and dest.is_dir() and any(dest.iterdir()) and not (dest / MARKER_NAME).exists():
                raise StoreError(f"refusing to overwrite {dest}: it is not empty and not a bundle fetched by svd-ray")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.parent / f".{dest.name}.partial-{secrets.token_hex(6)}"
            tmp.mkdir()
            try:
                self._download_verified(m, tmp)
                self._install(tmp, dest, m, full_verify)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:
            raise StoreError(f"cannot install {self._where(task, version)} into {dest}: {exc}") from exc
        return dest, m

    def _verified_in_place(self, m: Manifest) -> Path:
        """The version's data folder inside a ``file://`` store, after checking every file's size and sha256
        (versions are immutable, so no copy is needed; a bundle is a few MB, hashing it is cheap)."""
        where = self._where(m.task, m.version)
        folder = self.backend._path(f"{self._version_prefix(m.task, m.version)}{m.data_prefix}")
        for f in m.files:
            p = folder.joinpath(*f.path.split("/"))
            missing = IntegrityError(f"{where}: file {f.path!r} is missing from the store (partial or deleted bundle)")
            try:
                if not p.is_file():
                    raise missing
                size = p.stat().st_size
                if size != f.size:
                    raise IntegrityError(
                        f"{where}: file {f.path!r} has {size} bytes, manifest says {f.size} (truncated or corrupt)"
                    )
                digest = sha256_file(p)
            except (FileNotFoundError, NotADirectoryError):  # removed while we looked (a concurrent delete)
                raise missing from None
            except OSError as exc:
                raise self.backend._os_error("read", f"{m.task}/{m.version}/{f.path}", exc) from exc  # type: ignore[attr-defined]
            if digest != f.sha256:
                raise IntegrityError(f"{where}: file {f.path!r} fails its sha256 check (corrupt)")
        return folder

    def _download_verified(self, m: Manifest, tmp: Path) -> None:
        prefix = f"{self._version_prefix(m.task, m.version)}{m.data_prefix}/"
        where = self._where(m.task, m.version)

        def one(f: FileEntry) -> None:
            target = tmp.joinpath(*f.path.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.backend.download_file(prefix + f.path, target)
            except NotFoundError:
                raise IntegrityError(
                    f"{where}: file {f.path!r} is missing from the store (partial or deleted bundle)"
                ) from None
            size = target.stat().st_size
            if size != f.size:
                raise IntegrityError(
                    f"{where}: file {f.path!r} has {size} bytes, manifest says {f.size} (truncated or corrupt)"
                )
            if sha256_file(target) != f.sha256:
                raise IntegrityError(f"{where}: file {f.path!r} fails its sha256 check (corrupt)")

        self._map(one, m.files)
        marker = {
            "uri": self.uri,
            "task": m.task,
            "version": m.version,
            "manifest_sha256": m.manifest_sha256,
            "verified_at": utc_now_iso(),
            "files": {f.path: [f.size, tmp.joinpath(*f.path.split("/")).stat().st_mtime_ns] for f in m.files},
        }
        (tmp / MARKER_NAME).write_bytes(canonical_json(marker))

    def _reusable(self, dest: Path, m: Manifest, full_verify: bool) -> bool:
        try:
            marker = json.loads((dest / MARKER_NAME).read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(marker, dict) or marker.get("manifest_sha256") != m.manifest_sha256:
            return False
        recorded = marker.get("files") or {}
        for f in m.files:
            p = dest.joinpath(*f.path.split("/"))
            try:
                st = p.stat()
            except OSError:
                return False
            if st.st_size != f.size:
                return False
            if full_verify:
                if sha256_file(p) != f.sha256:
                    log.warning("cached %s/%s: %s is corrupt; downloading again", m.task, m.version, f.path)
                    return False
            elif recorded.get(f.path) != [f.size, st.st_mtime_ns]:
                return False
        return True

    def _install(self, tmp: Path, dest: Path, m: Manifest, full_verify: bool) -> None:
        """Rename the verified ``tmp`` to ``dest``; an existing ``dest`` is replaced unless a concurrent fetch
        already installed an (equally checked) copy of the same manifest."""
        try:
            os.rename(tmp, dest)  # fails if dest exists and is not an empty dir
            return
        except OSError:
            pass
        if self._reusable(dest, m, full_verify):  # a concurrent fetch installed the same version first
            return
        old = dest.parent / f".{dest.name}.old-{secrets.token_hex(6)}"
        os.rename(dest, old)
        try:
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(old, ignore_errors=True)

    # ----------------------------------------------------------------------------------------- verify

    def verify(self, task: str, version: str = "latest") -> list[str]:
        """Re-hash every stored file of a version; return human-readable problems ([] = intact).

        :class:`NotFoundError` if the version does not exist (:class:`DeletedError` if it was deleted); a
        corrupt manifest is reported as a problem; :class:`StoreUnavailable` if the backend cannot be reached.
        """
        version = self.resolve(task, version)
        try:
            m = self._read_live_manifest(task, version)
        except (NotFoundError, StoreUnavailable):
            raise
        except StoreError as exc:
            return [str(exc)]
        prefix = f"{self._version_prefix(task, version)}{m.data_prefix}/"
        stored = {o.key[len(prefix) :]: o for o in self.backend.list_objects(prefix)}

        def check(f: FileEntry) -> str | None:
            obj = stored.get(f.path)
            if obj is None:
                return f"{f.path}: missing"
            if obj.size != f.size:
                return f"{f.path}: size {obj.size}, manifest says {f.size}"
            try:
                with self.backend.open_read(prefix + f.path) as stream:
                    digest, n = _sha256_stream(stream)
            except NotFoundError:
                return f"{f.path}: missing"
            if n != f.size:
                return f"{f.path}: read {n} bytes, manifest says {f.size}"
            if digest != f.sha256:
                return f"{f.path}: sha256 mismatch (corrupt)"
            return None

        problems = [p for p in self._map(check, m.files) if p]
        listed = {f.path for f in m.files}
        problems += [f"{path}: unexpected file not in manifest" for path in sorted(stored) if path not in listed]
        if problems:
            self._check_not_deleted(task, version, " while it was being verified")
        return problems

    # -------------------------------------------------------------------------------------- promotion

    def _promotion_seqs(self, task: str) -> list[int]:
        prefix = self._promoted_prefix(task)
        seqs = []
        for obj in self.backend.list_objects(prefix):
            match = _SEQ_RE.fullmatch(obj.key[len(prefix) :])
            if match:
                seqs.append(int(match.group(1)))
        return sorted(seqs)

    def _read_record(self, task: str, seq: int) -> PromotionRecord:
        key = f"{self._promoted_prefix(task)}{seq:010d}.json"
        rec = PromotionRecord.from_bytes(self.backend.read_bytes(key), where=f"promotion record {key} in {self.uri}")
        if rec.task != task or rec.seq != seq:
            raise IntegrityError(f"promotion record {key} in {self.uri} names task {rec.task!r} seq {rec.seq}")
        return rec

    def promote(self, task: str, version: str, *, verify: bool = False, max_attempts: int = 100) -> PromotionRecord:
        """Make ``version`` the promoted version of ``task`` (appends a create-once pointer record).

        The version must be live with a valid manifest (``verify=True`` also re-hashes its files first);
        :class:`DeletedError` for a deleted one.
        Concurrent promoters never corrupt the pointer: each record is created once at ``seq``; a loser
        retries at ``seq + 1``; the current pointer is the highest ``seq``.
        """
        version = self.resolve(task, version)
        m = self._read_live_manifest(task, version)
        if verify:
            problems = self.verify(task, version)
            if problems:
                raise IntegrityError(f"refusing to promote {self._where(task, version)}: {problems[0]}")
        for _ in range(max_attempts):
            seqs = self._promotion_seqs(task)
            seq = (seqs[-1] + 1) if seqs else 1
            rec = PromotionRecord(task, version, seq, utc_now_iso(), m.manifest_sha256)
            if self._create_once_idempotent(f"{self._promoted_prefix(task)}{seq:010d}.json", rec.to_bytes()):
                if self._tombstoned(task, version):  # a delete (with force) overlapped this promotion
                    raise self._deleted_error(
                        task,
                        version,
                        f" while it was being promoted (promotion record {seq} points at it, so 'promoted' "
                        "resolves to a deleted version until another one is promoted)",
                    )
                return rec
            time.sleep(secrets.randbelow(20) / 1000)
        raise ConflictError(f"could not promote {self._where(task, version)}: too many concurrent promotions")

    def promoted(self, task: str) -> str | None:
        """The currently promoted version of ``task`` (highest-seq record), or ``None``."""
        validate_task_name(task)
        seqs = self._promotion_seqs(task)
        return self._read_record(task, seqs[-1]).version if seqs else None

    def promotion_history(self, task: str) -> list[PromotionRecord]:
        """All promotion records of ``task``, oldest first."""
        validate_task_name(task)
        return [self._read_record(task, s) for s in self._promotion_seqs(task)]

    # ----------------------------------------------------------------------------------------- delete

    def delete(self, task: str, version: str, *, force: bool = False, reason: str = "") -> Tombstone:
        """Delete one version for good and return its :class:`Tombstone`.

        Order: create the tombstone (create-once: the commit point; from then on the version is invisible
        and its name can never be published again), remove the manifest, then every other object under the
        version. If removing files fails after the tombstone exists (e.g. an outage), the delete still
        stands; ``gc()`` or a repeated ``delete`` removes the rest. Deleting an already deleted version
        finishes that cleanup and returns the existing tombstone (idempotent). Refuses (``StoreError``) to
        delete the currently promoted version unless ``force``. Aliases are not accepted: name the version.
        :class:`NotFoundError` if the version was never published.
        """
        validate_task_name(task)
        validate_version(version)
        if not isinstance(reason, str) or len(reason) > TOMBSTONE_REASON_MAX or not reason.isprintable():
            raise StoreError(f"delete reason must be one printable line of at most {TOMBSTONE_REASON_MAX} characters")
        existing = self._existing_tombstone(task, version)
        if existing is not None:
            self._purge_version_quietly(task, version)
            return existing
        if not force and self.promoted(task) == version:
            raise StoreError(
                f"{self._where(task, version)} is the promoted version; promote another one first or use force"
            )
        manifest_sha256: str | None = None
        created_at: str | None = None
        try:
            m = self._read_manifest(task, version)
            manifest_sha256, created_at = m.manifest_sha256, m.created_at
        except NotFoundError:
            existing = self._existing_tombstone(task, version)  # deleted concurrently by another deleter?
            if existing is not None:
                self._purge_version_quietly(task, version)
                return existing
            raise
        except StoreUnavailable:
            raise
        except StoreError:  # corrupt manifest: delete it all the same
            pass
        tomb = Tombstone(task, version, utc_now_iso(), reason, manifest_sha256, created_at)
        if not self._create_once_idempotent(self._tombstone_key(task, version), tomb.to_bytes()):
            tomb = self._existing_tombstone(task, version) or tomb  # a concurrent delete won: same outcome
        self._manifest_cache.pop((task, version), None)
        self._purge_version_quietly(task, version)
        log.info("deleted %s %s in %s (tombstone kept)", task, version, self.uri)
        return tomb

    def _existing_tombstone(self, task: str, version: str) -> Tombstone | None:
        """The tombstone if the version is deleted (a placeholder if its record is unreadable), else None."""
        try:
            return self.tombstone(task, version)
        except StoreUnavailable:
            raise
        except StoreError as exc:
            return Tombstone(task, version, "", f"(tombstone record unreadable: {exc})")

    def gc(self, task: str | None = None, *, min_age_s: float = 3600.0) -> list[str]:
        """Remove data no live manifest refers to; return the removed prefixes/keys.

        * uploads of failed or losing publishes (no manifest refers to them), once older than ``min_age_s``
          (younger ones may belong to a publish in flight);
        * everything under a deleted (tombstoned) version except the tombstone, whatever its age: nothing
          there can ever become visible again (this finishes a delete that was interrupted).

        Versions with an unreadable manifest are left alone.
        """
        tasks = (
            [validate_task_name(task)] if task else [t for t in self.backend.list_children("tasks/") if _valid_task(t)]
        )
        removed = []
        now = time.time()
        for t in tasks:
            groups: dict[str, list[ObjectInfo]] = {}
            manifests: dict[str, ObjectInfo] = {}
            tombstoned: set[str] = set()
            for obj in self.backend.list_objects(f"tasks/{t}/"):
                parts = obj.key.split("/")
                if len(parts) < 4 or parts[2] == _PROMOTED_DIR:
                    continue
                if len(parts) == 4 and parts[3] == MANIFEST_NAME:
                    manifests[parts[2]] = obj
                elif len(parts) == 4 and parts[3] == TOMBSTONE_NAME:
                    tombstoned.add(parts[2])
                elif parts[3].startswith("data-") and len(parts) >= 5:
                    groups.setdefault(f"{parts[2]}/{parts[3]}", []).append(obj)
            for version in sorted(tombstoned):
                if version in manifests:
                    self.backend.delete([manifests[version].key])
                    self._manifest_cache.pop((t, version), None)
                    removed.append(manifests[version].key)
            for group, objs in sorted(groups.items()):
                version, data_prefix = group.split("/")
                if version not in tombstoned:
                    if version in manifests:
                        try:
                            if self._read_manifest(t, version).data_prefix == data_prefix:
                                continue
                        except StoreUnavailable:
                            raise
                        except StoreError:
                            continue
                    if now - max(o.mtime for o in objs) < min_age_s:
                        continue
                self.backend.delete([o.key for o in objs])
                removed.append(f"tasks/{t}/{group}/")
        return removed


def _valid_task(name: str) -> bool:
    try:
        validate_task_name(name)
        return True
    except InvalidNameError:
        return False
