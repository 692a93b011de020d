"""``BundleStore``: publish, list, fetch (verified), verify, promote and delete task bundles.

Layout under the store root (a directory or an S3 bucket/prefix)::

    tasks/<task>/<version>/manifest.json                 create-once, sealed; its existence = "complete"
    tasks/<task>/<version>/data-<upload-id>/<file ...>   the bundle's files, private to one publish attempt
    tasks/<task>/_promoted/<seq, 10 digits>.json         append-only promotion log (create-once records)

* **Publish** uploads every file into a fresh ``data-<upload-id>/`` prefix, then creates the manifest with a
  conditional create. The manifest names its data prefix, so a losing concurrent publisher can never
  overwrite the winner's files; the loser gets :class:`ConflictError` and removes its own upload.
* **Visibility**: a version exists iff its manifest exists. Files without a manifest (a crashed or losing
  publisher) are invisible to ``list_versions``/``fetch`` and are removed by :meth:`BundleStore.gc`.
* **Order**: versions sort by the manifest's ``created_at`` (set when the manifest is written), then name.
  ``latest`` is the last one. A version whose manifest is unreadable keeps its place (by the object's
  modification time) so that ``latest`` fails loudly rather than silently falling back to an older bundle.
* **Promotion**: the current pointer is the record with the highest sequence number; a writer that loses
  the race for ``seq`` retries with ``seq + 1``. No ``If-Match`` is needed and the pointer is never torn.
* **Fetch** verifies size and sha256 of every file while installing into a temp directory, then renames it
  into place with a marker (``.svd-ray-bundle.json``) recording the manifest hash and each file's size and
  mtime. A later fetch of the same version reuses the directory if the marker matches and every file still
  has its recorded size and mtime (cheap); ``full_verify=True`` re-hashes instead.
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
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from .backends import Backend, LocalBackend, ObjectInfo
from .errors import (
    ConflictError,
    IntegrityError,
    InvalidNameError,
    MismatchError,
    NotFoundError,
    StoreError,
)
from .manifest import MANIFEST_NAME, FileEntry, Manifest, PromotionRecord, canonical_json, utc_now_iso
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

    @staticmethod
    def _promoted_prefix(task: str) -> str:
        return f"tasks/{task}/{_PROMOTED_DIR}/"

    def _where(self, task: str, version: str) -> str:
        return f"task {task!r} version {version!r}"

    def _map(self, fn: Callable[[Any], _T], items: Iterable[Any]) -> list[_T]:
        items = list(items)
        if self.max_workers <= 1 or len(items) <= 1:
            return [fn(i) for i in items]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(items))) as pool:
            return list(pool.map(fn, items))

    # ---------------------------------------------------------------------------------------- listing

    def list_tasks(self) -> list[str]:
        """Tasks that have at least one complete version, sorted by name."""
        out = []
        for name in self.backend.list_children("tasks/"):
            try:
                validate_task_name(name)
            except InvalidNameError:
                continue
            if self._manifest_objects(name):
                out.append(name)
        return out

    def _manifest_objects(self, task: str) -> dict[str, ObjectInfo]:
        found: dict[str, ObjectInfo] = {}
        for obj in self.backend.list_objects(f"tasks/{task}/"):
            parts = obj.key.split("/")
            if len(parts) == 4 and parts[3] == MANIFEST_NAME:
                try:
                    validate_version(parts[2])
                except InvalidNameError:
                    continue
                found[parts[2]] = obj
        return found

    def _cached_manifest(self, task: str, version: str, info: ObjectInfo) -> Manifest | StoreError:
        hit = self._manifest_cache.get((task, version))
        if hit and hit[0] == info.stamp:
            return hit[1]
        try:
            value: Manifest | StoreError = self._read_manifest(task, version)
        except NotFoundError as exc:  # deleted since listing
            value = exc
        except StoreError as exc:
            value = exc
        self._manifest_cache[(task, version)] = (info.stamp, value)
        return value

    def _sorted_versions(self, task: str) -> list[tuple[str, Manifest | StoreError]]:
        objs = self._manifest_objects(task)
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
        """Complete versions of ``task`` (manifest present), oldest to newest; [] if the task is unknown."""
        validate_task_name(task)
        return [v for v, _ in self._sorted_versions(task)]

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

    def manifest(self, task: str, version: str = "latest") -> Manifest:
        """The validated manifest of a version (aliases allowed)."""
        return self._read_manifest(task, self.resolve(task, version))

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
        race for it), :class:`InvalidNameError` for bad names and :class:`StoreError` for bad input.
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

        self._ensure_ready()
        mkey = self._manifest_key(task, version)
        if self.backend.list_objects(mkey):
            raise ConflictError(f"{self._where(task, version)} already exists in {self.uri}; versions are immutable")

        stats = {rel: p.stat() for rel, p in files}
        entries = self._map(lambda f: FileEntry(f[0], stats[f[0]].st_size, sha256_file(f[1])), files)
        data_prefix = f"data-{secrets.token_hex(8)}"
        vprefix = self._version_prefix(task, version)
        uploaded_prefix = f"{vprefix}{data_prefix}/"
        maybe_published = False  # once the manifest create was sent, our data may be referenced
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
            maybe_published = True
            try:
                created = self.backend.create_once(mkey, data)
            except StoreError:
                if not self._holds(mkey, data):  # if this check fails too, the outcome is unknown
                    maybe_published = False
                    raise
                created = True
            if not created and not self._holds(mkey, data):
                maybe_published = False
                raise ConflictError(
                    f"{self._where(task, version)} was published concurrently by another writer in {self.uri}; "
                    "this publish lost and was discarded"
                )
        except BaseException:
            # Never delete data that a manifest might reference (outcome unknown); gc() removes it if not.
            if not maybe_published:
                self._delete_prefix_quietly(uploaded_prefix)
            raise
        log.info("published %s %s (%d files, %d bytes) to %s", task, version, len(entries), m.total_size, self.uri)
        return m

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
        raises :class:`IntegrityError` and nothing is installed at ``dest_dir``.
        """
        version = self.resolve(task, version)
        m = self._read_manifest(task, version)
        if expect:
            problems = m.mismatches(expect)
            if problems:
                raise MismatchError(
                    f"{self._where(task, version)} does not match the served base model: " + "; ".join(problems)
                )
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
            if not p.is_file():
                raise IntegrityError(f"{where}: file {f.path!r} is missing from the store (partial or deleted bundle)")
            if p.stat().st_size != f.size:
                raise IntegrityError(
                    f"{where}: file {f.path!r} has {p.stat().st_size} bytes, manifest says {f.size} (truncated or corrupt)"
                )
            if sha256_file(p) != f.sha256:
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

        :class:`NotFoundError` if the version does not exist; a corrupt manifest is reported as a problem.
        """
        version = self.resolve(task, version)
        try:
            m = self._read_manifest(task, version)
        except NotFoundError:
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

        The version must exist with a valid manifest (``verify=True`` also re-hashes its files first).
        Concurrent promoters never corrupt the pointer: each record is created once at ``seq``; a loser
        retries at ``seq + 1``; the current pointer is the highest ``seq``.
        """
        version = self.resolve(task, version)
        m = self._read_manifest(task, version)
        if verify:
            problems = self.verify(task, version)
            if problems:
                raise IntegrityError(f"refusing to promote {self._where(task, version)}: {problems[0]}")
        for _ in range(max_attempts):
            seqs = self._promotion_seqs(task)
            seq = (seqs[-1] + 1) if seqs else 1
            rec = PromotionRecord(task, version, seq, utc_now_iso(), m.manifest_sha256)
            if self._create_once_idempotent(f"{self._promoted_prefix(task)}{seq:010d}.json", rec.to_bytes()):
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

    def delete(self, task: str, version: str, *, force: bool = False) -> None:
        """Delete one version: the manifest first (the version disappears atomically), then its files.

        Refuses (``StoreError``) to delete the currently promoted version unless ``force``. Aliases are not
        accepted: name the version explicitly.
        """
        validate_task_name(task)
        validate_version(version)
        if not force and self.promoted(task) == version:
            raise StoreError(
                f"{self._where(task, version)} is the promoted version; promote another one first or use force"
            )
        data_prefix: str | None
        try:
            data_prefix = self._read_manifest(task, version).data_prefix
        except NotFoundError:
            raise
        except StoreError:  # corrupt manifest: remove everything under the version
            data_prefix = None
        self.backend.delete([self._manifest_key(task, version)])
        self._manifest_cache.pop((task, version), None)
        vprefix = self._version_prefix(task, version)
        prefix = f"{vprefix}{data_prefix}/" if data_prefix else vprefix
        self.backend.delete([o.key for o in self.backend.list_objects(prefix)])

    def gc(self, task: str | None = None, *, min_age_s: float = 3600.0) -> list[str]:
        """Remove data of failed/losing publishes (no manifest refers to it) older than ``min_age_s``.

        Returns the removed prefixes. Versions with an unreadable manifest are left alone.
        """
        tasks = (
            [validate_task_name(task)] if task else [t for t in self.backend.list_children("tasks/") if _valid_task(t)]
        )
        removed = []
        now = time.time()
        for t in tasks:
            groups: dict[str, list[ObjectInfo]] = {}
            manifests: dict[str, ObjectInfo] = {}
            for obj in self.backend.list_objects(f"tasks/{t}/"):
                parts = obj.key.split("/")
                if len(parts) < 4 or parts[2] == _PROMOTED_DIR:
                    continue
                if len(parts) == 4 and parts[3] == MANIFEST_NAME:
                    manifests[parts[2]] = obj
                elif parts[3].startswith("data-") and len(parts) >= 5:
                    groups.setdefault(f"{parts[2]}/{parts[3]}", []).append(obj)
            for group, objs in sorted(groups.items()):
                version, data_prefix = group.split("/")
                if version in manifests:
                    try:
                        if self._read_manifest(t, version).data_prefix == data_prefix:
                            continue
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
