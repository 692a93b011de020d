"""SVDecode steering math: pure torch, no Ray, no model code.

Notation (see ``../shared/docs/svdecode-method.md``):
    z_φ, z_θ   next-token logits with the adapter on / off, vocabulary in the last dim
    p = softmax(z),  r = log p_φ − log p_θ,  KL = Σ_y p_φ(y) r(y)

Everything here is elementwise over any number of leading dims and O(|V|) per position.
Computations run in float32 (or float64 if the inputs are float64) from log-softmax, never
from probabilities divided by probabilities.
"""
from __future__ import annotations

import torch

EPS = 1e-12
DEFAULT_ALPHA = 0.1
IGNORE_INDEX = -100


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def kl_divergence(adapted_logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_φ ‖ p_θ) = Σ_y p_φ(y) (log p_φ(y) − log p_θ(y)), reduced over the last dim."""
    dt = _work_dtype(adapted_logits)
    logp_phi = torch.log_softmax(adapted_logits.to(dt), dim=-1)
    logp_theta = torch.log_softmax(base_logits.to(dt), dim=-1)
    return (logp_phi.exp() * (logp_phi - logp_theta)).sum(-1)


def steering_vector(adapted_logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """Logit-space steering vector δ.

    δ = J(p_φ) · (−∇_{p_φ} KL(p_φ ‖ p_θ)),  J = diag(p_φ) − p_φ p_φᵀ,  ∇_p KL = r + 1,
    which simplifies (J·1 = 0) to

        δ(y) = p_φ(y) · ( KL(p_φ ‖ p_θ) − r(y) ),   r = log p_φ − log p_θ.

    Σ_y δ(y) = 0, and δ is invariant to adding a constant to either logit vector.
    Returned in float32 (float64 for float64 inputs), same shape as the inputs.
    """
    if adapted_logits.shape != base_logits.shape:
        raise ValueError(
            f"adapted_logits {tuple(adapted_logits.shape)} and base_logits "
            f"{tuple(base_logits.shape)} must have the same shape"
        )
    dt = _work_dtype(adapted_logits)
    logp_phi = torch.log_softmax(adapted_logits.to(dt), dim=-1)
    logp_theta = torch.log_softmax(base_logits.to(dt), dim=-1)
    p_phi = logp_phi.exp()
    r = logp_phi - logp_theta
    # p_φ(y) = 0 (underflow) with log p_θ(y) = −inf would give 0·nan; such entries contribute 0.
    r = torch.where(p_phi > 0, r, torch.zeros_like(r))
    kl = (p_phi * r).sum(-1, keepdim=True)
    return p_phi * (kl - r)


def plausibility_mask(adapted_logits: torch.Tensor, alpha: float | torch.Tensor = DEFAULT_ALPHA) -> torch.Tensor:
    """Adaptive plausibility mask: keep y iff p_φ(y) ≥ α · max_y' p_φ(y').

    In logit space: z_φ(y) ≥ max z_φ + log α (softmax normalisation cancels).
    α = 0 keeps every token (the "no mask" ablation). The argmax is always kept.
    ``alpha`` may be a tensor of per-row values broadcasting against ``adapted_logits[..., :1]``.
    """
    z = adapted_logits.to(_work_dtype(adapted_logits))
    if isinstance(alpha, torch.Tensor):
        a = alpha.to(device=z.device, dtype=z.dtype)
        if bool(((a < 0) | (a > 1) | a.isnan()).any()):
            raise ValueError("alpha must be in [0, 1]")
        zmax = z.max(dim=-1, keepdim=True).values
        return z >= zmax + torch.log(a)  # log 0 = −inf keeps every token
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return torch.ones_like(z, dtype=torch.bool)
    zmax = z.max(dim=-1, keepdim=True).values
    return z >= zmax + torch.log(torch.tensor(alpha, dtype=z.dtype))


def masked_steering_vector(
    adapted_logits: torch.Tensor, base_logits: torch.Tensor, alpha: float = DEFAULT_ALPHA
) -> torch.Tensor:
    """δ with entries outside the plausibility mask set to 0 (the calibration-time convention)."""
    delta = steering_vector(adapted_logits, base_logits)
    return delta * plausibility_mask(adapted_logits, alpha)


def apply_steering(
    adapted_logits: torch.Tensor,
    delta: torch.Tensor,
    mu: float | torch.Tensor,
    alpha: float = DEFAULT_ALPHA,
) -> torch.Tensor:
    """ẑ = z_φ + μ·δ on masked-in tokens, −inf elsewhere, for a given δ.

    Used both with the per-step δ (SVDecode) and with a precomputed mean δ ("static" mode);
    ``delta`` broadcasts against ``adapted_logits``.
    """
    dt = _work_dtype(adapted_logits)
    z = adapted_logits.to(dt)
    mask = plausibility_mask(z, alpha)
    steered = z + torch.as_tensor(mu, dtype=dt, device=z.device) * delta.to(dt)
    return steered.masked_fill(~mask, float("-inf"))


def steer_logits(
    adapted_logits: torch.Tensor,
    base_logits: torch.Tensor,
    mu: float | torch.Tensor,
    alpha: float = DEFAULT_ALPHA,
) -> torch.Tensor:
    """Steered logits ẑ = z_φ + μ̄·δ(z_φ, z_θ) inside the plausibility mask, −inf outside.

    With μ = 0 and α = 0 this is exactly z_φ (in the working dtype).
    """
    return apply_steering(adapted_logits, steering_vector(adapted_logits, base_logits), mu, alpha)


STEERING_MODES = ("svdecode", "static", "off")


def form_steered_logits(
    adapted_logits: torch.Tensor,
    base_logits: torch.Tensor | None,
    *,
    mode: str,
    mu: float | torch.Tensor,
    alpha: float | torch.Tensor,
    mean_delta: torch.Tensor | None = None,
    outside: str = "mask",
    delta: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """ẑ for one steering mode: the single place the steered logits are formed (decoding, scoring, the HF
    logits processor, the batching engine).

        svdecode   ẑ = z_φ + μ · (δ(z_φ, z_θ) ⊙ m)      δ recomputed from this position's z_φ, z_θ
        static     ẑ = z_φ + μ · (δ̄ ⊙ m)               δ̄ = the calibration-mean δ (no base pass)
        off        ẑ = z_φ

    m = plausibility mask of z_φ at threshold α. ``outside``: ``"mask"`` (decoding) puts −inf outside
    m, i.e. p̂ is renormalised over the mask; ``"keep"`` (scoring, the calibration objective) keeps the
    unsteered z_φ there. ``mu`` and ``alpha`` may be per-row tensors (shape (..., 1) or (...,)); rows
    are independent. Float32 (float64 for float64 inputs).

    ``delta`` (svdecode: δ(z_φ, z_θ)) and ``mask`` (m at this α) may be passed when already computed for
    these logits, e.g. when one set of logits is scored under many μ: the result is the same tensor.
    """
    if mode not in STEERING_MODES:
        raise ValueError(f"steering mode must be one of {STEERING_MODES}, got {mode!r}")
    if outside not in ("mask", "keep"):
        raise ValueError(f"outside must be 'mask' or 'keep', got {outside!r}")
    dt = _work_dtype(adapted_logits)
    z = adapted_logits.to(dt)
    if mode == "off":
        return z
    a = _per_row(alpha, z)
    m = _per_row(mu, z)
    if mask is None:
        mask = plausibility_mask(z, a)
    if mode == "static":
        if mean_delta is None:
            raise ValueError("static steering needs mean_delta")
        delta = mean_delta.to(device=z.device, dtype=dt)
    elif delta is None:
        if base_logits is None:
            raise ValueError("svdecode steering needs the adapter-off logits")
        delta = steering_vector(z, base_logits)
    steered = z + m * (delta * mask)
    return steered.masked_fill(~mask, float("-inf")) if outside == "mask" else steered


def _per_row(value: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A scalar stays a Python float; a tensor of per-row values gets a trailing vocab dim to broadcast."""
    if not isinstance(value, torch.Tensor):
        return float(value)
    v = value.to(device=like.device, dtype=like.dtype)
    return v if v.dim() == like.dim() else v.unsqueeze(-1)


def token_mu_terms(
    adapted_logits: torch.Tensor,
    base_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = DEFAULT_ALPHA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerator and denominator of the per-token optimal strength.

    num_t = ⟨ e_{y*_t} − p_φ , δ_t ⟩,   den_t = ‖δ_t‖² + ε,   δ_t masked (0 outside the mask).
    Positions whose label is ``IGNORE_INDEX`` (−100) get num = den = 0.
    Shapes: logits (..., V), labels (...) → two tensors of shape (...).
    """
    if labels.shape != adapted_logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits shape without the vocab dim "
            f"{tuple(adapted_logits.shape[:-1])}"
        )
    delta = masked_steering_vector(adapted_logits, base_logits, alpha)
    dt = delta.dtype
    p_phi = torch.softmax(adapted_logits.to(dt), dim=-1)
    valid = labels != IGNORE_INDEX
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    delta_at_label = delta.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    num = delta_at_label - (p_phi * delta).sum(-1)
    den = (delta * delta).sum(-1) + EPS
    zero = torch.zeros((), dtype=dt, device=delta.device)
    return torch.where(valid, num, zero), torch.where(valid, den, zero)


def token_mu(
    adapted_logits: torch.Tensor,
    base_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = DEFAULT_ALPHA,
) -> torch.Tensor:
    """Per-token optimal steering strength (one Gauss-Newton step along δ):

        μ*_t = ⟨ e_{y*_t} − p_φ , δ_t ⟩ / ( ‖δ_t‖² + ε ),   ε = 1e-12,

    with δ_t's entries outside the plausibility mask set to 0. μ*_t minimises the
    second-order model  −⟨e−p, μδ⟩ + ½ μ² ‖δ‖²  of the fine-tuning loss along δ.
    Positions labelled ``IGNORE_INDEX`` return NaN (callers select valid positions).
    """
    num, den = token_mu_terms(adapted_logits, base_logits, labels, alpha)
    mu = num / torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(labels != IGNORE_INDEX, mu, torch.full_like(mu, float("nan")))
