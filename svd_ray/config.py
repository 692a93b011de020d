"""Typed run configuration, loadable from YAML. One source of truth per setting.

A run = warm-start a PEFT adapter on a task, calibrate μ̄, publish the task bundle.
``svd-ray train CONFIG.yaml`` / ``jobs/warmstart.py`` / ``svd-ray demo`` all read this.
Unknown keys are errors (typos must not silently fall back to defaults).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from svd_ray.models.peft_methods import PeftSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PeftConfig(_Strict):
    method: Literal["lora", "ia3", "prompt_tuning", "p_tuning_v2"] = "lora"
    r: int = Field(8, gt=0)
    lora_alpha: int = Field(16, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    num_virtual_tokens: int = Field(20, gt=0)
    encoder_hidden_size: int = Field(128, gt=0)
    target_modules: list[str] | None = None

    def settings(self) -> PeftSettings:
        return PeftSettings(**self.model_dump())


class DataConfig(_Strict):
    """Which task and how it is split. ``task`` names a built-in task, a benchmark, or a JSONL file."""

    task: str = "builtin:addition"
    data_dir: str | None = None  # default: $SVD_RAY_DATA_DIR or ../shared/data next to the repo
    seed: int = 0
    train_size: int | None = Field(None, gt=0)  # cap on training examples (None = all of the split)
    calibration_size: int = Field(64, gt=0)
    eval_size: int | None = Field(None, gt=0)
    # jsonl:<path> tasks (and commonsense tasks without an offline train split): the item split
    split_fractions: dict[str, float] = Field(default_factory=lambda: {"train": 0.4, "calibration": 0.1, "eval": 0.5})
    jsonl_duplicates: Literal["error", "merge"] = "error"  # duplicate option texts in a JSONL item

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != {"train", "calibration", "eval"}:
            raise ValueError(f"data.split_fractions needs exactly the keys train, calibration, eval; got {sorted(v)}")
        if any(not 0 < x < 1 for x in v.values()) or abs(sum(v.values()) - 1.0) > 1e-9:
            raise ValueError(f"data.split_fractions must be in (0, 1) and sum to 1; got {v}")
        return v


class LrSearchConfig(_Strict):
    """Warm-start lr chosen on calibration loss by a Ray Tune grid (``svd_ray.training.lr_search``)."""

    lrs: list[float] = Field(default_factory=lambda: [5e-5, 3e-4, 1e-3, 3e-3], min_length=1)
    steps: int = Field(48, gt=0)  # warm-start steps per trial (capped by training.max_steps)
    cpus_per_trial: float = Field(1.0, gt=0)
    max_concurrent_trials: int | None = Field(None, gt=0)

    @field_validator("lrs")
    @classmethod
    def _positive_unique(cls, lrs: list[float]) -> list[float]:
        if any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
            raise ValueError("every lr must be a positive finite number")
        if len(set(lrs)) != len(lrs):
            raise ValueError("lrs must not repeat")
        return sorted(lrs)


class TrainingConfig(_Strict):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)  # overrides epochs when set
    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(1, gt=0)  # per worker
    max_length: int = Field(512, gt=8)
    loss_on: Literal["answer", "all"] = "answer"
    seed: int = 0
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(50, gt=0)  # steps
    # null: train at ``lr`` (the paper: 5e-5); set: choose lr per task on calibration loss (Ray Tune grid)
    lr_search: LrSearchConfig | None = None


class CalibrationConfig(_Strict):
    alpha: float = Field(0.1, ge=0.0, le=1.0)
    # validated (default): cross-validated on calibration data, falls back to the plain adapter when steering
    # does not help (docs/ARCHITECTURE.md); mean: the paper's plain mean of μ*, exactly
    estimator: Literal["mean", "median", "sequence", "trimmed_mean", "validated"] = "validated"
    trim: float = Field(0.1, ge=0.0, lt=0.5)
    batch_size: int = Field(4, gt=0)


class ClusterConfig(_Strict):
    """Ray Train + DeepSpeed settings."""

    num_workers: int = Field(1, gt=0)
    # Elastic training: Ray Train may start or restart the worker group with as few as this many workers
    # (e.g. after losing a node) and grow it back to num_workers when resources return. The optimizer steps
    # stay the same: num_workers micro-batches per step whatever the live count (svd_ray.training.elastic).
    min_workers: int | None = Field(None, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    zero_stage: Literal[0, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    max_failures: int = Field(2, ge=-1)

    @model_validator(mode="after")
    def _fp16_needs_gpu(self):
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("cluster.precision fp16 needs use_gpu: DeepSpeed fp16 is not supported on CPU")
        if self.min_workers is not None:
            if self.min_workers > self.num_workers:
                raise ValueError(f"cluster.min_workers ({self.min_workers}) must be <= num_workers ({self.num_workers})")
            if self.zero_stage == 0 and self.precision != "fp32":
                raise ValueError("cluster.min_workers needs zero_stage 2 or 3, or fp32: a ZeRO-0 16-bit run's "
                                 "optimizer state cannot move to another number of workers")
        return self


_RUN_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class RunConfig(_Strict):
    run_id: str = "demo"
    task_name: str | None = None  # name in the store; default = run_id
    model: str = "smollm2-135m"
    peft: PeftConfig = PeftConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    cluster: ClusterConfig = ClusterConfig()
    store: str = Field(default_factory=lambda: default_store_uri())

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str) -> str:
        if not _RUN_ID.match(v):
            raise ValueError("run_id must match [a-z0-9][a-z0-9._-]{0,62}")
        return v

    @property
    def task(self) -> str:
        return self.task_name or self.run_id

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> "RunConfig":
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
        for dotted, value in (overrides or {}).items():
            _set_dotted(data, dotted, value)
        return cls.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


def _set_dotted(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def default_store_uri() -> str:
    env = os.environ.get("SVD_RAY_STORE")
    if env:
        return env
    return (Path.home() / ".local" / "share" / "svd-ray" / "store").as_uri()



# ------------------------------------------------------------------------------------------ loading
# The one place a run config is read: YAML file (or a built-in default) + ``--set key.sub=value`` overrides.


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=1", ...]`` → ``{"a.b": 1}`` (values YAML-typed)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _nest(flat: dict) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        _set_dotted(out, dotted, value)
    return out


def load_run_config(path: str | None, overrides: dict, default_yaml: str | None = None) -> RunConfig:
    """``path`` (or ``default_yaml``; or overrides alone) with dotted ``overrides`` applied."""
    if path is None:
        if default_yaml is None:
            return RunConfig.model_validate(_nest(overrides))
        path = default_yaml
    return RunConfig.from_yaml(path, overrides)


def load_config(path: str, sets: list[str] | None = None) -> RunConfig:
    """Validate ``path`` + ``--set`` overrides into a ``RunConfig``; every user error is a one-line ValueError."""
    from pydantic import ValidationError

    if not Path(path).is_file():
        raise ValueError(f"config file not found: {path}")
    overrides = parse_overrides(sets or [])
    try:
        return load_run_config(path, overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
            msg = err.get("msg", "invalid")
            if err.get("type") == "extra_forbidden":
                msg = "unknown field"
            value = err.get("input")
            shown = "" if err.get("type") in ("extra_forbidden", "missing") or isinstance(value, dict) else f" (got {value!r})"
            problems.append(f"{field}: {msg}{shown}")
        raise ValueError(f"{path}: invalid config: " + "; ".join(problems)) from None
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise ValueError(f"{path}: not valid YAML: {first}") from None
    except (TypeError, AttributeError) as exc:  # e.g. --set a.b=1 where a is not a mapping
        raise ValueError(f"{path}: {exc}") from None
