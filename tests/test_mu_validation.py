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
    from svd_ray.bundle import steering_from_accumulator

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


def _brute_nll(z_phi, z_theta, labels, folds, mu, alpha=0.1):
    delta = masked_steering_vector(z_phi, z_theta, alpha)
    logp = torch.log_softmax(z_phi + mu * delta, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    out = torch.zeros(FOLDS, dtype=torch.float64)
    for r in range(labels.shape[0]):
        out[folds[r]] -= logp[r][labels[r] != -100].sum()
    return out


@pytest.mark.parametrize("alpha", [0.1, 0.0])  # α = 0: δ's support is the whole vocabulary
def test_candidates_are_scored_exactly_and_halves_merge_to_the_whole(alpha):
    """Each closed-form estimate (mean, median, sequence, trimmed) enters the choice with its exact NLL
    (brute force), and two shards' candidate sums add up to the whole data's."""
    z_phi, z_theta, labels, folds = _toy(12, 5, 17, 1.5, seed=7, alpha=alpha)
    labels[3, 2] = -100
    whole = MuAccumulator(vocab_size=17, validation=MuValidation())
    whole.add_logits(z_phi, z_theta, labels, alpha, folds=folds)
    whole.score_candidates_()
    v = whole.validation
    assert v.cand_names == ["mean", "median", "sequence", "trimmed_mean"]
    for i, name in enumerate(v.cand_names):
        mu = whole.estimate(name)
        assert float(v.cand_values[i]) == mu
        torch.testing.assert_close(v.cand_nll[:, i], _brute_nll(z_phi, z_theta, labels, folds, mu, alpha),
                                   rtol=1e-10, atol=1e-9)
    # two workers: each scores its own records at the merged candidates; the sums add up to one worker's
    a, b = (MuAccumulator(vocab_size=17, validation=MuValidation()) for _ in range(2))
    a.add_logits(z_phi[:5], z_theta[:5], labels[:5], alpha, folds=folds[:5])
    b.add_logits(z_phi[5:], z_theta[5:], labels[5:], alpha, folds=folds[5:])
    values = v.cand_values.tolist()
    torch.testing.assert_close(a.validation.candidate_sums(values) + b.validation.candidate_sums(values), v.cand_nll,
                               rtol=1e-12, atol=1e-9)
    merged = a.merge(b).score_candidates_().validation.choose()
    want = v.choose()
    assert (merged["mu"], merged["steer"]) == (want["mu"], want["steer"])
    for name, c in want["candidates"].items():  # equal up to float64 summation order
        assert merged["candidates"][name] == pytest.approx(c, rel=1e-12)


def test_an_outlier_mean_is_scored_at_its_value_and_the_choice_can_be_a_candidate():
    """The choice ranges over grid ∪ candidates: when the NLL is minimised exactly at a candidate (off the
    grid), that candidate is picked and reported with its exact NLL."""
    z_phi, z_theta, labels, folds = _toy(200, 8, 40, 2.0, seed=2)
    acc = MuAccumulator(vocab_size=40, validation=MuValidation())
    acc.add_logits(z_phi, z_theta, labels, folds=folds)
    acc.score_candidates_()
    d = acc.validation.choose()
    grid_best = min(range(len(MU_GRID)), key=lambda g: float(acc.validation.nll[:, g].sum()))
    best_nll = min([float(acc.validation.nll[:, grid_best].sum())] + [float(x) for x in acc.validation.cand_nll.sum(0)])
    assert d["nll_per_token_at_mu"] == pytest.approx(best_nll / float(acc.validation.tokens.sum()), rel=1e-12)
    assert set(d["candidates"]) == {"mean", "median", "sequence", "trimmed_mean"}
    # a saved accumulator keeps the scored candidates but not the records: scoring again is refused
    restored = MuAccumulator.from_state_dict(acc.state_dict())
    assert restored.validation.choose() == d
    with pytest.raises(ValueError, match="record"):
        restored.validation.candidate_sums([0.5])


def test_record_budget_falls_back_to_the_grid(monkeypatch):
    import svd_ray.mu_validation as mv

    monkeypatch.setattr(mv, "RECORD_BUDGET", 10)
    z_phi, z_theta, labels, folds = _toy(20, 4, 13, 1.0, seed=8, alpha=0.0)
    acc = MuAccumulator(vocab_size=13, validation=MuValidation())
    acc.add_logits(z_phi, z_theta, labels, 0.0, folds=folds)
    acc.score_candidates_()
    d = acc.validation.choose()
    assert d["candidates"] == {} and "grid only" in d["candidate_note"]


def test_not_steering_falls_back_to_mask_only_when_the_masked_distribution_fits_calibration_better(tmp_path):
    """Gold tokens drawn from p_φ renormalised over the plausibility mask: steering cannot help, and the
    masked decoding distribution (μ = 0) has the lower NLL, so the bundle serves "mask only" (svdecode at
    μ 0); labels from the full p_φ (some outside the mask, floored) keep the plain adapter ("off")."""
    from svd_ray.bundle import steering_from_accumulator
    from svd_ray.steering import plausibility_mask

    g = torch.Generator().manual_seed(11)
    z_phi = torch.randn(200, 6, 30, generator=g, dtype=torch.float64) * 2
    z_theta = z_phi + torch.randn(200, 6, 30, generator=g, dtype=torch.float64)
    inside = plausibility_mask(z_phi, 0.1)
    masked_p = torch.softmax(z_phi.masked_fill(~inside, float("-inf")), -1)
    labels = torch.multinomial(masked_p.reshape(-1, 30), 1, generator=g).reshape(200, 6)
    folds = torch.arange(200) % FOLDS
    acc = MuAccumulator(vocab_size=30, validation=MuValidation())
    acc.add_logits(z_phi, z_theta, labels, folds=folds)
    # brute force: Σ −log masked_p[y] per fold (every gold token is inside the mask here)
    want = torch.zeros(FOLDS, dtype=torch.float64)
    want.index_add_(0, folds, -torch.log(masked_p.gather(-1, labels[..., None]).squeeze(-1)).sum(1))
    torch.testing.assert_close(acc.validation.masked_nll0, want, rtol=1e-10, atol=1e-9)
    sd = steering_from_accumulator(acc, 0.1, "validated")
    assert not sd.validation["steer"] and sd.validation["fallback"] == "mask_only", sd.validation
    assert sd.mu == 0.0 and sd.default_mode == "svdecode" and "inside the plausibility mask" in sd.validation["reason"]

    z2, t2, l2, f2 = _toy(200, 6, 30, 0.0, seed=12)  # labels from the full p_φ: some fall outside the mask
    acc2 = MuAccumulator(vocab_size=30, validation=MuValidation())
    acc2.add_logits(z2, t2, l2, folds=f2)
    sd2 = steering_from_accumulator(acc2, 0.1, "validated")
    assert sd2.validation["fallback"] == "off" and sd2.default_mode == "off"


@pytest.mark.parametrize("alpha", [0.5, 0.1, 0.0])
def test_support_only_grid_nll_equals_full_softmax(alpha, monkeypatch):
    """The support-only formula (one full logsumexp per token) equals one full softmax per μ — including
    tokens whose δ is zero everywhere (adapter = base) and gold tokens outside the mask — and so does the
    wide-support fallback."""
    import svd_ray.mu_validation as mv

    g = torch.Generator().manual_seed(3)
    z = torch.randn(9, 50, generator=g, dtype=torch.float64) * 3
    theta = z + torch.randn(9, 50, generator=g, dtype=torch.float64)
    theta[2] = z[2]  # δ = 0 on this row
    delta = masked_steering_vector(z, theta, alpha)
    y = torch.randint(0, 50, (9,), generator=g)
    mus = torch.tensor(MU_GRID, dtype=torch.float64)
    want = torch.stack([-torch.log_softmax(z + m * delta, -1).gather(-1, y[:, None]).squeeze(-1) for m in MU_GRID], 1)
    torch.testing.assert_close(mv.grid_nll(z, delta, y, mus), want, rtol=1e-12, atol=1e-10)
    monkeypatch.setattr(mv, "SUPPORT_DENSE_MAX", 0)
    torch.testing.assert_close(mv.grid_nll(z, delta, y, mus), want, rtol=1e-12, atol=1e-10)


def test_cross_validate_by_hand():
    """Three folds, grid (0, +1, −1): each fold's pick is the argmin of the other two folds' summed loss,
    its gain is scored on the held-out fold per count; an empty fold is skipped."""
    from svd_ray.mu_validation import cross_validate

    loss = torch.tensor([[10.0, 8.0, 12.0], [10.0, 11.0, 9.0], [10.0, 7.0, 13.0], [0.0, 0.0, 0.0]])
    counts = torch.tensor([2.0, 5.0, 4.0, 0.0])
    cv = cross_validate(loss, counts, [0.0, 1.0, -1.0])
    # fold 0 held out: others sum to (20, 18, 22) → +1; fold 1: (20, 15, 25) → +1; fold 2: (20, 19, 21) → +1
    assert cv["picks"] == [1.0, 1.0, 1.0]
    gains = [(10 - 8) / 2, (10 - 11) / 5, (10 - 7) / 4]
    assert cv["gains"] == pytest.approx(gains)
    mean = sum(gains) / 3
    assert cv["gain"] == pytest.approx(mean)
    assert cv["se"] == pytest.approx(math.sqrt(sum((g - mean) ** 2 for g in gains) / 2) / math.sqrt(3))
    assert cv["best"] == 1
    assert math.isinf(cross_validate(loss[:1], counts[:1], [0.0, 1.0, -1.0])["se"])
