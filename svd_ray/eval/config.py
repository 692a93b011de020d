"""Typed evaluation config (YAML): which model × PEFT methods × task families, sizes, seed, outputs."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field

from svd_ray.config import CalibrationConfig, DataConfig, TrainingConfig, _Strict, default_store_uri

Method = Literal["lora", "ia3", "prompt_tuning", "p_tuning_v2"]


class FamilyConfig(_Strict):
    """One task family = one adapter per PEFT method (TruthfulQA; the commonsense union)."""

    task: str  # a data.task spec: truthfulqa | commonsense | commonsense:<t> | builtin:addition | jsonl:<path>
    train_size: int | None = Field(None, gt=0)
    calibration_size: int = Field(64, gt=0)
    eval_size: int | None = Field(None, gt=0)  # per benchmark (questions for TruthfulQA)
    gen_size: int = Field(0, ge=0)  # generation items scored (TruthfulQA generation); 0 = skip
    gen_max_new_tokens: int = Field(40, gt=0)
    split_fractions: dict[str, float] = Field(default_factory=lambda: DataConfig().split_fractions)  # jsonl tasks
    jsonl_duplicates: Literal["error", "merge"] = "error"


class ExtraRun(_Strict):
    """More cells on another base model (e.g. Gemma-3-270M × LoRA), for the listed families (default: all)."""

    model: str
    methods: list[Method] = ["lora"]
    families: list[str] | None = None  # FamilyConfig.task values


class EvalConfig(_Strict):
    name: str = Field("reproduction", pattern=r"^[a-z0-9][a-z0-9._-]{0,40}$")
    model: str = "smollm2-135m"
    methods: list[Method] = ["lora", "ia3", "prompt_tuning", "p_tuning_v2"]
    extra_runs: list[ExtraRun] = []
    families: list[FamilyConfig] = [FamilyConfig(task="truthfulqa")]
    seed: int = 0
    data_dir: str | None = None
    training: TrainingConfig = TrainingConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    store: str = Field(default_factory=default_store_uri)
    output_dir: str = "out/eval"
    cells_dir: str | None = None  # resumable per-cell rows (default: <output_dir>/cells); see svd_ray.eval.cells
    results_md: str | None = None  # e.g. docs/RESULTS.md
    notes_file: str | None = None  # markdown appended verbatim (the human analysis of the numbers)
    num_shards: int = Field(2, gt=0)  # Ray actors scoring eval items in parallel
    threads_per_shard: int = Field(1, gt=0)
    reuse_bundles: bool = True  # skip training when the store holds a bundle of the identical run config
    bootstrap_resamples: int = Field(2000, gt=99)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> "EvalConfig":
        from svd_ray.config import _set_dotted

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
        for dotted, value in (overrides or {}).items():
            _set_dotted(data, dotted, value)
        return cls.model_validate(data)
