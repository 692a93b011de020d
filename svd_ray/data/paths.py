"""Where the offline benchmark data lives.

Resolution order for ``data_dir``: the explicit argument, then the environment variable
``SVD_RAY_DATA_DIR``, then ``<repo root>/../shared/data`` (computed from this file's location,
so it works from any working directory). The data is read in place, never copied.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "SVD_RAY_DATA_DIR"
VALID_SOURCES = ("local", "hub")


class DataUnavailableError(RuntimeError):
    """A dataset (or split) the caller asked for is not available from the chosen source."""


def default_data_dir() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the data root; raise a clear error if it does not exist."""
    root = Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir()
    if not root.is_dir():
        raise DataUnavailableError(
            f"data directory {root} does not exist; pass data_dir=..., set {ENV_VAR}, "
            "or use source='hub' (needs network and the `datasets` package)"
        )
    return root


def check_source(source: str) -> str:
    if source not in VALID_SOURCES:
        raise ValueError(f"source must be one of {VALID_SOURCES}, got {source!r}")
    return source


def import_datasets():
    """Import Hugging Face ``datasets`` lazily (only the hub code path needs it)."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise DataUnavailableError(
            "source='hub' needs the `datasets` package (pip install datasets) and network access"
        ) from err
    return datasets
