"""Publish-vs-delete races: actors (run in threads or in processes) and the invariant checker.

One *round* races, on one fresh version name: publisher 0 (bundle A), publisher 1 (bundle B, different
bytes), one deleter and one reader that fetches the version in a loop. Start times are absolute, so the
same jobs work in threads and in spawned processes. After the round, :func:`check_round` inspects the
store and every actor's result and returns the violated invariants (an empty list = the round was safe):

* end state is exactly one of: *published* (listed, complete, verifies, bytes = the one successful
  publisher's) or *tombstoned* (not listed, ``DeletedError``, only the tombstone left under the version);
* a name is never reused: at most one publish of a version ever succeeds, and a successful publish is either
  the live version or exactly the manifest the tombstone says was deleted;
* a delete that succeeded left a tombstone; a delete that found nothing did not;
* a reader either gets a complete, verified bundle of the successful publisher, or a clean
  ``NotFoundError``/``DeletedError``; never a manifest whose files are missing or corrupt
  (``IntegrityError``) and never any other error.

*Mutants* deliberately break the protocol (used to show the race test can fail).
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

from svd_ray.store import (
    BundleStore,
    ConflictError,
    DeletedError,
    IntegrityError,
    NotFoundError,
    open_store,
)

from store_helpers import make_meta, read_tree

TASK = "race"

_STORES: dict[tuple[str, str, str], BundleStore] = {}


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for rel, data in read_tree(root).items():
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def _store(job: dict[str, Any]) -> BundleStore:
    """One store (one client) per role, reused across rounds in this thread pool / process."""
    key = (job["uri"], job["role"], job.get("mutant") or "")
    store = _STORES.get(key)
    if store is None:
        store = open_store(job["uri"], endpoint_url=job["endpoint"], cache_dir=job["cache"])
        if hasattr(store.backend, "client"):
            store.backend.client  # noqa: B018 - build the S3 client now, not inside the race
        if job.get("mutant"):
            MUTANTS[job["mutant"]](store)
        _STORES[key] = store
    return store


def act(job: dict[str, Any]) -> Any:
    """Run one actor of a round (thread or process). Never raises: returns what happened."""
    store = _store(job)
    delay = job["at"] - time.time()
    if delay > 0:
        time.sleep(delay)
    role, version = job["role"], job["version"]
    if role.startswith("publish"):
        try:
            m = store.publish(TASK, job["src"], make_meta(), version=version)
            return ("ok", m.manifest_sha256)
        except ConflictError as exc:
            return ("conflict", str(exc))
        except Exception as exc:  # noqa: BLE001 - reported as a violation
            return ("error", f"{type(exc).__name__}: {exc}")
    if role == "delete":
        try:
            tomb = store.delete(TASK, version)
            return ("ok", tomb.manifest_sha256)
        except NotFoundError as exc:
            return ("notfound", str(exc))
        except Exception as exc:  # noqa: BLE001
            return ("error", f"{type(exc).__name__}: {exc}")
    if role == "read":
        reads: list[tuple[str, str]] = []
        scratch = Path(job["scratch"])
        i = 0
        while time.time() < job["until"]:
            i += 1
            dest = scratch / f"r{i}" if (i % 2 or not job["in_place"]) else None
            try:
                path, _ = store.fetch(TASK, version, dest_dir=dest)
                # an in-place (file://) folder may lose its files to a delete right after fetch returns
                reads.append(("ok", tree_digest(path) if dest is not None else ""))
            except DeletedError:
                reads.append(("deleted", ""))
            except NotFoundError:
                reads.append(("notfound", ""))
            except Exception as exc:  # noqa: BLE001 - IntegrityError & co. are violations
                reads.append(("bad", f"{type(exc).__name__}: {exc}"))
            finally:
                if dest is not None:
                    shutil.rmtree(dest, ignore_errors=True)
            time.sleep(job["pause"])  # leave the GIL/CPU to the writers now and then
        return reads
    raise ValueError(role)


def round_jobs(
    *,
    uri: str,
    endpoint: str | None,
    tmp: Path,
    n: int,
    srcs: tuple[Path, Path],
    publish_s: float,
    rng: Any,
    lead_s: float,
    in_place: bool,
    mutants: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The four jobs of round ``n``: publisher 0 at ``t0``, the deleter at a random offset within two publish
    durations, publisher 1 within three (so every interleaving gets its turn, including a publish that starts
    after the delete), the reader throughout. Every fourth round the deleter fires one publish duration
    *before* the publishers: on a backend whose publishes run faster in the race than when ``publish_s`` was
    measured, a random offset alone can land after the commit in every round (seen once on RGW: 20 of 20
    rounds tombstoned), and the test would no longer explore the "delete finds nothing" outcome."""
    t0 = time.time() + lead_s + publish_s
    version = f"v{n}"
    span = 2.0 * publish_s  # the deleter fires before, during or after the first publish
    delete_at = t0 - publish_s if n % 4 == 3 else t0 + rng.uniform(0, span)
    common = {"uri": uri, "endpoint": endpoint, "version": version, "cache": str(tmp / "cache")}
    mutants = mutants or {}
    jobs = [
        {**common, "role": "publish0", "src": str(srcs[0]), "at": t0},
        # the second publisher also starts after the delete now and then (the "republish" race)
        {**common, "role": "publish1", "src": str(srcs[1]), "at": t0 + rng.uniform(0, 1.5 * span)},
        {**common, "role": "delete", "at": delete_at},
        {
            **common,
            "role": "read",
            "at": t0,
            "until": t0 + 1.5 * span + 1.5 * publish_s + 0.05 + (MUTANT_WINDOW_S if mutants else 0.0),
            "scratch": str(tmp / f"reads-{n}"),
            "in_place": in_place,
            "pause": min(publish_s / 20, 0.01),
        },
    ]
    for job in jobs:
        job["mutant"] = mutants.get(job["role"].rstrip("01"))
    return jobs


def check_round(store: BundleStore, version: str, digests: tuple[str, str], results: list[Any]) -> list[str]:
    """Violated invariants of one finished round (see the module docstring)."""
    pubs, dele, reads = results[:2], results[2], results[3]
    bad: list[str] = []
    for i, (status, detail) in enumerate(pubs):
        if status == "error":
            bad.append(f"error: publisher {i} failed unexpectedly: {detail}")
    if dele[0] == "error":
        bad.append(f"error: delete failed unexpectedly: {dele[1]}")
    wins = [i for i, r in enumerate(pubs) if r[0] == "ok"]
    if len(wins) > 1:
        bad.append("name reused: both publishes of the version succeeded")
    try:
        tomb = store.tombstone(TASK, version)
    except IntegrityError as exc:
        return [*bad, f"unreadable tombstone: {exc}"]
    listed = version in store.list_versions(TASK)
    raw = sorted(o.key for o in store.backend.list_objects(f"tasks/{TASK}/{version}/"))
    win_digests = {digests[i] for i in wins}
    if tomb is not None:
        if listed:
            bad.append("half-visible: a tombstoned version is listed")
        if dele[0] != "ok":
            bad.append(f"tombstone without a successful delete ({dele[0]})")
        for i in wins:
            if pubs[i][1] != tomb.manifest_sha256:
                bad.append("name reused: a publish succeeded that is neither live nor the deleted manifest")
        try:
            store.fetch(TASK, version, dest_dir=store.cache_dir / f"check-{version}")
            bad.append("half-visible: a tombstoned version can be fetched")
        except DeletedError:
            pass
        except Exception as exc:  # noqa: BLE001
            bad.append(f"fetch of a deleted version: {type(exc).__name__}: {exc}")
        if raw != [f"tasks/{TASK}/{version}/tombstone.json"]:
            bad.append(f"leftovers under a deleted version: {raw}")
    else:
        if dele[0] == "ok":
            bad.append("delete reported success but left no tombstone")
        if len(wins) != 1:
            bad.append(f"neither published nor tombstoned: publishes {pubs}, delete {dele}")
        elif not listed:
            bad.append("published version is not listed")
        else:
            try:
                path, m = store.fetch(TASK, version, dest_dir=store.cache_dir / f"check-{version}")
                if m.manifest_sha256 != pubs[wins[0]][1]:
                    bad.append("the live manifest is not the successful publisher's")
                if tree_digest(path) != digests[wins[0]]:
                    bad.append("the live bytes are not the successful publisher's")
                if store.verify(TASK, version):
                    bad.append(f"published version fails verify: {store.verify(TASK, version)}")
                keep = {f"tasks/{TASK}/{version}/manifest.json"} | {
                    f"tasks/{TASK}/{version}/{m.data_prefix}/{f.path}" for f in m.files
                }
                if set(raw) != keep:
                    bad.append(f"leftovers next to a published version: {sorted(set(raw) - keep)}")
            except Exception as exc:  # noqa: BLE001
                bad.append(f"published version cannot be fetched: {type(exc).__name__}: {exc}")
    for status, detail in reads:
        if status == "bad":
            bad.append(f"reader saw a broken bundle without a clean error: {detail}")
        elif status == "ok" and detail and detail not in win_digests:
            bad.append("reader got the bytes of a publish that did not succeed")
    return bad


# ------------------------------------------------------------------------------------------- mutants


def _old_delete(store: BundleStore) -> None:
    """The store before tombstones: remove the manifest, then the files; the name is free again."""

    def delete(task: str, version: str, *, force: bool = False, reason: str = "") -> Any:
        m = store._read_manifest(task, version)
        store.backend.delete([store._manifest_key(task, version)])
        prefix = f"{store._version_prefix(task, version)}{m.data_prefix}/"
        store.backend.delete([o.key for o in store.backend.list_objects(prefix)])
        return type("T", (), {"manifest_sha256": m.manifest_sha256})()

    store.delete = delete  # type: ignore[method-assign]


#: How long the ``files_first`` mutant leaves a manifest without its files. The reader polls that long
#: past its usual end in mutant rounds, so a window opened late in a round is still read: with 50 ms and
#: no extension, 80 rounds on a loaded 2-core CI machine once caught nothing.
MUTANT_WINDOW_S = 0.25


def _files_first(store: BundleStore) -> None:
    """Wrong order: the files go first, the tombstone later (readers see a manifest without its files)."""
    real_create = store._create_once_idempotent

    def create(key: str, data: bytes) -> bool:
        if key.endswith("/tombstone.json"):
            task, version = key.split("/")[1:3]
            m = store._read_manifest(task, version)
            prefix = f"{store._version_prefix(task, version)}{m.data_prefix}/"
            store.backend.delete([o.key for o in store.backend.list_objects(prefix)])
            time.sleep(MUTANT_WINDOW_S)  # a slow backend: the window in which readers can notice
        return real_create(key, data)

    store._create_once_idempotent = create  # type: ignore[method-assign]


def _publish_ignores_tombstone(store: BundleStore) -> None:
    """A publisher that never looks for a tombstone (before upload or after its manifest create)."""
    store._tombstoned = lambda task, version: False  # type: ignore[method-assign]
    store._existing_tombstone = lambda task, version: None  # type: ignore[method-assign]


MUTANTS = {
    "old_delete": _old_delete,
    "files_first": _files_first,
    "publish_ignores_tombstone": _publish_ignores_tombstone,
}


def warm_worker(_: int) -> int:
    """Start a process-pool worker before the timed rounds. It lives here, not in the test module: a spawned
    worker imports the module of every function it runs, and the test module imports ``conftest`` — in a
    whole-suite run that name can resolve to another folder's conftest."""
    import svd_ray.store  # noqa: F401 - import once per worker

    time.sleep(0.3)  # keep this worker busy so that every worker of the pool gets started
    return 0
