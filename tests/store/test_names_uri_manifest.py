"""Pure unit tests: name validation, URI parsing, manifest sealing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from svd_ray.store import (
    IntegrityError,
    InvalidNameError,
    Manifest,
    StoreError,
    new_version,
    parse_store_uri,
    validate_relpath,
    validate_task_name,
    validate_version,
)
from svd_ray.store.manifest import FileEntry, PromotionRecord, Tombstone, canonical_json, seal

from store_helpers import make_meta

BAD_NAMES = [
    "",
    "../x",
    "..",
    ".",
    "a/b",
    "/abs",
    "a\\b",
    ".hidden",
    "_promoted",
    "-flag",
    "x" * 65,
    "a b",
    "tab\t",
    "new\nline",
    "nul\x00",
    "t\u00e2che",  # non-ASCII letter
    "\uff54\uff41\uff53\uff4b",  # fullwidth "task"
    "task\u200b",  # zero-width space
    "task\u202egpj",  # right-to-left override
    "ta\u0455k",  # Cyrillic dze homoglyph of "s"
    "task\u0301",  # combining accent
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_task_names_rejected(name: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_task_name(name)


@pytest.mark.parametrize("name", ["arc_easy", "truthfulqa-mc1", "A.b-c_9", "x" * 64, "0"])
def test_good_task_names(name: str) -> None:
    assert validate_task_name(name) == name


def test_non_string_task_name() -> None:
    with pytest.raises(InvalidNameError):
        validate_task_name(3)  # type: ignore[arg-type]


def test_versions() -> None:
    for reserved in ("latest", "promoted"):
        with pytest.raises(InvalidNameError, match="reserved"):
            validate_version(reserved)
        assert validate_version(reserved, allow_alias=True) == reserved
    with pytest.raises(InvalidNameError):
        validate_version("../v1")
    versions = [new_version() for _ in range(50)]
    assert all(validate_version(v) == v for v in versions)
    assert len(set(versions)) == 50
    assert sorted(versions)[0][:15] <= versions[-1][:15]


@pytest.mark.parametrize("path", ["", "/etc/passwd", "a/../b", "../a", "a//b", "a/./b", "a\\b", "a\nb", "x/"])
def test_bad_relpaths(path: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_relpath(path)


def test_uri_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_store_uri(f"file://{tmp_path}/s").path == f"{tmp_path}/s"
    assert parse_store_uri("file://~/store").path == f"{tmp_path}/store"
    assert str(parse_store_uri("file://~/store")) == f"file://{tmp_path}/store"
    assert parse_store_uri(str(tmp_path / "plain")).scheme == "file"
    u = parse_store_uri("s3://bucket/a/b/")
    assert (u.scheme, u.bucket, u.path, str(u)) == ("s3", "bucket", "a/b", "s3://bucket/a/b")
    assert str(parse_store_uri("s3://bucket")) == "s3://bucket"
    for bad in ("http://x/y", "gs://b/p", "file://host/x", "s3:///nobucket", "s3://b/../x", "", "file://"):
        with pytest.raises(StoreError):
            parse_store_uri(bad)


def _manifest() -> Manifest:
    return Manifest(
        task="arc",
        version="v1",
        created_at="2026-01-01T00:00:00.000000Z",
        files=[FileEntry("a.bin", 3, "0" * 64), FileEntry("d/b.json", 2, "f" * 64)],
        meta=make_meta(),
        data_prefix="data-0123456789abcdef",
    )


def test_manifest_round_trip() -> None:
    m = _manifest()
    text = m.to_json()
    m2 = Manifest.from_json(text)
    assert m2 == m and m2.manifest_sha256 == m.manifest_sha256 == json.loads(text)["manifest_sha256"]
    assert m2.base_model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert m2.get("peft.method") == "lora" and m2.total_size == 5
    assert m2.mismatches({"base_model_id": "other", "weights_sha256": None}) == [
        "base_model_id: bundle has 'HuggingFaceTB/SmolLM2-135M-Instruct', expected 'other'"
    ]
    assert m2.mismatches({"peft.method": "lora", "alpha": 1.5}) == []


def test_every_flipped_manifest_byte_is_detected() -> None:
    data = _manifest().to_bytes()
    for i in range(len(data)):
        for mask in (0x01, 0x20, 0xFF):
            bad = bytearray(data)
            bad[i] ^= mask
            with pytest.raises(IntegrityError):
                Manifest.from_json(bytes(bad))
    with pytest.raises(IntegrityError):
        Manifest.from_json(data[:-1])
    with pytest.raises(IntegrityError):
        Manifest.from_json(data[: len(data) // 2])


def test_unknown_schema_version_refused() -> None:
    obj = _manifest().to_dict()
    obj["schema_version"] = 2
    with pytest.raises(StoreError, match="schema_version 2") as err:
        Manifest.from_json(seal(obj, "manifest_sha256"))
    assert not isinstance(err.value, IntegrityError)


def test_structurally_invalid_manifests() -> None:
    base = _manifest().to_dict()
    variants = [
        {**base, "task": "../x"},
        {**base, "data_prefix": "../../etc"},
        {**base, "files": [{"path": "../x", "size": 1, "sha256": "0" * 64}]},
        {**base, "files": [{"path": "a", "size": -1, "sha256": "0" * 64}]},
        {**base, "files": [{"path": "a", "size": 1, "sha256": "xyz"}]},
        {**base, "files": [{"path": "a", "size": 1, "sha256": "0" * 64}] * 2},
        {k: v for k, v in base.items() if k != "files"},
    ]
    for obj in variants:
        with pytest.raises(IntegrityError):
            Manifest.from_json(seal(obj, "manifest_sha256"))


def test_promotion_record_sealed() -> None:
    rec = PromotionRecord("arc", "v1", 3, "2026-01-01T00:00:00.000000Z", "a" * 64)
    data = rec.to_bytes()
    assert PromotionRecord.from_bytes(data, where="r") == rec
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x01
    with pytest.raises(IntegrityError):
        PromotionRecord.from_bytes(bytes(bad), where="r")
    assert canonical_json({"b": 1, "a": [1.5]}) == b'{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'


def test_tombstone_sealed() -> None:
    tomb = Tombstone("arc", "v1", "2026-01-02T00:00:00.000000Z", "bad eval", "a" * 64, "2026-01-01T00:00:00.000000Z")
    data = tomb.to_bytes()
    assert Tombstone.from_bytes(data, where="t") == tomb
    assert Tombstone.from_bytes(Tombstone("arc", "v1", "x").to_bytes(), where="t").manifest_sha256 is None
    for i in range(len(data)):  # every flipped byte is detected
        bad = bytearray(data)
        bad[i] ^= 0x01
        with pytest.raises(StoreError):
            Tombstone.from_bytes(bytes(bad), where="t")
    body = json.loads(data)
    for field, value in (("version", "../x"), ("reason", 5), ("manifest_sha256", 1), ("kind", "manifest")):
        obj = {**body, field: value}
        with pytest.raises(StoreError):
            Tombstone.from_bytes(seal(obj, "tombstone_sha256"), where="t")
    with pytest.raises(IntegrityError):  # a promotion record is not a tombstone
        Tombstone.from_bytes(PromotionRecord("arc", "v1", 1, "x", "a" * 64).to_bytes(), where="t")
