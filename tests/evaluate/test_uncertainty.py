"""Entropy, mutual information, selective prediction and referral thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import entropy

from pneumoscope.evaluate.uncertainty import (
    fit_refer_threshold,
    mutual_information,
    predictive_entropy,
    refer_flags,
    selective_prediction_curve,
)


def test_predictive_entropy_binary_and_multiclass():
    np.testing.assert_allclose(predictive_entropy(np.array([0.5, 0.0, 1.0])), [math.log(2), 0.0, 0.0])
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=20)
    np.testing.assert_allclose(predictive_entropy(probs), entropy(probs, axis=1))
    p = rng.random(20)
    np.testing.assert_allclose(predictive_entropy(p), predictive_entropy(np.c_[1 - p, p]))
    with pytest.raises(ValueError, match="probabilities"):
        predictive_entropy(np.array([1.5, 0.2]))


def test_mutual_information_hand_computed():
    samples = np.array([[0.0, 0.7, 0.5], [1.0, 0.7, 0.5]])  # (S=2, N=3)
    # case 0: the samples disagree completely (H(mean)=log 2, mean H=0); cases 1, 2: they agree
    np.testing.assert_allclose(mutual_information(samples), [math.log(2), 0.0, 0.0], atol=1e-12)
    rng = np.random.default_rng(1)
    s = rng.dirichlet(np.ones(3), size=(8, 30))  # (S, N, C)
    mi = mutual_information(s)
    assert mi.shape == (30,)
    assert (mi >= 0).all() and (mi <= predictive_entropy(s.mean(0)) + 1e-12).all()


def test_selective_curve_hand_computed():
    y = np.array([1, 0, 1, 1])
    p = np.array([0.9, 0.8, 0.2, 0.7])  # decisions 1, 1, 0, 1 -> correct 1, 0, 0, 1
    u = np.array([0.1, 0.4, 0.3, 0.2])  # most certain first: case 0, 3, 2, 1
    c = selective_prediction_curve(y, p, u, threshold=0.5)
    np.testing.assert_allclose(c["coverage"], [1.0, 0.75, 0.5, 0.25])
    np.testing.assert_allclose(c["accuracy"], [0.5, 2 / 3, 1.0, 1.0])
    assert c["auc"] == pytest.approx((0.5 + 2 / 3 + 1 + 1) / 4)
    assert c["aurc"] == pytest.approx(1 - c["auc"])


def test_ties_in_uncertainty_give_the_expected_curve():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.9, 0.9, 0.9])  # correct 1, 0, 1, 0
    c = selective_prediction_curve(y, p, np.zeros(4))
    np.testing.assert_allclose(c["accuracy"], 0.5)  # not 1 or 0 depending on sort order


def test_informative_uncertainty_raises_accuracy_at_low_coverage():
    rng = np.random.default_rng(2)
    p = rng.random(4000)
    y = (rng.random(4000) < p).astype(int)  # calibrated: cases near 0.5 are coin flips
    c = selective_prediction_curve(y, p, predictive_entropy(p))
    at_20 = c["accuracy"][np.searchsorted(-c["coverage"], -0.2)]
    assert at_20 > c["accuracy"][0] + 0.1
    noise = selective_prediction_curve(y, p, rng.random(4000))
    assert c["auc"] > noise["auc"] + 0.05  # random uncertainty does not help


def test_selective_curve_multiclass_uses_argmax():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]])
    c = selective_prediction_curve([0, 1, 1], probs, predictive_entropy(probs))
    assert c["accuracy"][0] == pytest.approx(2 / 3)


def test_fit_refer_threshold_and_flags():
    u = np.arange(10, dtype=float)
    t = fit_refer_threshold(u, 0.2)
    assert t == 7.5  # midway between the largest kept (7) and the smallest referred (8)
    assert refer_flags(u, uncertainty_threshold=t).tolist() == [False] * 8 + [True] * 2
    assert refer_flags(u, refer_fraction=0.2).sum() == 2
    assert refer_flags(u).sum() == 1  # default 10 %
    assert not refer_flags(u, refer_fraction=0.0).any()
    assert refer_flags(u, refer_fraction=1.0).all()
    with pytest.raises(ValueError, match="not both"):
        refer_flags(u, refer_fraction=0.1, uncertainty_threshold=3.0)


def test_ties_are_never_split_so_at_most_the_fraction_is_referred():
    u = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    t = fit_refer_threshold(u, 0.5)  # 3 wanted, but the top 4 are tied
    assert refer_flags(u, uncertainty_threshold=t).sum() == 0


def test_threshold_fitted_on_validation_refers_about_that_fraction_of_new_cases():
    rng = np.random.default_rng(3)
    t = fit_refer_threshold(rng.gamma(2.0, size=5000), 0.1)
    test_fraction = refer_flags(rng.gamma(2.0, size=5000), uncertainty_threshold=t).mean()
    assert test_fraction == pytest.approx(0.1, abs=0.02)
