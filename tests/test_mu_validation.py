"""The validated μ̄: per-fold steered NLL sums (checked by brute force), exact merging, and the
cross-validated decision on toy data where steering provably helps and where it provably cannot."""
import math

import pytest
import torch

from svd_ray.calibration import MuAccumulator
from svd_ray.mu_validation import FOLDS, MU_GRID, MuValidation, fold_of
from svd_ray.steering import masked_steering_vector


def _toy(n_rows: int, length: int, vocab: int, mu_true: float, seed: int, alpha: float = 0.1):
    """Logits with labels drawn from softmax(z_φ + μ_true·δ⊙m): steering by μ_true is the truth."""
    g = torch.Generator().manual_seed(seed)
    z_phi = torch.randn(n_rows, length, vocab, generator=g, dtype=torch.float64) * 2
    z_theta = z_phi + torch.randn(n_rows, length, vocab, generator=g, dtype=torch.float64)
    delta = masked_steering_vector(z_phi, z_theta, alpha)
    p = torch.softmax(z_phi + mu_true * delta, -1)
    labels = torch.multinomial(p.reshape(-1, vocab), 1, generator=g).reshape(n_rows, length)
    folds = torch.tensor([r % FOLDS for r in range(n_rows)])
    return z_phi, z_theta, labels, folds


def test_fold_sums_equal_brute_force():
    z_phi, z_theta, labels, folds = _toy(7, 3, 11, 1.0, seed=0)
    labels[0, 1] = -100  # ignored position
    v = MuValidation()
    v.add_logits(z_phi, z_theta, labels, folds, alpha=0.1)
    delta = masked_steering_vector(z_phi, z_theta, 0.1)
    for g, mu in enumerate(MU_GRID[:9]):
        want = torch.zeros(FOLDS, dtype=torch.float64)
        for r in range(7):
            for t in range(3):
                if labels[r, t] == -100:
                    continue
                want[folds[r]] -= torch.log_softmax(z_phi[r, t] + mu * delta[r, t], -1)[labels[r, t]]
        torch.testing.assert_close(v.nll[:, g], want, rtol=1e-12, atol=1e-12)
    assert v.tokens.sum() == 7 * 3 - 1


def test_halves_merge_to_the_whole_and_the_flat_layout_round_trips():
    z_phi, z_theta, labels, folds = _toy(10, 4, 13, 0.5, seed=1)
    whole, a, b = (MuAccumulator(vocab_size=13, validation=MuValidation()) for _ in range(3))
    whole.add_logits(z_phi, z_theta, labels, folds=folds)
    a.add_logits(z_phi[:6], z_theta[:6], labels[:6], folds=folds[:6])
    b.add_logits(z_phi[6:], z_theta[6:], labels[6:], folds=folds[6:])
    merged = a.merge(b)
    torch.testing.assert_close(merged.validation.nll, whole.validation.nll, rtol=1e-12, atol=1e-10)
    assert merged.estimate("validated") == whole.estimate("validated")
    # what all_reduce_ sends and loads back
    c = MuAccumulator(vocab_size=13, validation=MuValidation())
    c._load_flat_sums(merged._flat_sums())
    torch.testing.assert_close(c.validation.nll, merged.validation.nll)
    torch.testing.assert_close(c.sum_delta, merged.sum_delta)
    restored = MuAccumulator.from_state_dict(merged.state_dict())
    assert restored.validation.choose() == merged.validation.choose()


def test_where_steering_helps_the_validated_mu_is_nonzero_and_lowers_held_out_nll():
    z_phi, z_theta, labels, folds = _toy(200, 8, 40, 2.0, seed=2)
    v = MuValidation()
    v.add_logits(z_phi, z_theta, labels, folds)
    d = v.choose()
    assert d["steer"] and d["mu"] != 0.0 and 0.5 < d["mu"] < 8, d
    # fresh data from the same process: the chosen μ beats the plain adapter on tokens never seen
    z2, t2, l2, _ = _toy(100, 8, 40, 2.0, seed=3)
    delta = masked_steering_vector(z2, t2, 0.1)

    def nll(mu):
        return -torch.log_softmax(z2 + mu * delta, -1).gather(-1, l2[..., None]).mean().item()

    assert nll(d["mu"]) < nll(0.0) - 1e-3


def test_where_steering_cannot_help_the_task_falls_back_to_the_plain_adapter():
    """Labels drawn from p_φ itself: μ = 0 is optimal in expectation, so no μ may be chosen."""
    z_phi, z_theta, labels, folds = _toy(200, 8, 40, 0.0, seed=4)
    v = MuValidation()
    v.add_logits(z_phi, z_theta, labels, folds)
    d = v.choose()
    assert not d["steer"] and d["mu"] == 0.0 and "no μ beats μ = 0" in d["reason"], d


def test_steering_data_serves_the_plain_adapter_when_validation_says_so(tmp_path):
    from svd_ray.bundle import read_steering, steering_from_accumulator

    z_phi, z_theta, labels, folds = _toy(60, 6, 30, 0.0, seed=5)
    acc = MuAccumulator(vocab_size=30, validation=MuValidation())
    acc.add_logits(z_phi, z_theta, labels, folds=folds)
    sd = steering_from_accumulator(acc, 0.1, "validated")
    assert sd.mu == 0.0 and sd.default_mode == "off" and sd.meta()["validation"]["steer"] is False
    paper = steering_from_accumulator(acc, 0.1, "mean")  # the paper's rule stays exact and serves steered
    assert paper.mu == acc.mean() and paper.default_mode == "svdecode"
    assert set(sd.estimates) == {"mean", "median", "sequence", "trimmed_mean", "validated"}


def test_fold_of_is_deterministic_and_spreads():
    a = torch.tensor([5, 9, 2, 7])
    assert fold_of(a) == fold_of(a.clone()) and 0 <= fold_of(a) < FOLDS
    seen = {fold_of(torch.tensor([i, i + 1, i * 3])) for i in range(50)}
    assert seen == set(range(FOLDS))
