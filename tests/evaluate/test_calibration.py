"""Temperature scaling recovers a known temperature; ECE and reliability curves by hand and vs sklearn."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit, softmax
from sklearn.calibration import calibration_curve
from sklearn.exceptions import NotFittedError
from sklearn.metrics import log_loss, roc_auc_score

from pneumoscope.evaluate.calibration import TemperatureScaler, expected_calibration_error, reliability_curve


def _binary_overconfident(n: int, seed: int, factor: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(true logit); the 'model' reports factor * true logit."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < expit(z)).astype(int)
    return factor * z, y


def test_recovers_known_binary_temperature_and_improves_nll_and_ece():
    logits, y = _binary_overconfident(20000, seed=0)
    ts = TemperatureScaler().fit(logits, y)
    assert ts.temperature_ == pytest.approx(3.0, rel=0.08)
    assert ts.nll_after_ < ts.nll_before_
    raw, calibrated = expit(logits), ts.transform(logits)
    assert expected_calibration_error(y, calibrated) < 0.5 * expected_calibration_error(y, raw)
    # the NLL it minimised is the usual log loss
    assert ts.nll_after_ == pytest.approx(log_loss(y, calibrated), rel=1e-9)
    # a monotone map: ranking and AUROC unchanged
    assert roc_auc_score(y, calibrated) == pytest.approx(roc_auc_score(y, raw))


def test_recovers_known_multiclass_temperature():
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 1.5, size=(20000, 3))
    y = np.array([rng.choice(3, p=row) for row in softmax(z, axis=1)])
    ts = TemperatureScaler().fit(3.0 * z, y)
    assert ts.temperature_ == pytest.approx(3.0, rel=0.08)
    probs = ts.transform(3.0 * z)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_array_equal(probs.argmax(1), z.argmax(1))
    assert ts.nll_after_ == pytest.approx(log_loss(y, probs), rel=1e-9)
    assert expected_calibration_error(y, probs) < 0.5 * expected_calibration_error(y, softmax(3.0 * z, axis=1))


def test_calibrated_logits_keep_temperature_near_one():
    logits, y = _binary_overconfident(20000, seed=2, factor=1.0)
    assert TemperatureScaler().fit(logits, y).temperature_ == pytest.approx(1.0, abs=0.08)


def test_round_trip_and_unfitted():
    logits, y = _binary_overconfident(500, seed=3)
    ts = TemperatureScaler().fit(logits, y)
    again = TemperatureScaler.from_dict(ts.to_dict())
    np.testing.assert_array_equal(again.transform(logits), ts.transform(logits))
    with pytest.raises(NotFittedError):
        TemperatureScaler().transform(logits)
    with pytest.raises(ValueError, match="labels"):
        TemperatureScaler().fit(np.zeros(3), [0, 1, 2])


def test_binary_ece_hand_computed():
    # 10 bins: 0.05 -> bin 0 (gap 0.05), 0.15 -> bin 1 (gap 0.15), 0.95 x2 -> bin 9 (mean y 0.5, gap 0.45)
    ece = expected_calibration_error([0, 0, 1, 0], [0.05, 0.15, 0.95, 0.95], n_bins=10)
    assert ece == pytest.approx((0.05 + 0.15 + 2 * 0.45) / 4)


def test_top_label_ece_hand_computed():
    probs = np.array([[0.85, 0.15], [0.65, 0.35], [0.25, 0.75]])
    # confidences 0.85 (right), 0.65 (wrong), 0.75 (right), each alone in its bin
    ece = expected_calibration_error([0, 1, 1], probs, n_bins=10)
    assert ece == pytest.approx((0.15 + 0.65 + 0.25) / 3)
    assert reliability_curve([0, 1, 1], probs)["kind"] == "top-label"


def test_ece_near_zero_when_calibrated_and_large_when_not():
    rng = np.random.default_rng(4)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.02
    over = np.where(p > 0.5, 1 - (1 - p) ** 3, p**3)  # pushed towards 0 and 1
    assert expected_calibration_error(y, over) > 0.1


def test_reliability_curve_matches_sklearn_calibration_curve():
    rng = np.random.default_rng(5)
    p = np.r_[0.0, 0.2, 0.5, 1.0, np.round(rng.random(300) ** 2, 2)]  # bin edges included
    y = (rng.random(p.size) < p).astype(int)
    curve = reliability_curve(y, p, n_bins=10)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    filled = curve["counts"] > 0
    np.testing.assert_allclose(curve["accuracy"][filled], prob_true)
    np.testing.assert_allclose(curve["confidence"][filled], prob_pred)
    assert curve["counts"].sum() == p.size
    assert np.isnan(curve["accuracy"][~filled]).all()
    np.testing.assert_allclose(curve["bin_centers"], np.arange(0.05, 1.0, 0.1))
    assert curve["ece"] == pytest.approx(expected_calibration_error(y, p, n_bins=10))


def test_ece_rejects_logits():
    with pytest.raises(ValueError, match="logits"):
        expected_calibration_error([0, 1], [-2.0, 3.0])
