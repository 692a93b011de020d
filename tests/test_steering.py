"""Steering math checked against autograd, brute force and finite differences (float64)."""
import math

import pytest
import torch

from svd_ray.steering import (
    EPS,
    IGNORE_INDEX,
    kl_divergence,
    masked_steering_vector,
    plausibility_mask,
    steer_logits,
    steering_vector,
    token_mu,
    token_mu_terms,
)


def _logits(*shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _delta_autograd(z_phi: torch.Tensor, z_theta: torch.Tensor) -> torch.Tensor:
    """J(p_φ) · (−∇_p KL(p‖p_θ)) with the gradient taken by autograd and J built explicitly."""
    p = torch.softmax(z_phi, -1).detach().requires_grad_(True)
    log_p_theta = torch.log_softmax(z_theta, -1)
    kl = (p * (torch.log(p) - log_p_theta)).sum()
    (grad,) = torch.autograd.grad(kl, p)
    pd = p.detach()
    jac = torch.diag(pd) - torch.outer(pd, pd)
    return jac @ (-grad)


@pytest.mark.parametrize("vocab", [2, 5, 17, 64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delta_matches_autograd_jacobian_projection(vocab, seed):
    z_phi, z_theta = _logits(vocab, seed=seed), _logits(vocab, seed=seed + 100)
    expected = _delta_autograd(z_phi, z_theta)
    got = steering_vector(z_phi, z_theta)
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected, atol=1e-10, rtol=0)


def test_delta_batched_matches_rowwise_and_sums_to_zero():
    z_phi, z_theta = _logits(3, 4, 11, seed=3), _logits(3, 4, 11, seed=4)
    delta = steering_vector(z_phi, z_theta)
    assert delta.shape == z_phi.shape
    for i in range(3):
        for j in range(4):
            assert torch.allclose(delta[i, j], _delta_autograd(z_phi[i, j], z_theta[i, j]), atol=1e-10, rtol=0)
    assert delta.sum(-1).abs().max() < 1e-12


def test_delta_invariant_to_logit_shifts():
    z_phi, z_theta = _logits(2, 23, seed=5), _logits(2, 23, seed=6)
    base = steering_vector(z_phi, z_theta)
    shifted = steering_vector(z_phi + 7.5, z_theta - 3.25)
    assert torch.allclose(base, shifted, atol=1e-12, rtol=0)


def test_delta_is_zero_when_distributions_agree():
    z = _logits(9, seed=7)
    assert steering_vector(z, z + 1.0).abs().max() < 1e-14


def test_delta_low_precision_inputs_computed_in_fp32():
    z_phi, z_theta = _logits(40, seed=8).to(torch.bfloat16), _logits(40, seed=9).to(torch.bfloat16)
    got = steering_vector(z_phi, z_theta)
    assert got.dtype == torch.float32
    ref = steering_vector(z_phi.double(), z_theta.double())
    assert torch.allclose(got.double(), ref, atol=1e-6)


def test_delta_finite_with_extreme_logits():
    z_phi = torch.tensor([0.0, -1e4, 5.0, -float("inf")], dtype=torch.float64)
    z_theta = torch.tensor([-1e4, 0.0, 5.0, 0.0], dtype=torch.float64)
    delta = steering_vector(z_phi, z_theta)
    assert torch.isfinite(delta).all()
    assert abs(float(delta.sum())) < 1e-12


def test_delta_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        steering_vector(torch.zeros(3, 5), torch.zeros(3, 6))


def test_kl_divergence_matches_definition():
    z_phi, z_theta = _logits(13, seed=10), _logits(13, seed=11)
    p, q = torch.softmax(z_phi, -1), torch.softmax(z_theta, -1)
    assert math.isclose(float(kl_divergence(z_phi, z_theta)), float((p * (p / q).log()).sum()), rel_tol=1e-12)


def test_plausibility_mask_against_probability_rule():
    z = _logits(5, 50, seed=12)
    p = torch.softmax(z, -1)
    for alpha in (0.05, 0.1, 0.5, 1.0):
        expected = p >= alpha * p.max(-1, keepdim=True).values
        got = plausibility_mask(z, alpha)
        assert torch.equal(got, expected)
        assert got.any(-1).all()  # the argmax always survives
    assert plausibility_mask(z, 0.0).all()
    with pytest.raises(ValueError):
        plausibility_mask(z, 1.5)


def test_steer_logits_formula_and_mask():
    z_phi, z_theta = _logits(2, 30, seed=13), _logits(2, 30, seed=14)
    mu = 0.7
    out = steer_logits(z_phi, z_theta, mu, alpha=0.1)
    mask = plausibility_mask(z_phi, 0.1)
    expected = z_phi + mu * steering_vector(z_phi, z_theta)
    assert torch.equal(torch.isinf(out), ~mask)
    assert torch.allclose(out[mask], expected[mask], atol=1e-12, rtol=0)


def test_steer_logits_identity_when_mu_zero_and_no_mask():
    z_phi, z_theta = _logits(4, 30, seed=15), _logits(4, 30, seed=16)
    assert torch.equal(steer_logits(z_phi, z_theta, 0.0, alpha=0.0), z_phi)


def _second_order_model(mu, z_phi, delta, label):
    """m(μ) = −μ⟨e_y − p_φ, δ⟩ + ½ μ² (‖δ‖² + ε): the Gauss-Newton model of CE along δ."""
    p = torch.softmax(z_phi, -1)
    e = torch.zeros_like(p)
    e[label] = 1.0
    g = float(((e - p) * delta).sum())
    return -mu * g + 0.5 * mu * mu * (float((delta * delta).sum()) + EPS)


@pytest.mark.parametrize("seed", range(5))
def test_token_mu_minimises_the_gauss_newton_model_of_the_real_loss(seed):
    """μ* = argmin_μ [ L(0) + μ·L'(0) + ½ μ² (‖δ⊙m‖² + ε) ], where L(μ) = −log softmax(z_φ + μ·δ⊙m)[y] is the
    real cross-entropy along the real (masked) steering vector and L'(0) is measured by central finite
    differences of L — not built from μ*'s own formula. Brute-force minimisation on a fine grid."""
    vocab = 12
    z_phi, z_theta = _logits(vocab, seed=seed + 20), _logits(vocab, seed=seed + 40)
    label = seed % vocab
    mu = float(token_mu(z_phi[None], z_theta[None], torch.tensor([label]), alpha=0.1)[0])
    delta = masked_steering_vector(z_phi, z_theta, 0.1)

    def loss(m: float) -> float:
        return float(-torch.log_softmax(z_phi + m * delta, -1)[label])

    h = 1e-5
    slope = (loss(h) - loss(-h)) / (2 * h)  # L'(0) of the real loss
    curvature = float((delta * delta).sum()) + EPS
    grid = torch.linspace(mu - 50 * (abs(mu) + 1), mu + 50 * (abs(mu) + 1), 200001, dtype=torch.float64)
    model = slope * grid + 0.5 * curvature * grid * grid
    best = float(grid[model.argmin()])
    step = float(grid[1] - grid[0])
    assert abs(best - mu) <= step + 1e-6 * (abs(mu) + 1)


def test_token_mu_masked_entries_are_zeroed_and_ignore_index():
    z_phi, z_theta = _logits(3, 20, seed=30), _logits(3, 20, seed=31)
    labels = torch.tensor([1, IGNORE_INDEX, 5])
    mu = token_mu(z_phi, z_theta, labels, alpha=0.2)
    assert torch.isnan(mu[1]) and torch.isfinite(mu[[0, 2]]).all()
    # manual formula with masked δ
    for i in (0, 2):
        d = steering_vector(z_phi[i], z_theta[i]) * plausibility_mask(z_phi[i], 0.2)
        p = torch.softmax(z_phi[i], -1)
        e = torch.zeros(20, dtype=torch.float64)
        e[labels[i]] = 1
        assert math.isclose(float(mu[i]), float(((e - p) * d).sum() / ((d * d).sum() + EPS)), rel_tol=1e-10)
    num, den = token_mu_terms(z_phi, z_theta, labels, alpha=0.2)
    assert num[1] == 0 and den[1] == 0


def test_token_mu_finite_when_adapter_equals_base():
    z = _logits(2, 10, seed=32)
    mu = token_mu(z, z.clone(), torch.tensor([0, 3]))
    assert torch.equal(mu, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(4))
def test_theorem2_directional_derivative_by_finite_differences(seed):
    """d/dμ KL(q ‖ softmax(z_φ + μδ))|_{μ=0} = ⟨∇_z KL(q‖softmax(z_φ)), δ⟩."""
    vocab = 15
    z_phi, z_theta = _logits(vocab, seed=seed + 50), _logits(vocab, seed=seed + 60)
    q = torch.softmax(_logits(vocab, seed=seed + 70), -1)
    delta = steering_vector(z_phi, z_theta)

    def kl_q(z):
        logp = torch.log_softmax(z, -1)
        return (q * (q.log() - logp)).sum()

    h = 1e-6
    fd = (kl_q(z_phi + h * delta) - kl_q(z_phi - h * delta)) / (2 * h)
    z = z_phi.clone().requires_grad_(True)
    (grad_z,) = torch.autograd.grad(kl_q(z), z)
    assert math.isclose(float(fd), float((grad_z * delta).sum()), rel_tol=1e-6, abs_tol=1e-10)
    # and ∇_z KL(q‖p) = p − q, so with q = e_y the derivative is −⟨e_y − p, δ⟩ (μ*'s numerator)
    assert torch.allclose(grad_z, torch.softmax(z_phi, -1) - q, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_steering_vector_is_the_steepest_descent_of_kl_to_the_base(seed):
    """What ties δ to the method (spec §2): δ = −J(p_φ)·∇_p KL(p_φ‖p_θ) = −∇_z KL(softmax(z)‖p_θ) at z_φ,
    so moving the logits along δ decreases KL(p̂‖p_θ) at rate exactly −‖δ‖². Measured by finite
    differences of the real KL: a δ with a wrong sign, scale or term fails this, any other vector fails it."""
    vocab = 15
    z_phi, z_theta = _logits(vocab, seed=seed + 80), _logits(vocab, seed=seed + 90)
    delta = steering_vector(z_phi, z_theta)
    logp_theta = torch.log_softmax(z_theta, -1)

    def kl_to_base(z):
        logp = torch.log_softmax(z, -1)
        return float((logp.exp() * (logp - logp_theta)).sum())

    h = 1e-6
    rate = (kl_to_base(z_phi + h * delta) - kl_to_base(z_phi - h * delta)) / (2 * h)
    assert math.isclose(rate, -float((delta * delta).sum()), rel_tol=1e-6, abs_tol=1e-12)
    other = delta + 0.1 * _logits(vocab, seed=seed + 99)  # a perturbed direction is not steepest descent
    rate_other = (kl_to_base(z_phi + h * other) - kl_to_base(z_phi - h * other)) / (2 * h)
    assert not math.isclose(rate_other, -float((other * other).sum()), rel_tol=1e-3)
