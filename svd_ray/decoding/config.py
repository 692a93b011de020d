"""Typed decoding settings: how logits are steered and how tokens are chosen."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from svd_ray.steering import DEFAULT_ALPHA, STEERING_MODES, form_steered_logits

OUTSIDE_MASK_POLICIES = ("unmasked", "floor")


@dataclass
class SteeringConfig:
    """How next-token logits are steered.

    mode       svdecode  ẑ = z_φ + μ·δ(z_φ, z_θ) in the mask, −inf outside (two passes per token)
               static    ẑ = z_φ + μ·δ̄ with δ̄ the calibration-mean δ (one pass per token)
               off       ẑ = z_φ (plain adapter decoding; no mask)
    mu         steering strength μ̄ (0 with mode svdecode = the "mask only" ablation)
    alpha      plausibility threshold; 0 = the "no mask" ablation
    mean_delta δ̄ (vocab,) for mode static
    """

    mode: str = "svdecode"
    mu: float = 0.0
    alpha: float = DEFAULT_ALPHA
    mean_delta: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in STEERING_MODES:
            raise ValueError(f"steering mode must be one of {STEERING_MODES}, got {self.mode!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not torch.isfinite(torch.tensor(float(self.mu))):
            raise ValueError(f"mu must be finite, got {self.mu}")
        if self.mode == "static" and self.mean_delta is None:
            raise ValueError("static steering needs mean_delta (from the task's calibration)")

    @property
    def needs_base(self) -> bool:
        return self.mode == "svdecode"

    def steer(self, adapted_logits: torch.Tensor, base_logits: torch.Tensor | None) -> torch.Tensor:
        """ẑ for the configured mode (float32, −inf outside the mask): ``steering.form_steered_logits``."""
        return form_steered_logits(adapted_logits, base_logits, mode=self.mode, mu=self.mu, alpha=self.alpha,
                                   mean_delta=self.mean_delta)


@dataclass
class GenerationConfig:
    """Token selection on the steered distribution p̂ = softmax(ẑ / temperature)."""

    max_new_tokens: int = 32
    min_new_tokens: int = 0  # EOS is not chosen before this many tokens (stop strings still end early)
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    num_beams: int = 1
    length_penalty: float = 1.0
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be ≥ 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError("min_new_tokens must be in [0, max_new_tokens]")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.top_k < 0:
            raise ValueError("top_k must be ≥ 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.num_beams < 1:
            raise ValueError("num_beams must be ≥ 1")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam search with sampling is not supported; set do_sample=false or num_beams=1")
