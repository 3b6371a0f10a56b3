"""Tests of nanosar/stats.py, the numbers of the routing ablation: golden NMI values and its chance level,
token shares, the Student t quantile and interval on hand-computed examples, bootstrap coverage, mean ± std,
and the separability classifier on cases with a known answer."""

import math

import numpy as np
import pytest

from nanosar.stats import (
    chance_nmi,
    format_mean_std,
    mean_std,
    normalized_mutual_information,
    paired_bootstrap_ci,
    separability,
    share_of_tokens,
    shuffle_within,
    student_t_quantile,
    t_interval,
)


def product_table(rows, cols):
    """Label arrays whose contingency table is exactly the outer product rows x cols (independent)."""
    a, b = [], []
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            a += [i] * (r * c)
            b += [j] * (r * c)
    return np.array(a), np.array(b)



def test_nmi_independent_is_zero():
    a, b = product_table([1, 2, 3], [1, 1, 2, 4])
    assert normalized_mutual_information(a, b) == pytest.approx(0.0, abs=1e-12)


def test_nmi_one_to_one_is_one():
    rng = np.random.default_rng(0)
    expert = rng.integers(0, 6, size=500)
    names = np.array(["S1", "ALOS2", "GF3", "ICEYE", "UAVSAR", "TSX"])  # a relabelling of the experts
    assert normalized_mutual_information(expert, names[expert]) == pytest.approx(1.0, abs=1e-12)


def test_nmi_hand_computed_table():
    # joint table of a = [0,0,1,1], b = [0,0,0,1]: p(0,0) = 1/2, p(1,0) = p(1,1) = 1/4
    # I = 1.5 ln 2 - 0.75 ln 3, H(A) = ln 2, H(B) = 2 ln 2 - 0.75 ln 3  -> NMI ~ 0.3456
    ln2, ln3 = math.log(2), math.log(3)
    expected = (1.5 * ln2 - 0.75 * ln3) / math.sqrt(ln2 * (2 * ln2 - 0.75 * ln3))
    value = normalized_mutual_information([0, 0, 1, 1], [0, 0, 0, 1])
    assert value == pytest.approx(expected, abs=1e-12)
    assert value == normalized_mutual_information([0, 0, 0, 1], [0, 0, 1, 1])  # symmetric


def test_nmi_zero_entropy_and_bad_input():
    assert normalized_mutual_information([3, 3, 3], [0, 1, 2]) == 0.0
    assert normalized_mutual_information([3, 3, 3], [1, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="same non-zero length"):
        normalized_mutual_information([0, 1], [0, 1, 2])


def test_share_of_tokens_rows_and_order():
    expert = np.array([0, 1, 1, 2, 2, 2, 0, 0])
    domain = np.array(["S1", "S1", "S1", "GF3", "GF3", "GF3", "ALOS2", "ALOS2"])
    table, names = share_of_tokens(expert, domain, n_experts=4)
    assert names == ["S1", "GF3", "ALOS2"]                      # first-appearance order, not sorted
    np.testing.assert_allclose(table, [[1 / 3, 2 / 3, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_allclose(table.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="expert ids"):
        share_of_tokens([0, 4], ["a", "b"], n_experts=4)


def test_bootstrap_covers_true_mean():
    diffs = np.random.default_rng(1).normal(0.5, 1.0, size=200)
    mean, low, high = paired_bootstrap_ci(diffs)
    assert low < 0.5 < high and low > 0.0
    assert mean == pytest.approx(diffs.mean()) and low < mean < high
    assert paired_bootstrap_ci(diffs) == (mean, low, high)       # deterministic for a seed


def test_bootstrap_coverage_is_near_nominal():
    rng = np.random.default_rng(2)
    hits = 0
    for rep in range(200):
        _, low, high = paired_bootstrap_ci(rng.normal(0.5, 1.0, size=30), n_boot=2000, seed=rep)
        hits += low <= 0.5 <= high
    assert 0.88 <= hits / 200 <= 0.99


def test_mean_std_and_format():
    mean, std = mean_std([17.5, 18.2, 18.9])
    assert mean == pytest.approx(18.2) and std == pytest.approx(0.7)  # ddof = 1
    assert format_mean_std([17.5, 18.2, 18.9]) == "18.2 ± 0.7"
    assert format_mean_std([18.24]) == "18.2" and math.isnan(mean_std([18.24])[1])


def test_shuffle_within_keeps_each_stratum_and_its_values():
    rng = np.random.default_rng(0)
    strata = np.array(["a", "b", "a", "b", "a", "c"])
    values = np.array([1, 2, 3, 4, 5, 6])
    shuffled = shuffle_within(values, strata, rng)
    for s in "abc":
        assert sorted(shuffled[strata == s]) == sorted(values[strata == s])
    with pytest.raises(ValueError, match="same length"):
        shuffle_within(values[:3], strata, rng)


def test_chance_nmi_is_what_the_strata_explain():
    """Experts that follow the land-cover class only, in domains whose class mixtures differ: the NMI with
    the domain is real but fully explained by the class, so it equals its chance level; routing by the
    domain itself rises far above it."""
    rng = np.random.default_rng(1)
    domain = np.repeat([0, 1], 5000)
    cls = np.where(domain == 0, rng.random(10000) < 0.8, rng.random(10000) < 0.3).astype(int)  # mixtures differ
    by_class = cls * 3 + rng.integers(0, 3, 10000)                           # experts 0-2 or 3-5 by class
    nmi, chance = normalized_mutual_information(by_class, domain), chance_nmi(by_class, domain, cls)
    assert nmi > 0.05 and chance == pytest.approx(nmi, abs=0.01)
    by_domain = domain * 3 + rng.integers(0, 3, 10000)
    assert normalized_mutual_information(by_domain, domain) > chance_nmi(by_domain, domain, cls) + 0.2


def test_student_t_quantile_golden_values():
    # two-sided 95 % critical values of the t table
    for df, t in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert student_t_quantile(0.975, df) == pytest.approx(t, abs=2e-4)
    assert student_t_quantile(0.025, 4) == pytest.approx(-2.7764, abs=2e-4)
    assert student_t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-9)
    assert student_t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=2e-4)      # the normal limit
    with pytest.raises(ValueError):
        student_t_quantile(1.0, 3)


def test_t_interval_hand_computed():
    # differences +1, +2, +3, +4, +5: mean 3, sample std sqrt(2.5), t(0.975, 4) = 2.776445
    mean, low, high = t_interval([1, 2, 3, 4, 5])
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert mean == 3.0 and low == pytest.approx(3 - half, abs=1e-5) and high == pytest.approx(3 + half, abs=1e-5)
    # five seeds whose differences straddle 0 give an interval containing 0
    assert t_interval([-1.0, 0.5, 1.0, -0.5, 0.4])[1] < 0 < t_interval([-1.0, 0.5, 1.0, -0.5, 0.4])[2]
    with pytest.raises(ValueError, match="at least 2"):
        t_interval([1.0])


def test_t_interval_coverage_is_near_nominal():
    rng = np.random.default_rng(3)
    hits = sum(low <= 0.5 <= high for low, high in (t_interval(rng.normal(0.5, 1.0, size=5))[1:] for _ in range(400)))
    assert 0.91 <= hits / 400 <= 0.985


def test_separability_of_a_factor_that_sets_the_mean_is_one():
    rng = np.random.default_rng(4)
    factor = rng.choice(["S1", "G3", "L2", "X1"], size=2000)
    codes = {"S1": 0.0, "G3": 1.0, "L2": 2.0, "X1": 3.0}
    features = np.stack([[codes[f] for f in factor], rng.normal(size=2000)], axis=1)   # column 0 = the factor
    accuracy, majority = separability(features[:1000], factor[:1000], features[1000:], factor[1000:])
    assert accuracy == 1.0 and 0.2 < majority < 0.3


def test_separability_of_an_independent_factor_is_the_majority_rate():
    rng = np.random.default_rng(5)
    factor = rng.choice(["a", "b", "c"], size=4000, p=[0.5, 0.3, 0.2])
    features = rng.normal(size=(4000, 3))                                               # nothing to learn
    accuracy, majority = separability(features[:2000], factor[:2000], features[2000:], factor[2000:])
    assert majority == pytest.approx(0.5, abs=0.03) and accuracy == pytest.approx(majority, abs=0.03)
