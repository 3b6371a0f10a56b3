"""Tests of nanosar/ablation.py: golden NMI values, token shares, bootstrap coverage, mean ± std, feature cache."""

import math

import numpy as np
import pytest
import torch

from nanosar.ablation import (
    cached_features,
    format_mean_std,
    head_logits_from_cache,
    mean_std,
    normalized_mutual_information,
    paired_bootstrap_ci,
    share_of_tokens,
)
from nanosar.model import SARConfig, Segmenter


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


def test_cached_features_give_the_same_logits():
    torch.manual_seed(0)
    model = Segmenter(SARConfig.preset("tiny"))
    x = torch.randn(3, 1, 64, 64) * 4 - 12                          # sigma0 in dB
    features = cached_features(model, x, batch=2)                    # two passes: 2 + 1 tiles, in eval mode
    assert model.training                                            # the caller's mode is restored
    model.eval()
    assert features.shape == (3, 4, model.cfg.embed_dim, 8, 8) and not features.requires_grad
    with torch.no_grad():
        expected = model(x).logits
        cached = head_logits_from_cache(model, features)
    assert cached.shape == expected.shape == (3, model.cfg.num_classes, 64, 64)
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-5)
