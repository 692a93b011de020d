"""TaskModel: one task's adapter + steering data on a base model, ready to generate and score.

This is the facade the demo, the evaluation and the serving replicas use:

    tm = TaskModel.from_bundle(bundle_dir, model="smollm2-135m")
    tm.generate(["Q: 2 + 3 = ?\\nA:"], GenerationConfig(max_new_tokens=4))
    tm.score("Q: 2 + 3 = ?\\nA:", [" 5", " 6"])
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from svd_ray.bundle import SteeringData, read_steering
from svd_ray.decoding import (
    ChoiceScores,
    DualModel,
    GenerationConfig,
    GenerationResult,
    SteeringConfig,
    generate_text,
    score_choices,
)
from svd_ray.models import load_base_model, load_tokenizer, resolve_model
from svd_ray.models.peft_methods import load_peft_model


class TaskModel:
    def __init__(self, peft_model, tokenizer, steering: SteeringData):
        self.peft_model = peft_model
        self.tokenizer = tokenizer
        self.data = steering
        self.dual = DualModel(peft_model)

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, model: str = "smollm2-135m", base_model=None, tokenizer=None):
        """Load ``bundle_dir`` (verified by the store beforehand) on ``base_model`` or a fresh copy of ``model``."""
        ref = resolve_model(model)
        base = base_model if base_model is not None else load_base_model(ref)
        tok = tokenizer if tokenizer is not None else load_tokenizer(ref)
        peft_model = load_peft_model(base, str(Path(bundle_dir) / "adapter"))
        return cls(peft_model, tok, read_steering(bundle_dir))

    @property
    def method(self) -> str | None:
        return self.dual.method

    def steering(self, mode: str | None = None, mu: float | None = None, alpha: float | None = None) -> SteeringConfig:
        """The task's calibrated steering, with optional per-request overrides (``mode`` None: the task's
        default — ``off`` when validation found that steering does not help this task)."""
        return SteeringConfig(
            mode=self.data.default_mode if mode is None else mode,
            mu=self.data.mu if mu is None else mu,
            alpha=self.data.alpha if alpha is None else alpha,
            mean_delta=self.data.mean_delta,
        )

    def generate(
        self, prompts: list[str], gen: GenerationConfig, steering: SteeringConfig | None = None
    ) -> list[GenerationResult]:
        steering = steering or self.steering()
        if not gen.eos_token_ids and self.tokenizer.eos_token_id is not None:
            gen = replace(gen, eos_token_ids=(self.tokenizer.eos_token_id,))
        with torch.inference_mode():
            return generate_text(self.dual, self.tokenizer, prompts, steering, gen)

    def score(
        self, prompt: str, choices: list[str], steering: SteeringConfig | None = None, outside_mask: str = "unmasked"
    ) -> ChoiceScores:
        with torch.inference_mode():
            return score_choices(self.dual, self.tokenizer, prompt, choices, steering or self.steering(), outside_mask)
