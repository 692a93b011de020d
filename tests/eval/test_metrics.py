"""Metrics against hand-computed values (both TruthfulQA conventions, ties, -inf)."""
import math

import numpy as np
import pytest
import torch

from svd_ray.eval import metrics as M

LN = math.log


# --------------------------------------------------------------------------- acc / acc_norm
def test_acc_simple():
    assert M.acc([-1.0, -2.0, -3.0], [1, 0, 0]) == 1.0
    assert M.acc([-3.0, -2.0, -1.0], [1, 0, 0]) == 0.0
    assert M.acc(torch.tensor([-3.0, -0.5]), torch.tensor([0, 1])) == 1.0


def test_acc_norm_divides_by_length():
    lls, labels = [-1.0, -2.0, -3.0], [1, 0, 0]
    # per-byte scores -0.1, -2, -3 -> choice 0 wins
    assert M.acc_norm(lls, labels, [10, 1, 1]) == 1.0
    # per-byte scores -1, -0.2, -0.3 -> choice 1 wins
    assert M.acc_norm(lls, labels, [1, 10, 10]) == 0.0


def test_choice_lengths_bytes_and_delimiter():
    assert M.choice_lengths([" ab", " é"]) == [2, 2]  # é is 2 UTF-8 bytes; leading space dropped
    assert M.choice_lengths([" ab", " é"], unit="chars") == [2, 1]
    assert M.choice_lengths([" ab"], strip_delimiter=False) == [3]


@pytest.mark.parametrize(
    "labels, strict, first, fractional",
    [([1, 0, 0], 0.0, 1.0, 0.5), ([0, 1, 0], 0.0, 0.0, 0.5), ([1, 1, 0], 1.0, 1.0, 1.0), ([0, 0, 1], 0.0, 0.0, 0.0)],
)
def test_ties(labels, strict, first, fractional):
    lls = [-1.0, -1.0, -2.0]
    assert M.acc(lls, labels, ties="strict") == strict
    assert M.acc(lls, labels, ties="first") == first
    assert M.acc(lls, labels, ties="fractional") == fractional


def test_neg_inf_never_nan():
    inf = -math.inf
    for lls in ([inf, inf], [inf, -1.0], [-1.0, inf]):
        for fn in (M.acc, M.mc2, M.mc3, M.paper_mc2, M.paper_mc3):
            v = fn(lls, [1, 0])
            assert not math.isnan(v)
    assert M.acc([inf, inf], [1, 0]) == 0.0
    assert M.acc([inf, inf], [1, 0], ties="fractional") == 0.5
    assert M.mc2([inf, inf], [1, 0]) == 0.0
    assert M.mc2([inf, -1.0], [1, 0]) == 0.0
    assert M.mc2([-1.0, inf], [1, 0]) == 1.0
    assert M.mc3([inf, inf], [1, 0]) == 0.0
    assert M.mc3([-1.0, inf], [1, 0]) == 1.0
    assert M.acc_norm([inf, -5.0], [0, 1], [3, 4]) == 1.0


def test_invalid_inputs():
    with pytest.raises(ValueError):
        M.acc([float("nan"), -1.0], [1, 0])
    with pytest.raises(ValueError):
        M.acc([math.inf, -1.0], [1, 0])
    with pytest.raises(ValueError):
        M.acc([-1.0, -2.0], [0, 0])
    with pytest.raises(ValueError):
        M.acc([-1.0, -2.0], [1, 0, 0])
    with pytest.raises(ValueError):
        M.acc([-1.0, -2.0], [1, 0], ties="random")
    with pytest.raises(ValueError):
        M.mc1([-1.0, -2.0, -3.0], [1, 1, 0])
    with pytest.raises(ValueError):
        M.acc_norm([-1.0, -2.0], [1, 0], [0, 3])


# --------------------------------------------------------------------------- TruthfulQA
def test_mc2_is_normalised_true_mass():
    assert M.mc2([LN(0.5), LN(0.3), LN(0.2)], [1, 0, 1]) == pytest.approx(0.7)
    # unnormalised probabilities: 0.14 / 0.2
    assert M.mc2([LN(0.1), LN(0.06), LN(0.04)], [1, 0, 1]) == pytest.approx(0.7)
    # very negative lls would underflow naively (0/0); log-sum-exp keeps 1/(1+e^-1)
    assert M.mc2([-1000.0, -1001.0], [1, 0]) == pytest.approx(1 / (1 + math.exp(-1)))


def test_mc3_share_of_trues_above_best_false():
    assert M.mc3([-1.0, -2.0, -3.0, -1.5], [1, 1, 0, 0]) == 0.5
    assert M.mc3([-1.0, -1.2, -3.0], [1, 1, 0]) == 1.0
    assert M.mc3([-1.0, -1.0], [1, 0]) == 0.0  # tie with a false answer does not count


def test_truthfulqa_both_conventions_hand_computed():
    mc1_lls, mc1_labels = [-2.0, -1.0, -3.0], [1, 0, 0]
    mc2_lls, mc2_labels = [LN(0.4), LN(0.1), LN(0.3), LN(0.2)], [1, 1, 0, 0]
    got = M.truthfulqa_mc_metrics(mc1_lls, mc1_labels, mc2_lls, mc2_labels)
    assert got["mc1"] == 0.0 and got["paper_mc1"] == 0.0
    assert got["mc2"] == pytest.approx(0.5)  # (0.4 + 0.1) / 1.0
    assert got["mc3"] == pytest.approx(0.5)  # 0.4 > 0.3 yes, 0.1 > 0.3 no
    assert got["paper_mc2"] == 1.0  # top choice (0.4) is true
    assert got["paper_mc3"] == pytest.approx(0.5)  # normalised mass on trues


def test_paper_mc2_differs_from_standard():
    # top choice true, but most mass on false answers
    lls, labels = [LN(0.3), LN(0.25), LN(0.25), LN(0.2)], [1, 0, 0, 0]
    assert M.paper_mc2(lls, labels) == 1.0
    assert M.mc2(lls, labels) == pytest.approx(0.3)
    assert M.paper_mc3(lls, labels) == pytest.approx(0.3)
    assert M.mc3(lls, labels) == 1.0


def test_mc1_ties_strict_vs_first():
    # MC1's correct answer is listed first in TruthfulQA: "first" tie-breaking favours it
    assert M.mc1([-1.0, -1.0, -2.0], [1, 0, 0]) == 0.0
    assert M.mc1([-1.0, -1.0, -2.0], [1, 0, 0], ties="first") == 1.0


# --------------------------------------------------------------------------- exact match
def test_exact_match():
    assert M.exact_match(" 7\n\nQ: 1 + 1 = ?", ["7"]) == 1.0
    assert M.exact_match(" 7.", ["7"]) == 1.0
    assert M.exact_match(" 17", ["7"]) == 0.0
    assert M.exact_match("", ["7"]) == 0.0


# --------------------------------------------------------------------------- aggregation / CIs
def test_mean_and_mean_dict():
    assert M.mean([1, 0, 0, 1]) == 0.5
    assert M.mean_dict([{"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 0.0}]) == {"a": 0.5, "b": 0.0}


def test_normal_ci_hand_computed():
    ci = M.normal_ci([0, 1, 0, 1])
    half = 1.959963984540054 * math.sqrt(1 / 3) / 2  # z * s / sqrt(n), s = sqrt(1/3)
    assert ci.mean == 0.5
    assert ci.low == pytest.approx(0.5 - half)
    assert ci.high == pytest.approx(0.5 + half)
    assert ci.n == 4 and ci.method == "normal"


def test_bootstrap_ci_seeded_and_sane():
    rng = np.random.default_rng(123)
    scores = (rng.random(400) < 0.3).astype(float)
    a = M.bootstrap_ci(scores, n_resamples=2000, seed=7)
    b = M.bootstrap_ci(scores, n_resamples=2000, seed=7)
    c = M.bootstrap_ci(scores, n_resamples=2000, seed=8)
    assert a == b
    assert (a.low, a.high) != (c.low, c.high)
    assert a.low < a.mean < a.high
    normal = M.normal_ci(scores)
    assert a.low == pytest.approx(normal.low, abs=0.01)
    assert a.high == pytest.approx(normal.high, abs=0.01)


def test_bootstrap_constant_and_single():
    ci = M.bootstrap_ci([1.0, 1.0, 1.0], n_resamples=100)
    assert ci.low == ci.high == ci.mean == 1.0
    assert M.bootstrap_ci([0.25], n_resamples=10).low == 0.25
    with pytest.raises(ValueError):
        M.bootstrap_ci([])
    with pytest.raises(ValueError):
        M.normal_ci([1.0])


def test_paired_bootstrap():
    a = [1.0, 1.0, 0.0, 1.0]
    b = [0.0, 1.0, 0.0, 0.0]
    ci = M.paired_bootstrap_ci(a, b, n_resamples=500, seed=0)
    assert ci.mean == 0.5 and ci.low <= 0.5 <= ci.high
    with pytest.raises(ValueError):
        M.paired_bootstrap_ci([1.0], [1.0, 0.0])
