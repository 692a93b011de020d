"""Behaviour of BundleStore on every backend: file://, moto (emulator) and the real Ceph RGW (`s3`)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from svd_ray.store import (
    MARKER_NAME,
    BundleStore,
    ConflictError,
    IntegrityError,
    Manifest,
    MismatchError,
    NotFoundError,
    StoreError,
    StoreUnavailable,
)

from svd_ray.store.backends import LocalBackend

from conftest import StoreFactory
from store_helpers import make_bundle, make_meta, read_tree


def version_keys(store: BundleStore, task: str, version: str) -> list[str]:
    return [o.key for o in store.backend.list_objects(f"tasks/{task}/{version}/")]


def flip_byte(store: BundleStore, key: str, pos: int | None = None) -> None:
    data = bytearray(store.backend.read_bytes(key))
    i = len(data) // 2 if pos is None else pos
    data[i] ^= 0xFF
    store.backend.put_bytes(key, bytes(data))


# --------------------------------------------------------------------------------------- round trip


def test_round_trip(store: BundleStore, bundle: Path, meta: dict[str, Any], tmp_path: Path) -> None:
    m = store.publish("arc_easy", bundle, meta)
    assert isinstance(m, Manifest)
    assert store.list_tasks() == ["arc_easy"]
    assert store.list_versions("arc_easy") == [m.version]
    assert {f.path for f in m.files} == set(read_tree(bundle))
    assert m.base_model_id == meta["base_model"]["id"] and m.meta == meta

    path, m2 = store.fetch("arc_easy")
    assert m2.manifest_sha256 == m.manifest_sha256
    assert read_tree(path) == read_tree(bundle)
    assert store.manifest("arc_easy", m.version).to_json() == m.to_json()
    assert store.verify("arc_easy", m.version) == []
    if isinstance(store.backend, LocalBackend):
        # A file:// store's version folder is used in place (verified), never copied into a cache.
        assert store.cache_dir not in path.parents and not (tmp_path / "cache").exists()
        assert store.fetch("arc_easy", m.version)[0] == path
        (path / "mu.safetensors").write_bytes(b"tampered")
        with pytest.raises(IntegrityError, match="mu.safetensors"):
            store.fetch("arc_easy", m.version)
        (path / "mu.safetensors").write_bytes(read_tree(bundle)["mu.safetensors"])
    else:
        assert path == tmp_path / "cache" / "arc_easy" / m.version
        assert (path / MARKER_NAME).exists()

        # A second fetch reuses the verified copy without downloading.
        def boom(*_: Any) -> None:
            raise AssertionError("should not download again")

        original = store.backend.download_file
        store.backend.download_file = boom  # type: ignore[method-assign]
        assert store.fetch("arc_easy", m.version)[0] == path
        store.backend.download_file = original  # type: ignore[method-assign]

        # A local copy modified after download is detected and replaced.
        (path / "mu.safetensors").write_bytes(b"tampered")
        path2, _ = store.fetch("arc_easy", m.version)
        assert read_tree(path2) == read_tree(bundle)

    # Explicit dest_dir; a foreign non-empty dest_dir is refused.
    dest, _ = store.fetch("arc_easy", "latest", dest_dir=tmp_path / "dest")
    assert read_tree(dest) == read_tree(bundle)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="refusing to overwrite"):
        store.fetch("arc_easy", dest_dir=foreign)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_explicit_version_is_immutable(store: BundleStore, bundle: Path, meta: dict[str, Any]) -> None:
    store.publish("t", bundle, meta, version="v1")
    with pytest.raises(ConflictError, match="already exists"):
        store.publish("t", bundle, meta, version="v1")
    assert store.list_versions("t") == ["v1"]
    assert store.verify("t", "v1") == []


def test_versions_sorted_by_publish_time(store: BundleStore, bundle: Path, meta: dict[str, Any]) -> None:
    for v in ("b", "a", "c"):
        store.publish("t", bundle, meta, version=v)
    assert store.list_versions("t") == ["b", "a", "c"]
    assert store.resolve("t", "latest") == "c"
    auto = store.publish("t", bundle, meta)
    assert store.list_versions("t")[-1] == auto.version


def test_default_versions_sortable(store: BundleStore, bundle: Path, meta: dict[str, Any]) -> None:
    versions = [store.publish("t", bundle, meta).version for _ in range(3)]
    assert versions == sorted(versions) == store.list_versions("t")


# --------------------------------------------------------------------------------------- concurrency


def _publish_after(store: BundleStore, src: Path, barrier: threading.Barrier, version: str) -> Any:
    barrier.wait()
    try:
        return store.publish("race", src, make_meta(), version=version)
    except ConflictError as exc:
        return exc


def test_concurrent_publishers_one_wins(stores: StoreFactory, tmp_path: Path) -> None:
    for round_ in range(3):
        version = f"race{round_}"
        srcs = [make_bundle(tmp_path / f"src{round_}-{i}", seed=f"w{i}") for i in range(2)]
        writers = [stores.open(cache=f"c{i}") for i in range(2)]  # separate clients
        barrier = threading.Barrier(2)

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(_publish_after, writers, srcs, [barrier] * 2, [version] * 2))
        wins = [i for i, r in enumerate(results) if isinstance(r, Manifest)]
        losses = [r for r in results if isinstance(r, ConflictError)]
        assert len(wins) == 1 and len(losses) == 1, results
        assert "concurrently" in str(losses[0]) or "already exists" in str(losses[0])
        reader = stores.open(cache="reader")
        path, _ = reader.fetch("race", version)
        assert read_tree(path) == read_tree(srcs[wins[0]])
        assert reader.verify("race", version) == []
        # The loser removed its upload: only the manifest and the winner's data remain.
        prefixes = {k.split("/")[3] for k in version_keys(reader, "race", version)}
        assert prefixes == {"manifest.json", results[wins[0]].data_prefix}


def test_concurrent_fetches_of_one_version(store: BundleStore, bundle: Path, meta: dict[str, Any]) -> None:
    m = store.publish("t", bundle, meta)
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: store.fetch("t", m.version)[0], range(4)))
    assert len(set(paths)) == 1
    assert read_tree(paths[0]) == read_tree(bundle)
    leftovers = [p for p in paths[0].parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_promote_race_leaves_valid_pointer(stores: StoreFactory, bundle: Path, meta: dict[str, Any]) -> None:
    store = stores.open()
    versions = [store.publish("t", bundle, meta, version=f"v{i}").version for i in range(4)]
    promoters = [stores.open() for _ in versions]
    barrier = threading.Barrier(len(versions))

    def promote(i: int) -> int:
        barrier.wait()
        return promoters[i].promote("t", versions[i]).seq

    with ThreadPoolExecutor(len(versions)) as pool:
        seqs = list(pool.map(promote, range(len(versions))))
    assert sorted(seqs) == [1, 2, 3, 4]
    history = store.promotion_history("t")
    assert [r.seq for r in history] == [1, 2, 3, 4]
    assert store.promoted("t") == history[-1].version == versions[seqs.index(4)]
    path, m = store.fetch("t", "promoted")
    assert m.version == store.promoted("t")


# ----------------------------------------------------------------------------------------- integrity


def test_flipped_byte_in_any_file_is_detected(stores: StoreFactory, bundle: Path, meta: dict[str, Any]) -> None:
    store = stores.open()
    m = store.publish("t", bundle, meta, version="v1")
    keys = [k for k in version_keys(store, "t", "v1")]
    assert len(keys) == len(m.files) + 1  # every data file + the manifest
    for n, key in enumerate(keys):
        original = store.backend.read_bytes(key)
        if not original:
            continue  # an empty file has no byte to flip (its size is still checked)
        flip_byte(store, key)
        fresh = stores.open(cache=f"cache-{n}")
        with pytest.raises(IntegrityError):
            fresh.fetch("t", "v1")
        assert not (fresh.cache_dir / "t" / "v1").exists()  # nothing half-installed
        assert fresh.verify("t", "v1"), key
        store.backend.put_bytes(key, original)
    assert stores.open(cache="final").fetch("t", "v1")[1].version == "v1"


def test_flipped_byte_detected_in_cached_copy_with_full_verify(
    store: BundleStore, bundle: Path, meta: dict[str, Any]
) -> None:
    store.publish("t", bundle, meta, version="v1")
    path, _ = store.fetch("t", "v1")
    target = path / "adapter_model.safetensors"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[10] ^= 0x01
    target.write_bytes(bytes(data))
    import os

    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # bit rot: same size and mtime
    if isinstance(store.backend, LocalBackend):  # the fetched folder *is* the store's copy: refused
        with pytest.raises(IntegrityError, match="sha256"):
            store.fetch("t", "v1", full_verify=True)
        return
    path2, _ = store.fetch("t", "v1", full_verify=True)
    assert read_tree(path2) == read_tree(bundle)


@pytest.mark.parametrize("damage", ["truncate", "missing", "extend"])
def test_truncated_or_missing_file(store: BundleStore, bundle: Path, meta: dict[str, Any], damage: str) -> None:
    m = store.publish("t", bundle, meta, version="v1")
    key = f"tasks/t/v1/{m.data_prefix}/adapter_model.safetensors"
    data = store.backend.read_bytes(key)
    if damage == "truncate":
        store.backend.put_bytes(key, data[:-7])
    elif damage == "extend":
        store.backend.put_bytes(key, data + b"\0")
    else:
        store.backend.delete([key])
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        store.fetch("t", "v1")
    problems = store.verify("t", "v1")
    assert len(problems) == 1 and "adapter_model.safetensors" in problems[0]


def test_corrupt_latest_manifest_is_not_skipped(store: BundleStore, bundle: Path, meta: dict[str, Any]) -> None:
    store.publish("t", bundle, meta, version="v1")
    store.publish("t", bundle, meta, version="v2")
    flip_byte(store, "tasks/t/v2/manifest.json", pos=40)
    assert store.list_versions("t") == ["v1", "v2"]
    with pytest.raises(IntegrityError, match="manifest"):
        store.fetch("t", "latest")
    assert store.fetch("t", "v1")[1].version == "v1"


def test_manifest_copied_to_other_version_is_rejected(store: BundleStore, bundle: Path, meta: dict[str, Any]) -> None:
    store.publish("t", bundle, meta, version="v1")
    store.backend.put_bytes("tasks/t/v9/manifest.json", store.backend.read_bytes("tasks/t/v1/manifest.json"))
    with pytest.raises(IntegrityError, match="moved or copied"):
        store.fetch("t", "v9")


def test_mismatched_base_model(store: BundleStore, bundle: Path, meta: dict[str, Any]) -> None:
    store.publish("t", bundle, meta, version="v1")
    good = {"base_model_id": meta["base_model"]["id"], "weights_sha256": "a" * 64, "tokenizer_sha256": "b" * 64}
    assert store.fetch("t", "v1", expect=good)[1].version == "v1"
    assert store.fetch("t", "v1", expect={"base_model_id": good["base_model_id"], "weights_sha256": None})
    for key, bad in (
        ("base_model_id", "google/gemma-3-270m"),
        ("weights_sha256", "e" * 64),
        ("tokenizer_sha256", "f" * 64),
    ):
        with pytest.raises(MismatchError, match=key):
            store.fetch("t", "v1", dest_dir=store.cache_dir / "mismatch", expect={**good, key: bad})
    assert not (store.cache_dir / "mismatch").exists()
    store.publish("t", bundle, {"alpha": 1.0}, version="bare")
    with pytest.raises(MismatchError, match="does not record"):
        store.fetch("t", "bare", expect=good)


# --------------------------------------------------------------------------------- partial / delete


def test_partial_upload_is_invisible(store: BundleStore, bundle: Path, meta: dict[str, Any]) -> None:
    # A publisher that crashed after uploading files but before the manifest.
    for p in bundle.rglob("*"):
        if p.is_file():
            store.backend.upload_file(f"tasks/ghost/v1/data-0123456789abcdef/{p.relative_to(bundle).as_posix()}", p)
    store.publish("t", bundle, meta, version="v1")
    assert store.list_tasks() == ["t"]
    assert store.list_versions("ghost") == []
    with pytest.raises(NotFoundError):
        store.fetch("ghost", "v1")
    with pytest.raises(NotFoundError):
        store.fetch("ghost")
    assert store.gc(min_age_s=3600) == []  # too young
    assert store.gc(min_age_s=0) == ["tasks/ghost/v1/data-0123456789abcdef/"]
    assert store.backend.list_objects("tasks/ghost/") == []
    assert store.verify("t", "v1") == []


def test_failed_publish_cleans_up(
    store: BundleStore, bundle: Path, meta: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_: Any) -> bool:
        raise StoreError("injected failure")

    monkeypatch.setattr(store.backend, "create_once", fail)
    with pytest.raises(StoreError, match="injected"):
        store.publish("t", bundle, meta, version="v1")
    monkeypatch.undo()
    assert store.list_versions("t") == []
    assert store.backend.list_objects("tasks/t/") == []


def test_delete_keeps_other_versions(store: BundleStore, bundle: Path, meta: dict[str, Any], tmp_path: Path) -> None:
    other = make_bundle(tmp_path / "other", seed="other")
    store.publish("t", bundle, meta, version="v1")
    store.publish("t", other, meta, version="v2")
    store.promote("t", "v2")
    with pytest.raises(StoreError, match="promoted"):
        store.delete("t", "v2")
    store.delete("t", "v1")
    assert store.list_versions("t") == ["v2"]
    assert version_keys(store, "t", "v1") == ["tasks/t/v1/tombstone.json"]  # only the tombstone is left
    with pytest.raises(NotFoundError):
        store.fetch("t", "v1")
    with pytest.raises(NotFoundError, match="does not exist"):
        store.delete("t", "v9")  # never published: nothing to delete, no tombstone written
    assert version_keys(store, "t", "v9") == []
    path, _ = store.fetch("t")
    assert read_tree(path) == read_tree(other)
    assert store.verify("t", "v2") == [] and store.promoted("t") == "v2"
    store.delete("t", "v2", force=True)
    assert store.list_tasks() == []
    with pytest.raises(NotFoundError):
        store.fetch("t", "promoted")


def test_promote_and_aliases(store: BundleStore, bundle: Path, meta: dict[str, Any]) -> None:
    with pytest.raises(NotFoundError):
        store.fetch("t")
    store.publish("t", bundle, meta, version="v1")
    assert store.promoted("t") is None
    with pytest.raises(NotFoundError, match="no promoted version"):
        store.fetch("t", "promoted")
    store.publish("t", bundle, meta, version="v2")
    with pytest.raises(NotFoundError):
        store.promote("t", "nope")
    store.promote("t", "v1", verify=True)
    assert store.promoted("t") == "v1"
    assert store.fetch("t", "promoted")[1].version == "v1"
    assert store.fetch("t", "latest")[1].version == "v2"
    flip_byte(store, f"tasks/t/v2/{store.manifest('t', 'v2').data_prefix}/mu.safetensors")
    with pytest.raises(IntegrityError, match="refusing to promote"):
        store.promote("t", "v2", verify=True)
    assert store.promoted("t") == "v1"


def test_publish_input_errors(store: BundleStore, tmp_path: Path, bundle: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no files"):
        store.publish("t", tmp_path / "empty", {})
    with pytest.raises(StoreError, match="not a directory"):
        store.publish("t", tmp_path / "missing", {})
    with pytest.raises(StoreError, match="JSON"):
        store.publish("t", bundle, {"alpha": float("nan")})
    with pytest.raises(StoreError, match="JSON"):
        store.publish("t", bundle, {"x": {1, 2}})
    with pytest.raises(StoreError, match="base_model"):
        store.publish("t", bundle, {"base_model": "smol"})
    with pytest.raises(StoreError, match="version"):
        store.publish("t", bundle, {}, version="latest")
    assert store.list_tasks() == []


def test_lost_response_on_manifest_create_is_not_a_conflict(
    store: BundleStore, bundle: Path, meta: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retried create whose first attempt committed (response lost) sees 412 but must count as success."""
    real = store.backend.create_once

    def commit_then_412(key: str, data: bytes) -> bool:
        assert real(key, data)
        return False  # what the client's retry would report

    monkeypatch.setattr(store.backend, "create_once", commit_then_412)
    m = store.publish("t", bundle, meta, version="v1")
    store.promote("t", "v1")
    monkeypatch.undo()
    assert store.verify("t", "v1") == [] and store.promoted("t") == "v1"
    assert store.fetch("t", "v1")[1].manifest_sha256 == m.manifest_sha256


@pytest.mark.parametrize("error", [StoreError, StoreUnavailable])
def test_unknown_outcome_keeps_uploaded_data(
    store: BundleStore, bundle: Path, meta: dict[str, Any], monkeypatch: pytest.MonkeyPatch, error: type
) -> None:
    """If the manifest create fails *and* its outcome cannot be checked, the data is kept for gc()."""
    sent = []
    real_read = store.backend.read_bytes

    def fail_create(*_: Any) -> Any:
        sent.append(True)
        raise error("injected network failure")

    def read_after_create(key: str) -> bytes:
        if sent:
            raise error("injected network failure")
        return real_read(key)

    monkeypatch.setattr(store.backend, "create_once", fail_create)
    monkeypatch.setattr(store.backend, "read_bytes", read_after_create)
    with pytest.raises(error, match="injected") as exc:
        store.publish("t", bundle, meta, version="v1")
    if error is StoreUnavailable:
        assert "outcome is unknown" in str(exc.value)
    monkeypatch.undo()
    assert store.list_versions("t") == []
    assert store.backend.list_objects("tasks/t/v1/")  # kept ...
    assert len(store.gc("t", min_age_s=0)) == 1  # ... until gc
    assert store.backend.list_objects("tasks/t/") == []
