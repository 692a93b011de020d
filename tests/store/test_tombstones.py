"""Deleted versions leave a tombstone: the name is never reused, and deleted versions are invisible.

Runs on every backend (file://, moto, the real Ceph RGW with ``-m s3``): the behaviour must be identical.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from svd_ray.store import (
    BundleStore,
    ConflictError,
    DeletedError,
    IntegrityError,
    NotFoundError,
    StoreError,
    StoreUnavailable,
    Tombstone,
)

from conftest import StoreFactory
from store_helpers import make_bundle, read_tree


def keys(store: BundleStore, task: str, version: str) -> list[str]:
    return [o.key for o in store.backend.list_objects(f"tasks/{task}/{version}/")]


def flip(store: BundleStore, key: str, pos: int = 40) -> None:
    data = bytearray(store.backend.read_bytes(key))
    data[pos] ^= 0xFF
    store.backend.put_bytes(key, bytes(data))


def test_deleted_name_is_never_reused(store: BundleStore, bundle: Path, meta: dict[str, Any], tmp_path: Path) -> None:
    m = store.publish("t", bundle, meta, version="v1")
    tomb = store.delete("t", "v1", reason="failed eval")
    assert isinstance(tomb, Tombstone)
    assert (tomb.task, tomb.version, tomb.reason) == ("t", "v1", "failed eval")
    assert tomb.manifest_sha256 == m.manifest_sha256 and tomb.created_at == m.created_at
    assert store.tombstone("t", "v1") == tomb
    assert keys(store, "t", "v1") == ["tasks/t/v1/tombstone.json"]  # manifest and files are gone

    # Invisible everywhere ...
    assert store.list_versions("t") == [] and store.list_tasks() == []
    assert store.list_tasks(include_deleted=True) == ["t"]
    assert store.deleted_versions("t") == [tomb]
    for call in (
        lambda: store.fetch("t", "v1"),
        lambda: store.manifest("t", "v1"),
        lambda: store.verify("t", "v1"),
        lambda: store.promote("t", "v1"),
    ):
        with pytest.raises(DeletedError, match=r"was deleted at .*failed eval"):
            call()
    with pytest.raises(NotFoundError, match="no complete versions"):
        store.fetch("t")
    assert issubclass(DeletedError, NotFoundError)  # "missing" handlers (404) need no change

    # ... and the name can never be published again: not with other bytes, not with the same bytes.
    other = make_bundle(tmp_path / "other", seed="other")
    for src in (other, bundle):
        with pytest.raises(ConflictError, match="never reused"):
            store.publish("t", src, meta, version="v1")
    assert keys(store, "t", "v1") == ["tasks/t/v1/tombstone.json"]  # the refused publishes left nothing

    # Deleting again is idempotent and returns the original tombstone.
    assert store.delete("t", "v1", reason="again") == tomb


def test_latest_and_listing_skip_deleted_versions(store: BundleStore, bundle: Path, meta: dict[str, Any]) -> None:
    for v in ("v1", "v2", "v3"):
        store.publish("t", bundle, meta, version=v)
    store.promote("t", "v1")
    store.delete("t", "v3")
    assert store.list_versions("t") == ["v1", "v2"]
    assert store.resolve("t", "latest") == "v2"
    assert store.fetch("t", "latest")[1].version == "v2"
    assert [t.version for t in store.deleted_versions("t")] == ["v3"]
    store.delete("t", "v2")
    assert store.fetch("t")[1].version == "v1" == store.fetch("t", "promoted")[1].version
    assert [t.version for t in store.deleted_versions("t")] == ["v2", "v3"]  # in creation order
    store.publish("t", bundle, meta, version="v4")  # new names are fine
    assert store.list_versions("t") == ["v1", "v4"]


def test_delete_promoted_needs_force_and_pointer_then_fails_cleanly(
    store: BundleStore, bundle: Path, meta: dict[str, Any]
) -> None:
    store.publish("t", bundle, meta, version="v1")
    store.publish("t", bundle, meta, version="v2")
    store.promote("t", "v2")
    with pytest.raises(StoreError, match="promoted"):
        store.delete("t", "v2")
    assert store.tombstone("t", "v2") is None  # refused before anything was written
    store.delete("t", "v2", force=True)
    assert store.promoted("t") == "v2"  # the log is append-only; the pointer now names a deleted version
    with pytest.raises(DeletedError):
        store.fetch("t", "promoted")
    store.promote("t", "v1")
    assert store.fetch("t", "promoted")[1].version == "v1"


def test_interrupted_delete_is_still_a_delete(
    store: BundleStore, bundle: Path, meta: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tombstone is the commit point: if removing the files fails afterwards (an outage), the version is
    deleted all the same; gc() or a repeated delete removes the files."""
    m = store.publish("t", bundle, meta, version="v1")
    store.publish("t", bundle, meta, version="v2")

    def down(_: list[str]) -> None:
        raise StoreUnavailable("injected: storage went away")

    monkeypatch.setattr(store.backend, "delete", down)
    store.delete("t", "v1")
    monkeypatch.undo()
    assert len(keys(store, "t", "v1")) == len(m.files) + 2  # manifest, tombstone and every file still stored
    assert store.list_versions("t") == ["v2"]
    with pytest.raises(DeletedError):
        store.fetch("t", "v1")
    removed = store.gc("t", min_age_s=3600)  # whatever their age: nothing under a tombstone can come back
    assert sorted(removed) == sorted(["tasks/t/v1/manifest.json", f"tasks/t/v1/{m.data_prefix}/"])
    assert keys(store, "t", "v1") == ["tasks/t/v1/tombstone.json"]
    assert store.verify("t", "v2") == []

    monkeypatch.setattr(store.backend, "delete", down)
    store.delete("t", "v2")
    monkeypatch.undo()
    store.delete("t", "v2")  # repeating the delete finishes it
    assert keys(store, "t", "v2") == ["tasks/t/v2/tombstone.json"]


def test_tombstone_wins_over_a_manifest(store: BundleStore, bundle: Path, meta: dict[str, Any]) -> None:
    """Whatever order writers ran in, a manifest next to a tombstone is never visible."""
    store.publish("t", bundle, meta, version="v1")
    raw = store.backend.read_bytes("tasks/t/v1/manifest.json")
    store.delete("t", "v1")
    store.backend.put_bytes("tasks/t/v1/manifest.json", raw)  # a stray writer re-creates the manifest
    assert store.list_versions("t") == [] and store.list_tasks() == []
    with pytest.raises(DeletedError):
        store.fetch("t", "v1")
    with pytest.raises(ConflictError, match="never reused"):
        store.publish("t", bundle, meta, version="v1")
    assert "tasks/t/v1/manifest.json" in store.gc(min_age_s=0)


def test_unreadable_tombstone_still_marks_deleted(store: BundleStore, bundle: Path, meta: dict[str, Any]) -> None:
    store.publish("t", bundle, meta, version="v1")
    store.delete("t", "v1", reason="r")
    flip(store, "tasks/t/v1/tombstone.json")
    with pytest.raises(IntegrityError, match="tombstone"):
        store.tombstone("t", "v1")
    with pytest.raises(DeletedError):
        store.fetch("t", "v1")
    with pytest.raises(ConflictError):
        store.publish("t", bundle, meta, version="v1")
    (listed,) = store.deleted_versions("t")
    assert listed.version == "v1" and "unreadable" in listed.reason
    assert store.list_versions("t") == []


def test_delete_with_corrupt_manifest(store: BundleStore, bundle: Path, meta: dict[str, Any]) -> None:
    store.publish("t", bundle, meta, version="v1")
    flip(store, "tasks/t/v1/manifest.json")
    tomb = store.delete("t", "v1")
    assert tomb.manifest_sha256 is None and tomb.created_at is None
    assert keys(store, "t", "v1") == ["tasks/t/v1/tombstone.json"]


def test_delete_input_errors(store: BundleStore, bundle: Path, meta: dict[str, Any]) -> None:
    store.publish("t", bundle, meta, version="v1")
    for bad in ("two\nlines", "x" * 501):
        with pytest.raises(StoreError, match="reason"):
            store.delete("t", "v1", reason=bad)
    with pytest.raises(StoreError, match="reserved"):
        store.delete("t", "latest")
    with pytest.raises(NotFoundError, match="does not exist"):
        store.delete("t", "nope")
    assert store.list_versions("t") == ["v1"] and store.deleted_versions("t") == []


def test_fetch_racing_a_delete_reports_deleted_not_corrupt(
    store: BundleStore, bundle: Path, meta: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that read the manifest just before a delete and then finds the files gone gets DeletedError
    (a clean 404), not IntegrityError (an alarm about corrupt storage)."""
    store.publish("t", bundle, meta, version="v1")
    real = store._read_live_manifest

    def then_delete(task: str, version: str) -> Any:
        m = real(task, version)
        store.delete(task, version)  # lands between the manifest read and the downloads
        return m

    monkeypatch.setattr(store, "_read_live_manifest", then_delete)
    with pytest.raises(DeletedError, match="while it was being fetched"):
        store.fetch("t", "v1", dest_dir=store.cache_dir / "x")
    assert not (store.cache_dir / "x").exists()


def test_same_bytes_under_a_new_name_after_delete(
    store: BundleStore, bundle: Path, meta: dict[str, Any], tmp_path: Path
) -> None:
    """The documented way back: publish the identical bundle under a new version."""
    store.publish("t", bundle, meta, version="v1")
    store.delete("t", "v1")
    m = store.publish("t", bundle, meta, version="v1-restored")
    path, _ = store.fetch("t", m.version, dest_dir=tmp_path / "d")
    assert read_tree(path) == read_tree(bundle)


def test_concurrent_deletes_agree(stores: StoreFactory, bundle: Path, meta: dict[str, Any]) -> None:
    """Several clients deleting one version at once: one tombstone, every caller gets it, nothing left over."""
    stores.open().publish("t", bundle, meta, version="v1")
    deleters = [stores.open(cache=f"d{i}") for i in range(4)]
    barrier = threading.Barrier(len(deleters))

    def delete(i: int) -> Tombstone:
        barrier.wait()
        return deleters[i].delete("t", "v1", reason=f"deleter {i}")

    with ThreadPoolExecutor(len(deleters)) as pool:
        tombs = list(pool.map(delete, range(len(deleters))))
    assert len(set(tombs)) == 1 and tombs[0] == deleters[0].tombstone("t", "v1")
    assert keys(deleters[0], "t", "v1") == ["tasks/t/v1/tombstone.json"]


def test_promote_racing_a_forced_delete_reports_it(
    store: BundleStore, bundle: Path, meta: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete landing between promote's checks and its record: promote says so instead of succeeding."""
    store.publish("t", bundle, meta, version="v1")
    real = store._create_once_idempotent

    def delete_first(key: str, data: bytes) -> bool:
        if "/_promoted/" in key:
            store.delete("t", "v1", force=True)
        return real(key, data)

    monkeypatch.setattr(store, "_create_once_idempotent", delete_first)
    with pytest.raises(DeletedError, match="while it was being promoted"):
        store.promote("t", "v1")
    monkeypatch.undo()
    with pytest.raises(DeletedError):
        store.fetch("t", "promoted")


def test_publish_overlapping_a_delete_reports_truthfully(
    stores: StoreFactory, bundle: Path, meta: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The two outcomes of a publish whose manifest create meets a delete, made deterministic."""
    a, b = stores.open(cache="a"), stores.open(cache="b")
    other = make_bundle(tmp_path / "other", seed="other")
    real = a.backend.create_once

    # 1. Overtaken: between a's checks and a's manifest create, b publishes the name and deletes it. a's
    #    manifest lands next to the tombstone: it was never visible, a removes it and says so.
    def overtaken(key: str, data: bytes) -> bool:
        if key.endswith("/manifest.json"):
            b.publish("t", other, meta, version="v1")
            b.delete("t", "v1")
        return real(key, data)

    monkeypatch.setattr(a.backend, "create_once", overtaken)
    with pytest.raises(ConflictError, match="deleted while this publish was in flight"):
        a.publish("t", bundle, meta, version="v1")
    assert keys(a, "t", "v1") == ["tasks/t/v1/tombstone.json"] and a.list_versions("t") == []

    # 2. Deleted right after it became visible: the publish took effect first, so it reports success, and
    #    the tombstone names exactly its manifest.
    def deleted_right_after(key: str, data: bytes) -> bool:
        created = real(key, data)
        if key.endswith("/manifest.json"):
            b.delete("t", "v2")
        return created

    monkeypatch.setattr(a.backend, "create_once", deleted_right_after)
    m = a.publish("t", bundle, meta, version="v2")
    monkeypatch.undo()
    tomb = b.tombstone("t", "v2")
    assert tomb is not None and tomb.manifest_sha256 == m.manifest_sha256
    assert keys(a, "t", "v2") == ["tasks/t/v2/tombstone.json"]
