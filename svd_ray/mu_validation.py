"""Validated μ̄: the steering strength chosen by cross-validated steered NLL on calibration data (pure torch).

The paper's μ̄ is the plain mean of per-token μ*_t = ⟨e−p, δ⊙m⟩ / ‖δ⊙m‖². A token with a tiny ‖δ‖ can
give μ* in the thousands and set the mean (measured: −8.2 from one token at −2108, lowering accuracy).
Instead, measure what steering does to the quantity it is meant to improve:

    NLL_f(μ) = Σ_{t ∈ fold f} −log softmax(z_φ,t + μ · δ_t ⊙ m_t)[y*_t]        for every μ on a fixed grid

(the ``unmasked`` scoring objective; μ = 0 is the plain adapter). Calibration items are assigned to
``FOLDS`` folds by a hash of their tokens, so every worker assigns the same item to the same fold. Each
``NLL_f(μ)`` is a sum over tokens, so workers all-reduce it exactly like the μ* statistics.

Candidates scored exactly: besides the grid, NLL_f(μ) is evaluated at each closed-form estimate (mean,
median, trimmed mean, sequence-level), which are only known once every worker's μ* statistics are merged.
So each token keeps a compact record — its gold logit and δ, the log-partition of the tokens outside δ's
support, and (z, δ) on the support (the plausibility mask, usually a handful of tokens) — and after the
statistics' all-reduce every worker sums NLL_f at the candidates over its own records, which all-reduces
again (``MuAccumulator.score_candidates_``). Records are capped (``RECORD_BUDGET`` entries per worker);
past the cap the candidates are not scored and the decision says so.

Choice (K-fold cross-validation over grid ∪ candidates, never scored on the data it was fitted on):
  for each fold f:  μ̂_{−f} = argmin_μ Σ_{g≠f} NLL_g(μ);   gain_f = NLL_f(0) − NLL_f(μ̂_{−f})   (nats)
  per-token gains r_f = gain_f / T_f;  mean r̄ and standard error s = std(r_f) / √K
  steer   iff r̄ > 0 and r̄ > 2 s   (the held-out improvement is larger than its noise):
          μ̄ = argmin_μ Σ_f NLL_f(μ)  (all folds)
  else    μ̄ = 0 and the task serves as the plain adapter (steering off) — or as "mask only" (μ = 0 inside the
          plausibility mask) if the masked decoding distribution has the lower calibration NLL — with the
          reason recorded.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch

from svd_ray.steering import DEFAULT_ALPHA, IGNORE_INDEX, masked_steering_vector, plausibility_mask

FLOOR_LOGPROB = math.log(1e-10)  # a gold token outside the mask under masked scoring (decoding/scoring.py)

FOLDS = 5
RECORD_BUDGET = 1 << 24  # support entries kept per worker for exact candidate scoring (2 × 4 bytes each)
# 0 and ±10^(k/4), k = −12..12: ±[1e-3, 1e3], four points per decade (51 values).
MU_GRID = tuple([0.0] + [s * 10 ** (k / 4) for k in range(-12, 13) for s in (1.0, -1.0)])


def fold_of(tokens: torch.Tensor) -> int:
    """The fold of a calibration item, from its (valid) token ids: the same on every worker and run."""
    data = tokens.detach().to(torch.int64).cpu().numpy().tobytes()
    return zlib.crc32(data) % FOLDS


SUPPORT_DENSE_MAX = 4096  # widest δ support handled by the support-only formula (else full-vocabulary softmax)


def grid_nll(z: torch.Tensor, delta: torch.Tensor, y: torch.Tensor, mus: torch.Tensor) -> torch.Tensor:
    """−log softmax(z + μ·δ)[y] for every token (rows of z, δ: (T, V)) and every μ in ``mus`` → (T, G).

    δ = δ⊙m is zero off its support S (the plausibility mask, usually a handful of tokens), so
        log Σ_v e^{z_v + μδ_v} = logsumexp(log Σ_{v∉S} e^{z_v}, z_S + μ δ_S)
    needs one full-vocabulary logsumexp per token and then only |S| terms per μ — instead of one
    full-vocabulary softmax per μ. Exact; falls back to the direct form when S is very wide (α ≈ 0)."""
    mus = mus.to(z.dtype)
    support = delta != 0
    width = int(support.sum(-1).max()) if z.shape[0] else 0
    z_y, d_y = z.gather(-1, y[:, None]), delta.gather(-1, y[:, None])  # (T, 1)
    if width > SUPPORT_DENSE_MAX:
        return torch.stack([-torch.log_softmax(z + mu * delta, dim=-1).gather(-1, y[:, None]).squeeze(-1)
                            for mu in mus.tolist()], dim=1)
    outside = torch.logsumexp(z.masked_fill(support, float("-inf")), dim=-1)  # (T,)
    idx = torch.argsort(support.to(torch.uint8), dim=-1, descending=True, stable=True)[:, :width]  # S first
    in_s = support.gather(-1, idx)
    z_s = z.gather(-1, idx).masked_fill(~in_s, float("-inf"))  # (T, W)
    d_s = delta.gather(-1, idx).masked_fill(~in_s, 0.0)
    terms = z_s[:, None, :] + mus[None, :, None] * d_s[:, None, :]  # (T, G, W)
    terms = torch.cat([outside[:, None, None].expand(-1, mus.numel(), 1), terms], dim=-1)
    return torch.logsumexp(terms, dim=-1) - (z_y + mus[None, :] * d_y)


def cross_validate(loss: torch.Tensor, counts: torch.Tensor, grid: list[float]) -> dict:
    """K-fold choice of μ from per-fold summed losses ``loss[f, g]`` (lower is better) at ``grid[g]``
    (which holds 0.0) and per-fold counts ``counts[f]`` (tokens, items), over the non-empty folds:

        μ̂_{−f} = grid[argmin_g Σ_{h≠f} loss[h, g]];   r_f = (loss[f, μ = 0] − loss[f, μ̂_{−f}]) / counts[f]
        gain = mean r_f,   se = std(r_f) / √K   (inf with fewer than 2 folds);   best = argmin_g Σ_f loss[f, g]
        steer iff K ≥ 2, gain > 0, gain > 2 se and grid[best] ≠ 0   (the held-out gain beats its noise)

    → {"gain", "se", "gains" (r_f), "picks" (μ̂_{−f}), "best" (index into grid), "steer"}."""
    zero = grid.index(0.0)
    used = [f for f in range(loss.shape[0]) if counts[f] > 0]
    best = int(torch.argmin(loss.sum(0)))
    gains, picks = [], []
    if len(used) >= 2:
        for f in used:
            others = [g for g in used if g != f]
            pick = int(torch.argmin(loss[others].sum(0)))
            picks.append(grid[pick])
            gains.append(float(loss[f, zero] - loss[f, pick]) / float(counts[f]))
    gain = sum(gains) / len(gains) if gains else 0.0
    se = (math.sqrt(sum((g - gain) ** 2 for g in gains) / (len(gains) - 1)) / math.sqrt(len(gains))
          if len(gains) >= 2 else math.inf)
    steer = len(gains) >= 2 and gain > 0 and gain > 2 * se and grid[best] != 0.0
    return {"gain": gain, "se": se, "gains": gains, "picks": picks, "best": best, "steer": steer}


@dataclass
class MuValidation:
    """Per-fold sums of the steered NLL on the μ grid, and per-fold token counts."""

    grid: torch.Tensor = field(default_factory=lambda: torch.tensor(MU_GRID, dtype=torch.float64))
    nll: torch.Tensor | None = None  # (FOLDS, G) float64
    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(FOLDS, dtype=torch.float64))
    # Σ NLL at μ = 0 under the decoding distribution (softmax over the mask, floor outside): "mask only"
    masked_nll0: torch.Tensor = field(default_factory=lambda: torch.zeros(FOLDS, dtype=torch.float64))
    # candidates (closed-form estimates) scored exactly after the merge: values (C,), per-fold NLL (FOLDS, C)
    cand_names: list[str] = field(default_factory=list)
    cand_values: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    cand_nll: torch.Tensor = field(default_factory=lambda: torch.zeros(FOLDS, 0, dtype=torch.float64))
    # this worker's per-token records (not part of the sums; dropped when saved): see the module docstring
    records: list = field(default_factory=list, repr=False)
    record_entries: int = 0
    records_complete: bool = True  # False once the budget is exceeded or records are lost (state_dict)
    records_reduced: bool = False  # True once the sums were all-reduced (records then cover one rank only)
    candidate_note: str | None = None

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
        self.nll.index_add_(0, fold, grid_nll(z, delta, y, self.grid.to(z.device)).cpu())
        self.tokens.index_add_(0, fold, torch.ones(fold.numel(), dtype=torch.float64))
        inside = plausibility_mask(adapted_logits, alpha)[valid].cpu()
        zc = z.cpu()
        masked = zc.gather(-1, y.cpu()[:, None]).squeeze(-1) - torch.logsumexp(zc.masked_fill(~inside, float("-inf")), -1)
        in_mask = inside.gather(-1, y.cpu()[:, None]).squeeze(-1)
        self.masked_nll0.index_add_(0, fold, -torch.where(in_mask, masked, torch.full_like(masked, FLOOR_LOGPROB)))
        self._keep_records(z.cpu(), delta.cpu(), y.cpu(), fold)

    def _keep_records(self, z: torch.Tensor, delta: torch.Tensor, y: torch.Tensor, fold: torch.Tensor) -> None:
        """Per token: (fold, z_y, δ_y, log Σ_{v∉S} e^{z_v}, z_S, δ_S) with S = support of δ⊙m."""
        if not self.records_complete:
            return
        support = delta != 0
        entries = int(support.sum())
        if self.record_entries + entries > RECORD_BUDGET:
            self.records, self.records_complete = [], False  # candidates fall back to the grid
            return
        self.record_entries += entries
        outside = torch.logsumexp(z.masked_fill(support, float("-inf")), dim=-1)
        z_y, d_y = z.gather(-1, y[:, None]).squeeze(-1), delta.gather(-1, y[:, None]).squeeze(-1)
        for t in range(z.shape[0]):
            s = support[t]
            self.records.append((int(fold[t]), float(z_y[t]), float(d_y[t]), float(outside[t]),
                                 z[t][s].clone(), delta[t][s].clone()))

    def candidate_sums(self, values: list[float]) -> torch.Tensor:
        """Σ over this worker's records of −log softmax(z + μ·δ⊙m)[y], per fold, at each μ in ``values``.

        Exact: log Σ_v e^{z_v + μδ_v} = logsumexp(log Σ_{v∉S} e^{z_v}, z_S + μ δ_S) since δ = 0 off S."""
        if not self.records_complete:
            raise ValueError("candidate scoring needs every token's record (budget exceeded or records dropped)")
        mus = torch.tensor(values, dtype=torch.float64)
        out = torch.zeros(FOLDS, mus.numel(), dtype=torch.float64)
        for fold, z_y, d_y, outside, z_s, d_s in self.records:
            parts = torch.cat([torch.full((mus.numel(), 1), outside, dtype=torch.float64),
                               z_s[None, :] + mus[:, None] * d_s[None, :]], dim=1)
            out[fold] += torch.logsumexp(parts, dim=1) - (z_y + mus * d_y)
        return out

    def set_candidates(self, names: list[str], values: list[float], nll: torch.Tensor) -> None:
        self.cand_names = list(names)
        self.cand_values = torch.tensor(values, dtype=torch.float64)
        self.cand_nll = nll.to(torch.float64).clone()

    # ---------------------------------------------------------------- merge
    def merge(self, other: "MuValidation") -> "MuValidation":
        if not torch.equal(self.grid, other.grid):
            raise ValueError("cannot merge validations on different μ grids")
        merged = MuValidation(self.grid.clone(), self.nll + other.nll, self.tokens + other.tokens,
                              self.masked_nll0 + other.masked_nll0)
        merged.records = self.records + other.records  # the union's records (a local merge of two shards)
        merged.record_entries = self.record_entries + other.record_entries
        merged.records_complete = self.records_complete and other.records_complete
        return merged

    def flat(self) -> torch.Tensor:
        return torch.cat([self.nll.flatten(), self.tokens, self.masked_nll0])

    def load_flat(self, flat: torch.Tensor) -> None:
        n = self.nll.numel()
        self.nll = flat[:n].reshape(self.nll.shape).clone()
        self.tokens = flat[n:n + FOLDS].clone()
        self.masked_nll0 = flat[n + FOLDS:n + 2 * FOLDS].clone()

    def state_dict(self) -> dict:
        return {"grid": self.grid, "nll": self.nll, "tokens": self.tokens, "masked_nll0": self.masked_nll0,
                "cand_names": list(self.cand_names),
                "cand_values": self.cand_values, "cand_nll": self.cand_nll}

    @classmethod
    def from_state_dict(cls, state: dict) -> "MuValidation":
        v = cls(state["grid"].clone(), state["nll"].clone(), state["tokens"].clone(), records_complete=False)
        if "masked_nll0" in state:
            v.masked_nll0 = state["masked_nll0"].clone()
        if "cand_values" in state:
            v.set_candidates(state["cand_names"], state["cand_values"].tolist(), state["cand_nll"])
        return v

    # ---------------------------------------------------------------- choice
    def choose(self) -> dict:
        """The cross-validated decision (see the module docstring), JSON-ready."""
        grid = self.grid.tolist() + self.cand_values.tolist()
        nll_all = torch.cat([self.nll, self.cand_nll], dim=1)
        total = float(self.tokens.sum())
        if total == 0:
            raise ValueError("no calibration tokens were accumulated")
        zero = grid.index(0.0)
        cv = cross_validate(nll_all, self.tokens, grid)
        best_all, gains, picks, mean_gain, se = cv["best"], cv["gains"], cv["picks"], cv["gain"], cv["se"]
        steer = cv["steer"]
        if steer:
            reason = (f"cross-validated steered NLL improves on the plain adapter by {mean_gain:.4g} nats/token "
                      f"(SE {se:.2g}, {len(gains)} folds)")
        elif len(gains) < 2:
            reason = "too few calibration items for cross-validation (fewer than 2 non-empty folds)"
        else:
            reason = (f"no μ beats μ = 0 beyond its noise on held-out folds: gain {mean_gain:.3g} nats/token, "
                      f"SE {se:.2g} (needs > 2 SE)")
        masked0 = float(self.masked_nll0.sum())
        # not steering: serve the plain adapter, or μ = 0 inside the mask if calibration prefers that
        fallback = None if steer else ("mask_only" if 0 < masked0 < float(nll_all[:, zero].sum()) else "off")
        if fallback == "mask_only":
            reason += "; serving μ = 0 inside the plausibility mask (lower calibration NLL than the plain adapter)"
        return {
            "mu": grid[best_all] if steer else 0.0,
            "steer": steer,
            "fallback": fallback,
            "nll_per_token_masked_at_0": masked0 / total if masked0 > 0 else None,
            "reason": reason,
            "cv_gain_per_token": mean_gain,
            "cv_gain_se": se if math.isfinite(se) else None,
            "fold_picks": picks,
            "fold_tokens": self.tokens.tolist(),
            "nll_per_token_at_0": float(nll_all[:, zero].sum()) / total,
            "nll_per_token_at_mu": float(nll_all[:, best_all].sum()) / total,
            "grid_best_mu": grid[best_all],
            # the held-out-free NLL of each closed-form estimate, scored exactly (empty if not scored)
            "candidates": {n: {"mu": float(v), "nll_per_token": float(self.cand_nll[:, i].sum()) / total}
                           for i, (n, v) in enumerate(zip(self.cand_names, self.cand_values.tolist()))},
            "candidate_note": self.candidate_note,
        }
