"""MuAccumulator: estimators against exact computations, merge property, persistence."""
import math

import pytest
import torch

from svd_ray.calibration import MuAccumulator, histogram_bin
from svd_ray.steering import IGNORE_INDEX, masked_steering_vector, token_mu, token_mu_terms


def _batch(seed, n=40, vocab=25):
    g = torch.Generator().manual_seed(seed)
    z_phi = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    z_theta = z_phi + torch.randn(n, vocab, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::7] = IGNORE_INDEX
    return z_phi, z_theta, labels


def test_estimators_match_exact_values():
    z_phi, z_theta, labels = _batch(0, n=400)
    acc = MuAccumulator(vocab_size=25)
    acc.add_logits(z_phi, z_theta, labels)
    mu = token_mu(z_phi, z_theta, labels)
    mu = mu[labels != IGNORE_INDEX]
    num, den = token_mu_terms(z_phi, z_theta, labels)
    assert acc.count == mu.numel()
    assert math.isclose(acc.mean(), float(mu.mean()), rel_tol=1e-12)
    assert math.isclose(acc.std(), float(mu.std(unbiased=False)), rel_tol=1e-9)
    assert math.isclose(acc.sequence_level(), float(num.sum() / den.sum()), rel_tol=1e-12)
    assert acc.min_mu == float(mu.min()) and acc.max_mu == float(mu.max())
    # median: within one histogram bin (~1.2% relative) of an exact middle order statistic
    s = mu.sort().values
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        exact = float(torch.quantile(mu, q))
        assert abs(acc.quantile(q) - exact) <= 0.012 * abs(exact) + 1e-8, q
    assert acc.median() == acc.quantile(0.5)
    # trimmed mean vs exact trimmed mean
    k = int(0.1 * len(s))
    exact_trim = float(s[k : len(s) - k].mean())
    assert abs(acc.trimmed_mean(0.1) - exact_trim) <= 0.03 * abs(exact_trim) + 1e-6
    # mean δ over valid tokens
    delta = masked_steering_vector(z_phi, z_theta)[labels != IGNORE_INDEX]
    assert torch.allclose(acc.mean_delta().double(), delta.mean(0), atol=1e-6)


def test_quantiles_of_known_sample():
    acc = MuAccumulator()
    values = torch.tensor([-1000.0, -2.0, -0.5, 0.0, 0.3, 1.0, 4.0, 9.0, 1e6], dtype=torch.float64)
    acc.add_mu(values)
    assert math.isclose(acc.median(), 0.3, rel_tol=0.012)
    assert acc.quantile(0.0) == -1000.0 and acc.quantile(1.0) == 1e6
    assert math.isclose(acc.quantile(0.125), -2.0, rel_tol=0.012)


def test_histogram_bins_are_monotone_in_value():
    v = torch.tensor([-1e9, -1e3, -1.0, -1e-3, -1e-9, 0.0, 1e-9, 1e-3, 1.0, 1e3, 1e9], dtype=torch.float64)
    b = histogram_bin(v)
    assert torch.all(b[1:] >= b[:-1])


def test_merge_of_halves_equals_whole():
    z_phi, z_theta, labels = _batch(1, n=300)
    whole = MuAccumulator(vocab_size=25)
    whole.add_logits(z_phi, z_theta, labels)
    a, b = MuAccumulator(vocab_size=25), MuAccumulator(vocab_size=25)
    a.add_logits(z_phi[:137], z_theta[:137], labels[:137])
    b.add_logits(z_phi[137:], z_theta[137:], labels[137:])
    merged = a.merge(b)
    assert merged.count == whole.count
    assert torch.equal(merged.hist_count, whole.hist_count)
    for name in ("mean", "median", "sequence", "trimmed_mean"):
        assert math.isclose(merged.estimate(name), whole.estimate(name), rel_tol=1e-12, abs_tol=1e-15), name
    assert merged.min_mu == whole.min_mu and merged.max_mu == whole.max_mu
    assert torch.allclose(merged.sum_delta, whole.sum_delta, rtol=1e-12, atol=1e-15)
    assert torch.allclose(merged.hist_sum, whole.hist_sum, rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip():
    z_phi, z_theta, labels = _batch(2)
    acc = MuAccumulator(vocab_size=25)
    acc.add_logits(z_phi, z_theta, labels)
    back = MuAccumulator.from_state_dict(acc.state_dict())
    assert back.summary() == acc.summary()
    assert torch.equal(back.sum_delta, acc.sum_delta)


def test_empty_accumulator_and_bad_inputs_raise():
    acc = MuAccumulator()
    with pytest.raises(ValueError, match="no calibration tokens"):
        acc.mean()
    with pytest.raises(ValueError, match="finite"):
        acc.add_mu(torch.tensor([1.0, float("nan")]))
    acc.add_mu(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="unknown"):
        acc.estimate("mode")
    with pytest.raises(ValueError):
        acc.merge(MuAccumulator(vocab_size=3))


def _all_reduce_worker(rank: int, world: int, init: str, out: str) -> None:
    """One rank: accumulate its shard (with the μ validation), all-reduce, save the result."""
    import torch.distributed as dist

    from svd_ray.mu_validation import MuValidation

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        z_phi, z_theta, labels = _batch(3, n=60)
        rows = slice(rank * 30, (rank + 1) * 30)
        acc = MuAccumulator(vocab_size=25, validation=MuValidation())
        folds = torch.arange(60)[rows] % 5
        acc.add_logits(z_phi[rows, None], z_theta[rows, None], labels[rows, None], folds=folds)
        acc.all_reduce_()
        acc.score_candidates_()  # each rank scores its own records at the merged candidates; SUM all-reduce
        torch.save(acc.state_dict(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_processes_equals_one_process(tmp_path):
    """Two gloo ranks, each with half of the tokens: after all_reduce_ both hold the whole-data
    accumulator (μ* statistics, histogram, Σδ, the validation's fold sums and its exactly scored candidates)."""
    import torch.multiprocessing as mp

    from svd_ray.mu_validation import MuValidation

    mp.spawn(_all_reduce_worker, args=(2, f"file://{tmp_path}/pg", str(tmp_path)), nprocs=2, join=True)
    z_phi, z_theta, labels = _batch(3, n=60)
    whole = MuAccumulator(vocab_size=25, validation=MuValidation())
    whole.add_logits(z_phi[:, None], z_theta[:, None], labels[:, None], folds=torch.arange(60) % 5)
    whole.score_candidates_()
    for rank in (0, 1):
        got = MuAccumulator.from_state_dict(torch.load(tmp_path / f"rank{rank}.pt"))
        assert got.count == whole.count and got.min_mu == whole.min_mu and got.max_mu == whole.max_mu
        assert math.isclose(got.sum_mu, whole.sum_mu, rel_tol=1e-12)
        assert torch.equal(got.hist_count, whole.hist_count)
        torch.testing.assert_close(got.sum_delta, whole.sum_delta, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.validation.nll, whole.validation.nll, rtol=1e-12, atol=1e-10)
        assert got.validation.cand_names == whole.validation.cand_names == ["mean", "median", "sequence", "trimmed_mean"]
        torch.testing.assert_close(got.validation.cand_values, whole.validation.cand_values, rtol=1e-12, atol=0)
        torch.testing.assert_close(got.validation.cand_nll, whole.validation.cand_nll, rtol=1e-12, atol=1e-10)
        assert got.estimate("validated") == whole.estimate("validated")
        assert math.isclose(got.median(), whole.median(), rel_tol=1e-12)
