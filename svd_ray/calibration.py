"""Mergeable μ̄ calibration statistics (pure torch; torch.distributed optional).

Every statistic is a sum over calibration tokens, so data-parallel workers accumulate their
shard and all-reduce; merging the accumulators of two halves of the data gives the
whole-data accumulator (exactly for counts, up to float64 addition order for sums).

Estimators exposed (spec §4):
  mean            μ̄ = (1/T) Σ_t μ*_t                                  (the paper's choice)
  sequence        μ̄ = Σ_t ⟨e−p,δ⟩_t / Σ_t (‖δ_t‖² + ε)               (exact)
  median          from a fixed log-spaced histogram of μ*_t           (approximate, see below)
  trimmed mean    from the same histogram (drops `trim` of the mass on each side)
  validated       cross-validated steered NLL on a μ grid, falling back to μ̄ = 0 (the plain adapter)
                  when no μ beats 0 beyond its noise (``svd_ray.mu_validation``; beyond the paper)

Histogram: bins uniform in log10|μ| over [1e-8, 1e8] with ``BINS_PER_DECADE`` bins per decade
for each sign, plus one bin for |μ| < 1e-8. Values beyond 1e8 land in the outermost bin.
Each bin keeps its count and the sum of its values, so an order statistic is reported as
the mean of the values in the bin that holds it: within one bin width (≈1.2% relative) of the
exact value; quantiles interpolate linearly between order statistics like ``torch.quantile``. The bins are fixed, so merging histograms is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from svd_ray.mu_validation import MuValidation
from svd_ray.steering import DEFAULT_ALPHA, IGNORE_INDEX, masked_steering_vector, token_mu_terms

LOG10_MIN = -8.0
DECADES = 16
BINS_PER_DECADE = 200
_HALF = DECADES * BINS_PER_DECADE  # bins per sign
NUM_BINS = 2 * _HALF + 1
ESTIMATORS = ("mean", "median", "sequence", "trimmed_mean", "validated")
CANDIDATES = ("mean", "median", "sequence", "trimmed_mean")  # closed-form μ̄s the validation also scores


def histogram_bin(values: torch.Tensor) -> torch.Tensor:
    """Index of each value's bin; bins are ordered by value (most negative first)."""
    v = values.to(torch.float64)
    mag = v.abs()
    m = torch.floor((torch.log10(mag.clamp_min(1e-300)) - LOG10_MIN) * BINS_PER_DECADE)
    m = m.clamp(0, _HALF - 1).long()
    idx = torch.where(v > 0, _HALF + 1 + m, _HALF - 1 - m)
    return torch.where(mag < 10.0**LOG10_MIN, torch.full_like(idx, _HALF), idx)


@dataclass
class MuAccumulator:
    """Sums of μ* statistics (and optionally of δ) over calibration tokens."""

    vocab_size: int | None = None
    count: int = 0
    sum_mu: float = 0.0
    sum_mu_sq: float = 0.0
    sum_num: float = 0.0
    sum_den: float = 0.0
    min_mu: float = math.inf
    max_mu: float = -math.inf
    hist_count: torch.Tensor = field(default_factory=lambda: torch.zeros(NUM_BINS, dtype=torch.float64))
    hist_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(NUM_BINS, dtype=torch.float64))
    sum_delta: torch.Tensor | None = None
    validation: MuValidation | None = None  # cross-validated steered NLL on the μ grid (when folds are given)

    def __post_init__(self) -> None:
        if self.vocab_size is not None and self.sum_delta is None:
            self.sum_delta = torch.zeros(self.vocab_size, dtype=torch.float64)

    # ---------------------------------------------------------------- accumulate
    def add_mu(self, mu: torch.Tensor, num: torch.Tensor | None = None, den: torch.Tensor | None = None) -> None:
        """Add per-token μ* values (1-D, all valid) and optionally their num/den terms."""
        mu = mu.detach().to(torch.float64).flatten().cpu()
        if mu.numel() == 0:
            return
        if not torch.isfinite(mu).all():
            raise ValueError("μ* values must be finite")
        self.count += mu.numel()
        self.sum_mu += float(mu.sum())
        self.sum_mu_sq += float((mu * mu).sum())
        self.min_mu = min(self.min_mu, float(mu.min()))
        self.max_mu = max(self.max_mu, float(mu.max()))
        b = histogram_bin(mu)
        self.hist_count.index_add_(0, b, torch.ones_like(mu))
        self.hist_sum.index_add_(0, b, mu)
        if num is not None and den is not None:
            self.sum_num += float(num.detach().to(torch.float64).sum())
            self.sum_den += float(den.detach().to(torch.float64).sum())

    def add_logits(
        self,
        adapted_logits: torch.Tensor,
        base_logits: torch.Tensor,
        labels: torch.Tensor,
        alpha: float = DEFAULT_ALPHA,
        folds: torch.Tensor | None = None,
    ) -> None:
        """Teacher-forced calibration step: logits (..., V), gold labels (...) with −100 ignored;
        ``folds`` (B,): each row's cross-validation fold (needed when ``validation`` is kept)."""
        if self.validation is not None:
            if folds is None:
                raise ValueError("this accumulator keeps the μ validation: pass each row's fold")
            self.validation.add_logits(adapted_logits, base_logits, labels, folds, alpha)
        num, den = token_mu_terms(adapted_logits, base_logits, labels, alpha)
        valid = labels != IGNORE_INDEX
        num_v, den_v = num[valid], den[valid]
        self.add_mu(num_v / den_v, num_v, den_v)
        if self.sum_delta is not None:
            delta = masked_steering_vector(adapted_logits, base_logits, alpha)[valid]
            self.sum_delta += delta.to(torch.float64).sum(0).cpu()

    # ---------------------------------------------------------------- merge
    def merge(self, other: "MuAccumulator") -> "MuAccumulator":
        """Accumulator of the union of both datasets."""
        if (self.sum_delta is None) != (other.sum_delta is None):
            raise ValueError("cannot merge accumulators with and without sum_delta")
        if (self.validation is None) != (other.validation is None):
            raise ValueError("cannot merge accumulators with and without the μ validation")
        return MuAccumulator(
            vocab_size=self.vocab_size,
            count=self.count + other.count,
            sum_mu=self.sum_mu + other.sum_mu,
            sum_mu_sq=self.sum_mu_sq + other.sum_mu_sq,
            sum_num=self.sum_num + other.sum_num,
            sum_den=self.sum_den + other.sum_den,
            min_mu=min(self.min_mu, other.min_mu),
            max_mu=max(self.max_mu, other.max_mu),
            hist_count=self.hist_count + other.hist_count,
            hist_sum=self.hist_sum + other.hist_sum,
            sum_delta=None if self.sum_delta is None else self.sum_delta + other.sum_delta,
            validation=None if self.validation is None else self.validation.merge(other.validation),
        )

    __add__ = merge

    def all_reduce_(self, group=None) -> "MuAccumulator":
        """In-place SUM/MIN/MAX all-reduce over a torch.distributed process group."""
        import torch.distributed as dist

        flat = self._flat_sums()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        extremes = torch.tensor([-self.min_mu, self.max_mu], dtype=torch.float64)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
        self._load_flat_sums(flat)
        self.min_mu, self.max_mu = -float(extremes[0]), float(extremes[1])
        if self.validation is not None:  # the sums are global now; the records stay this rank's own
            self.validation.records_reduced = True
        return self

    def score_candidates_(self, group=None, trim: float = 0.1) -> "MuAccumulator":
        """Score the closed-form estimates (``CANDIDATES``) exactly in the validation: every rank sums the
        steered NLL at each candidate over its own token records, then one SUM all-reduce (after
        ``all_reduce_``; a no-op without validation or data). Without a process group, this process's
        records must cover the whole split (a local run, or shards merged with ``merge``)."""
        import torch.distributed as dist

        v = self.validation
        if v is None or self.count == 0:
            return self
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
        names, values = [], []
        for name in CANDIDATES:
            try:
                values.append(self.estimate(name, trim))
                names.append(name)
            except ValueError:  # e.g. no num/den terms for the sequence-level form
                continue
        usable = v.records_complete and (distributed or not getattr(v, "records_reduced", False))
        flag = torch.tensor([1.0 if usable else 0.0], dtype=torch.float64)
        if distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        if float(flag) == 0.0:
            v.candidate_note = "candidates not scored exactly (token records over budget); grid only"
            return self
        sums = v.candidate_sums(values)
        if distributed:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        v.set_candidates(names, values, sums)
        return self

    def _flat_sums(self) -> torch.Tensor:
        scalars = torch.tensor(
            [self.count, self.sum_mu, self.sum_mu_sq, self.sum_num, self.sum_den], dtype=torch.float64
        )
        parts = [scalars, self.hist_count, self.hist_sum]
        if self.sum_delta is not None:
            parts.append(self.sum_delta)
        if self.validation is not None:
            parts.append(self.validation.flat())
        return torch.cat(parts)

    def _load_flat_sums(self, flat: torch.Tensor) -> None:
        self.count = int(round(float(flat[0])))
        self.sum_mu, self.sum_mu_sq, self.sum_num, self.sum_den = (float(x) for x in flat[1:5])
        self.hist_count = flat[5 : 5 + NUM_BINS].clone()
        self.hist_sum = flat[5 + NUM_BINS : 5 + 2 * NUM_BINS].clone()
        rest = flat[5 + 2 * NUM_BINS :]
        if self.sum_delta is not None:
            self.sum_delta = rest[: self.sum_delta.numel()].clone()
            rest = rest[self.sum_delta.numel():]
        if self.validation is not None:
            self.validation.load_flat(rest)

    # ---------------------------------------------------------------- estimators
    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError("no calibration tokens were accumulated")

    def mean(self) -> float:
        self._require_data()
        return self.sum_mu / self.count

    def std(self) -> float:
        self._require_data()
        var = max(self.sum_mu_sq / self.count - self.mean() ** 2, 0.0)
        return math.sqrt(var)

    def sequence_level(self) -> float:
        self._require_data()
        if self.sum_den <= 0:
            raise ValueError("sequence-level μ̄ needs the num/den terms (use add_logits)")
        return self.sum_num / self.sum_den

    def _order_statistic(self, k: int) -> float:
        """Approximate k-th smallest μ* (0-based): the mean of the values in its bin."""
        cum = torch.cumsum(self.hist_count, 0)
        b = int(torch.searchsorted(cum, torch.tensor([k + 0.5], dtype=torch.float64)).item())
        b = min(b, NUM_BINS - 1)
        return float(self.hist_sum[b] / self.hist_count[b])

    def quantile(self, q: float) -> float:
        """Approximate q-quantile with linear interpolation between order statistics
        (the convention of ``torch.quantile``); each order statistic is its bin's mean."""
        self._require_data()
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q}")
        if q == 0.0:
            return self.min_mu
        if q == 1.0:
            return self.max_mu
        rank = q * (self.count - 1)
        k = int(math.floor(rank))
        frac = rank - k
        low = self._order_statistic(k)
        if frac == 0.0 or k + 1 >= self.count:
            return low
        return (1.0 - frac) * low + frac * self._order_statistic(k + 1)

    def median(self) -> float:
        return self.quantile(0.5)

    def trimmed_mean(self, trim: float = 0.1) -> float:
        """Mean of μ* after dropping a fraction ``trim`` of tokens at each end (bin-approximate)."""
        self._require_data()
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        lo, hi = trim * self.count, (1.0 - trim) * self.count
        cum_hi = torch.cumsum(self.hist_count, 0)
        cum_lo = cum_hi - self.hist_count
        # share of each bin's tokens that lies inside [lo, hi)
        kept = (torch.minimum(cum_hi, torch.tensor(hi)) - torch.maximum(cum_lo, torch.tensor(lo))).clamp_min(0)
        nonempty = self.hist_count > 0
        bin_mean = torch.where(nonempty, self.hist_sum / self.hist_count.clamp_min(1), torch.zeros_like(self.hist_sum))
        return float((kept * bin_mean).sum() / kept.sum())

    def estimate(self, name: str, trim: float = 0.1) -> float:
        if name == "mean":
            return self.mean()
        if name == "median":
            return self.median()
        if name == "sequence":
            return self.sequence_level()
        if name == "trimmed_mean":
            return self.trimmed_mean(trim)
        if name == "validated":
            if self.validation is None:
                raise ValueError("the validated μ̄ needs an accumulator built with validation (calibrate())")
            return self.validation.choose()["mu"]
        raise ValueError(f"unknown μ̄ estimator {name!r}; choose one of {ESTIMATORS}")

    def mean_delta(self) -> torch.Tensor:
        """Mean masked steering vector over calibration tokens (for "static" steering)."""
        self._require_data()
        if self.sum_delta is None:
            raise ValueError("accumulator was built without vocab_size; no δ sums")
        return (self.sum_delta / self.count).to(torch.float32)

    def summary(self, quantiles=(0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)) -> dict:
        """JSON-ready description of the μ* distribution and every estimator."""
        self._require_data()
        out = {
            "tokens": self.count,
            "mean": self.mean(),
            "std": self.std(),
            "median": self.median(),
            "trimmed_mean_10": self.trimmed_mean(0.1),
            "min": self.min_mu,
            "max": self.max_mu,
            "quantiles": {str(q): self.quantile(q) for q in quantiles},
        }
        if self.sum_den > 0:
            out["sequence"] = self.sequence_level()
        return out

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        return {
            "vocab_size": self.vocab_size,
            "scalars": torch.tensor(
                [self.count, self.sum_mu, self.sum_mu_sq, self.sum_num, self.sum_den, self.min_mu, self.max_mu],
                dtype=torch.float64,
            ),
            "hist_count": self.hist_count,
            "hist_sum": self.hist_sum,
            "sum_delta": self.sum_delta,
            "validation": None if self.validation is None else self.validation.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "MuAccumulator":
        s = state["scalars"].tolist()
        return cls(
            vocab_size=state["vocab_size"],
            count=int(s[0]),
            sum_mu=s[1],
            sum_mu_sq=s[2],
            sum_num=s[3],
            sum_den=s[4],
            min_mu=s[5],
            max_mu=s[6],
            hist_count=state["hist_count"].clone(),
            hist_sum=state["hist_sum"].clone(),
            sum_delta=None if state["sum_delta"] is None else state["sum_delta"].clone(),
            validation=None if state.get("validation") is None else MuValidation.from_state_dict(state["validation"]),
        )
