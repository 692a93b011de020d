"""Validated μ̄: the steering strength chosen by cross-validated steered NLL on calibration data (pure torch).

The paper's μ̄ is the plain mean of per-token μ*_t = ⟨e−p, δ⊙m⟩ / ‖δ⊙m‖². A token with a tiny ‖δ‖ can
give μ* in the thousands and set the mean (measured: −8.2 from one token at −2108, lowering accuracy).
Instead, measure what steering does to the quantity it is meant to improve:

    NLL_f(μ) = Σ_{t ∈ fold f} −log softmax(z_φ,t + μ · δ_t ⊙ m_t)[y*_t]        for every μ on a fixed grid

(the ``unmasked`` scoring objective; μ = 0 is the plain adapter). Calibration items are assigned to
``FOLDS`` folds by a hash of their tokens, so every worker assigns the same item to the same fold. Each
``NLL_f(μ)`` is a sum over tokens, so workers all-reduce it exactly like the μ* statistics.

Choice (K-fold cross-validation, never scored on the data it was fitted on):
  for each fold f:  μ̂_{−f} = argmin_μ Σ_{g≠f} NLL_g(μ);   gain_f = NLL_f(0) − NLL_f(μ̂_{−f})   (nats)
  per-token gains r_f = gain_f / T_f;  mean r̄ and standard error s = std(r_f) / √K
  steer   iff r̄ > 0 and r̄ > 2 s   (the held-out improvement is larger than its noise):
          μ̄ = argmin_μ Σ_f NLL_f(μ)  (all folds)
  else    μ̄ = 0 and the task serves as the plain adapter (steering off), with the reason recorded.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch

from svd_ray.steering import DEFAULT_ALPHA, IGNORE_INDEX, masked_steering_vector

FOLDS = 5
# 0 and ±10^(k/4), k = −12..12: ±[1e-3, 1e3], four points per decade (51 values).
MU_GRID = tuple([0.0] + [s * 10 ** (k / 4) for k in range(-12, 13) for s in (1.0, -1.0)])


def fold_of(tokens: torch.Tensor) -> int:
    """The fold of a calibration item, from its (valid) token ids: the same on every worker and run."""
    data = tokens.detach().to(torch.int64).cpu().numpy().tobytes()
    return zlib.crc32(data) % FOLDS


@dataclass
class MuValidation:
    """Per-fold sums of the steered NLL on the μ grid, and per-fold token counts."""

    grid: torch.Tensor = field(default_factory=lambda: torch.tensor(MU_GRID, dtype=torch.float64))
    nll: torch.Tensor | None = None  # (FOLDS, G) float64
    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(FOLDS, dtype=torch.float64))

    def __post_init__(self) -> None:
        if self.nll is None:
            self.nll = torch.zeros(FOLDS, self.grid.numel(), dtype=torch.float64)

    def add_logits(self, adapted_logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor,
                   folds: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> None:
        """Accumulate teacher-forced positions: logits (B, L, V), labels (B, L) (−100 ignored), folds (B,)."""
        valid = labels != IGNORE_INDEX
        if not bool(valid.any()):
            return
        z = adapted_logits[valid].double()
        delta = masked_steering_vector(adapted_logits, base_logits, alpha)[valid].double()
        y = labels[valid].long()
        fold = folds.to(labels.device)[:, None].expand_as(labels)[valid].cpu()
        for g, mu in enumerate(self.grid.tolist()):
            logp = torch.log_softmax(z + mu * delta, dim=-1).gather(-1, y[:, None]).squeeze(-1)
            self.nll[:, g].index_add_(0, fold, (-logp).cpu())
        self.tokens.index_add_(0, fold, torch.ones(fold.numel(), dtype=torch.float64))

    # ---------------------------------------------------------------- merge
    def merge(self, other: "MuValidation") -> "MuValidation":
        if not torch.equal(self.grid, other.grid):
            raise ValueError("cannot merge validations on different μ grids")
        return MuValidation(self.grid.clone(), self.nll + other.nll, self.tokens + other.tokens)

    def flat(self) -> torch.Tensor:
        return torch.cat([self.nll.flatten(), self.tokens])

    def load_flat(self, flat: torch.Tensor) -> None:
        n = self.nll.numel()
        self.nll = flat[:n].reshape(self.nll.shape).clone()
        self.tokens = flat[n:].clone()

    def state_dict(self) -> dict:
        return {"grid": self.grid, "nll": self.nll, "tokens": self.tokens}

    @classmethod
    def from_state_dict(cls, state: dict) -> "MuValidation":
        return cls(state["grid"].clone(), state["nll"].clone(), state["tokens"].clone())

    # ---------------------------------------------------------------- choice
    def choose(self) -> dict:
        """The cross-validated decision (see the module docstring), JSON-ready."""
        grid = self.grid.tolist()
        zero = grid.index(0.0)
        used = [f for f in range(FOLDS) if self.tokens[f] > 0]
        total = float(self.tokens.sum())
        if total == 0:
            raise ValueError("no calibration tokens were accumulated")
        best_all = int(torch.argmin(self.nll.sum(0)))
        gains, picks = [], []
        if len(used) >= 2:
            for f in used:
                others = [g for g in used if g != f]
                pick = int(torch.argmin(self.nll[others].sum(0)))
                picks.append(grid[pick])
                gains.append(float(self.nll[f, zero] - self.nll[f, pick]) / float(self.tokens[f]))
        mean_gain = sum(gains) / len(gains) if gains else 0.0
        se = (math.sqrt(sum((g - mean_gain) ** 2 for g in gains) / (len(gains) - 1)) / math.sqrt(len(gains))
              if len(gains) >= 2 else math.inf)
        steer = len(gains) >= 2 and mean_gain > 0 and mean_gain > 2 * se and grid[best_all] != 0.0
        if steer:
            reason = (f"cross-validated steered NLL improves on the plain adapter by {mean_gain:.4g} nats/token "
                      f"(SE {se:.2g}, {len(gains)} folds)")
        elif len(gains) < 2:
            reason = "too few calibration items for cross-validation (fewer than 2 non-empty folds)"
        else:
            reason = (f"no μ beats μ = 0 beyond its noise on held-out folds: gain {mean_gain:.3g} nats/token, "
                      f"SE {se:.2g} (needs > 2 SE)")
        return {
            "mu": grid[best_all] if steer else 0.0,
            "steer": steer,
            "reason": reason,
            "cv_gain_per_token": mean_gain,
            "cv_gain_se": se if math.isfinite(se) else None,
            "fold_picks": picks,
            "fold_tokens": self.tokens.tolist(),
            "nll_per_token_at_0": float(self.nll[:, zero].sum()) / total,
            "nll_per_token_at_mu": float(self.nll[:, best_all].sum()) / total,
            "grid_best_mu": grid[best_all],
        }
