"""The per-version manifest and the promotion record, both stored as *sealed* canonical JSON.

Sealing: the document is serialised canonically (sorted keys, 2-space indent, ASCII only, no NaN, trailing
newline) and carries the sha256 of its own canonical serialisation without the seal field. A reader
re-serialises what it parsed and requires (a) byte-for-byte equality with what it read and (b) a matching
seal, so *any* changed byte in a manifest (even inside a JSON string or whitespace) is detected as an
:class:`IntegrityError`, without any side file.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import IntegrityError, InvalidNameError, StoreError
from .names import validate_relpath, validate_task_name, validate_version

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_NAME",
    "FileEntry",
    "Manifest",
    "PromotionRecord",
    "Tombstone",
    "TOMBSTONE_NAME",
    "canonical_json",
    "seal",
    "unseal",
    "utc_now_iso",
    "EXPECT_KEYS",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOMBSTONE_NAME = "tombstone.json"
TOMBSTONE_REASON_MAX = 500
_SHA_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
_DATA_PREFIX_RE = re.compile(r"data-[0-9a-f]{8,64}", re.ASCII)

#: ``expect`` keys understood by ``BundleStore.fetch`` and where they live in ``meta``.
EXPECT_KEYS: dict[str, str] = {
    "base_model_id": "base_model.id",
    "weights_sha256": "base_model.weights_sha256",
    "tokenizer_sha256": "base_model.tokenizer_sha256",
}


def utc_now_iso() -> str:
    """Current UTC time as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (sorts lexicographically)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes; raises ``ValueError``/``TypeError`` for non-JSON data (incl. NaN)."""
    text = json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False, separators=(",", ": "))
    return (text + "\n").encode("ascii")


def seal(obj: dict[str, Any], seal_field: str) -> bytes:
    """Canonical bytes of ``obj`` plus ``seal_field`` = sha256 of the canonical bytes without it."""
    body = {k: v for k, v in obj.items() if k != seal_field}
    digest = hashlib.sha256(canonical_json(body)).hexdigest()
    return canonical_json({**body, seal_field: digest})


def unseal(data: bytes, seal_field: str, what: str) -> dict[str, Any]:
    """Parse sealed bytes, verifying canonical form and seal; :class:`IntegrityError` otherwise."""
    try:
        obj = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise IntegrityError(f"{what} is corrupt: not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(seal_field), str):
        raise IntegrityError(f"{what} is corrupt: missing {seal_field}")
    try:
        canonical = canonical_json(obj)
    except (ValueError, TypeError):
        raise IntegrityError(f"{what} is corrupt: not canonical JSON") from None
    if canonical != data:
        raise IntegrityError(f"{what} is corrupt: bytes differ from its canonical form (modified or damaged)")
    claimed = obj.pop(seal_field)
    if hashlib.sha256(canonical_json(obj)).hexdigest() != claimed:
        raise IntegrityError(f"{what} is corrupt: {seal_field} does not match its content")
    obj[seal_field] = claimed
    return obj


def _lookup(meta: dict[str, Any], dotted: str) -> Any:
    cur: Any = meta
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


@dataclass(frozen=True)
class FileEntry:
    """One bundle file: ``/``-separated path relative to the bundle root, size in bytes, sha256 hex."""

    path: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass
class Manifest:
    """Everything needed to trust and use one published task version.

    ``meta`` is the trainer's free-form JSON dict; the conventional keys are ``base_model`` (``id``,
    ``weights_sha256``, ``tokenizer_sha256``), ``peft`` (``method``, ``config``), ``mu`` (μ̄ and its
    statistics), ``alpha``, ``splits`` (with hashes), ``metrics`` and ``provenance``.
    """

    task: str
    version: str
    created_at: str
    files: list[FileEntry]
    meta: dict[str, Any] = field(default_factory=dict)
    data_prefix: str = ""
    schema_version: int = SCHEMA_VERSION
    #: sha256 seal of the serialised manifest; set by :meth:`to_json` / :meth:`from_json`.
    manifest_sha256: str = ""

    # -- convenience accessors

    def get(self, dotted: str, default: Any = None) -> Any:
        """``meta`` value at a dotted path (``"base_model.id"``), or ``default``."""
        value = _lookup(self.meta, dotted)
        return default if value is None else value

    @property
    def base_model_id(self) -> str | None:
        value = self.get("base_model.id")
        return value if isinstance(value, str) else None

    @property
    def weights_sha256(self) -> str | None:
        value = self.get("base_model.weights_sha256")
        return value if isinstance(value, str) else None

    @property
    def tokenizer_sha256(self) -> str | None:
        value = self.get("base_model.tokenizer_sha256")
        return value if isinstance(value, str) else None

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    # -- (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "task": self.task,
            "version": self.version,
            "created_at": self.created_at,
            "data_prefix": self.data_prefix,
            "files": [f.to_dict() for f in self.files],
            "meta": self.meta,
        }

    def to_bytes(self) -> bytes:
        """Sealed canonical JSON bytes (also sets :attr:`manifest_sha256`)."""
        data = seal(self.to_dict(), "manifest_sha256")
        self.manifest_sha256 = json.loads(data)["manifest_sha256"]
        return data

    def to_json(self) -> str:
        return self.to_bytes().decode("ascii")

    @classmethod
    def from_json(cls, data: str | bytes, *, where: str = "manifest") -> Manifest:
        """Parse and fully validate a manifest; refuses unknown schema versions."""
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        obj = unseal(raw, "manifest_sha256", where)
        schema = obj.get("schema_version")
        if schema != SCHEMA_VERSION:
            raise StoreError(
                f"{where} has schema_version {schema!r}; "
                f"this svd-ray understands only {SCHEMA_VERSION} (upgrade svd-ray)"
            )
        try:
            files = [FileEntry(str(f["path"]), f["size"], f["sha256"]) for f in obj["files"]]
            m = cls(
                task=obj["task"],
                version=obj["version"],
                created_at=obj["created_at"],
                files=files,
                meta=obj["meta"],
                data_prefix=obj["data_prefix"],
                schema_version=schema,
                manifest_sha256=obj["manifest_sha256"],
            )
        except (KeyError, TypeError) as exc:
            raise IntegrityError(f"{where} is invalid: missing or malformed field {exc}") from None
        m.validate(where)
        return m

    def validate(self, where: str = "manifest") -> None:
        """Structural checks; :class:`IntegrityError` describing the first problem."""
        try:
            validate_task_name(self.task)
            validate_version(self.version)
            seen: set[str] = set()
            for f in self.files:
                validate_relpath(f.path)
                if f.path in seen:
                    raise IntegrityError(f"{where} lists {f.path!r} twice")
                seen.add(f.path)
                if not isinstance(f.size, int) or isinstance(f.size, bool) or f.size < 0:
                    raise IntegrityError(f"{where}: bad size for {f.path!r}")
                if not isinstance(f.sha256, str) or not _SHA_RE.fullmatch(f.sha256):
                    raise IntegrityError(f"{where}: bad sha256 for {f.path!r}")
        except InvalidNameError as exc:
            raise IntegrityError(f"{where} is invalid: {exc}") from None
        if not isinstance(self.meta, dict):
            raise IntegrityError(f"{where}: meta must be an object")
        if not isinstance(self.created_at, str) or not self.created_at:
            raise IntegrityError(f"{where}: bad created_at")
        if not isinstance(self.data_prefix, str) or not _DATA_PREFIX_RE.fullmatch(self.data_prefix):
            raise IntegrityError(f"{where}: bad data_prefix {self.data_prefix!r}")

    def mismatches(self, expect: dict[str, Any]) -> list[str]:
        """Differences between ``expect`` and this bundle's meta (``None`` values are not checked).

        Keys are ``base_model_id``, ``weights_sha256``, ``tokenizer_sha256`` or any dotted ``meta`` path.
        """
        problems = []
        for key, want in expect.items():
            if want is None:
                continue
            got = _lookup(self.meta, EXPECT_KEYS.get(key, key))
            if got is None:
                problems.append(f"{key}: bundle does not record it (expected {want!r})")
            elif got != want:
                problems.append(f"{key}: bundle has {got!r}, expected {want!r}")
        return problems


@dataclass(frozen=True)
class PromotionRecord:
    """One append-only, create-once entry of ``tasks/<task>/_promoted/<seq>.json``."""

    task: str
    version: str
    seq: int
    promoted_at: str
    manifest_sha256: str

    def to_bytes(self) -> bytes:
        return seal(
            {
                "schema_version": SCHEMA_VERSION,
                "task": self.task,
                "version": self.version,
                "seq": self.seq,
                "promoted_at": self.promoted_at,
                "manifest_sha256": self.manifest_sha256,
            },
            "record_sha256",
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str) -> PromotionRecord:
        obj = unseal(data, "record_sha256", where)
        if obj.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{where} has unsupported schema_version {obj.get('schema_version')!r}")
        try:
            rec = cls(obj["task"], obj["version"], int(obj["seq"]), obj["promoted_at"], obj["manifest_sha256"])
            validate_task_name(rec.task)
            validate_version(rec.version)
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{where} is invalid: {exc}") from None
        return rec


@dataclass(frozen=True)
class Tombstone:
    """The create-once record ``tasks/<task>/<version>/tombstone.json`` left by a delete.

    Its *presence* is what matters: a version with a tombstone is deleted for good (it is never listed,
    fetched or promoted, and its name can never be published again), whatever else is stored under it. The
    fields say what was deleted and why: ``manifest_sha256``/``created_at`` of the deleted manifest (``None``
    when the manifest was unreadable), ``deleted_at`` (UTC) and a free-text ``reason``.
    """

    task: str
    version: str
    deleted_at: str
    reason: str = ""
    manifest_sha256: str | None = None
    created_at: str | None = None

    def to_bytes(self) -> bytes:
        return seal({"schema_version": SCHEMA_VERSION, "kind": "tombstone", **self.to_dict()}, "tombstone_sha256")

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "version": self.version,
            "deleted_at": self.deleted_at,
            "reason": self.reason,
            "manifest_sha256": self.manifest_sha256,
            "created_at": self.created_at,
        }

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str) -> Tombstone:
        obj = unseal(data, "tombstone_sha256", where)
        if obj.get("schema_version") != SCHEMA_VERSION or obj.get("kind") != "tombstone":
            raise StoreError(f"{where} has unsupported schema_version/kind")
        try:
            rec = cls(
                obj["task"],
                obj["version"],
                obj["deleted_at"],
                obj["reason"],
                obj["manifest_sha256"],
                obj["created_at"],
            )
            validate_task_name(rec.task)
            validate_version(rec.version)
            for name in ("deleted_at", "reason"):
                if not isinstance(getattr(rec, name), str):
                    raise TypeError(f"{name} must be a string")
            for name in ("manifest_sha256", "created_at"):
                if getattr(rec, name) is not None and not isinstance(getattr(rec, name), str):
                    raise TypeError(f"{name} must be a string or null")
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{where} is invalid: {exc}") from None
        return rec
