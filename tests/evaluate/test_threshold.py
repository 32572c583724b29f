"""Threshold rules on constructed data and against scikit-learn's ROC curve."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_curve

from pneumoscope.errors import ConfigError
from pneumoscope.evaluate.metrics import binary_metrics
from pneumoscope.evaluate.threshold import ThresholdSelector

FAST = settings(max_examples=25, deadline=None)

# 5 positives, 5 negatives, all scores distinct
Y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
P = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.1, 0.2, 0.4, 0.5, 0.65])


@st.composite
def validation_data(draw):
    n = draw(st.integers(4, 80))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1
    p = np.round(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1), 2)
    return y, p


def test_sensitivity_rule_hand_computed():
    sel = ThresholdSelector("sensitivity", target=0.8).fit(Y, P)
    # 4 of 5 positives needed: the 4th highest positive score is 0.6
    assert sel.threshold_ == 0.6
    assert sel.achieved_ == {"sensitivity": 0.8, "specificity": 0.8}  # only 0.65 of the negatives >= 0.6
    assert sel.rule_description_ == "sensitivity ≥ 0.8 on validation"


def test_specificity_rule_hand_computed():
    sel = ThresholdSelector("specificity", target=0.6).fit(Y, P)
    # at most 2 of 5 negatives at or above t: t = 0.5 (0.5, 0.65); t = 0.4 would add a third
    assert sel.threshold_ == 0.5
    assert sel.achieved_ == {"sensitivity": 0.8, "specificity": 0.6}
    assert sel.rule_description_ == "specificity ≥ 0.6 on validation"


def test_youden_hand_computed():
    sel = ThresholdSelector().fit(Y, P)
    # J at 0.6 = 0.8 + 0.8 - 1 = 0.6 is the maximum (0.7: 0.6+0.8-1 = 0.4; 0.3: 1+0.4-1 = 0.4)
    assert sel.threshold_ == 0.6
    assert sel.rule_description_ == "max Youden's J on validation"


def test_fixed_rule_records_what_it_achieves():
    sel = ThresholdSelector("fixed", target=0.5).fit(Y, P)
    m = binary_metrics(Y, P, 0.5)
    assert sel.threshold_ == 0.5
    assert sel.achieved_ == {"sensitivity": m["sensitivity"], "specificity": m["specificity"]}
    assert sel.rule_description_ == "fixed threshold 0.5"


@FAST
@given(validation_data())
def test_youden_is_argmax_of_sklearn_roc(data):
    y, p = data
    sel = ThresholdSelector("youden").fit(y, p)
    fpr, tpr, thr = roc_curve(y, p)
    i = int(np.argmax(tpr - fpr))
    if math.isfinite(thr[i]):
        assert sel.threshold_ == thr[i]
    achieved_j = sel.achieved_["sensitivity"] + sel.achieved_["specificity"] - 1
    assert achieved_j == pytest.approx((tpr - fpr)[i])


@FAST
@given(validation_data(), st.sampled_from([0.5, 0.8, 0.9, 0.95, 0.98, 1.0]))
def test_sensitivity_target_met_by_the_largest_such_threshold(data, target):
    y, p = data
    sel = ThresholdSelector("sensitivity", target=target).fit(y, p)
    assert sel.achieved_["sensitivity"] >= target
    higher = np.unique(p)[np.unique(p) > sel.threshold_]
    if higher.size:  # the next larger candidate misses the target
        assert binary_metrics(y, p, higher[0])["sensitivity"] < target


@FAST
@given(validation_data(), st.sampled_from([0.5, 0.8, 0.9, 0.95, 1.0]))
def test_specificity_target_met_by_the_smallest_such_threshold(data, target):
    y, p = data
    sel = ThresholdSelector("specificity", target=target).fit(y, p)
    assert sel.achieved_["specificity"] >= target
    lower = np.unique(p)[np.unique(p) < sel.threshold_]
    if lower.size:
        assert binary_metrics(y, p, lower[-1])["specificity"] < target


def test_useless_scores_give_a_finite_threshold_above_all_scores():
    # positives score lower than negatives: J <= 0 everywhere, best is "call nothing positive"
    sel = ThresholdSelector("youden").fit([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9])
    assert math.isfinite(sel.threshold_) and sel.threshold_ > 0.9
    assert sel.achieved_ == {"sensitivity": 0.0, "specificity": 1.0}


def test_fit_uses_only_the_arrays_given_and_keeps_none_of_them():
    """The selector sees exactly the validation arrays passed to fit, keeps no copy, and predict takes no labels."""
    y_val, p_val = Y.copy(), P.copy()
    y_val.setflags(write=False)
    p_val.setflags(write=False)  # fit cannot modify them
    sel = ThresholdSelector("sensitivity", target=0.8).fit(y_val, p_val)
    assert set(vars(sel)) == {"rule", "target", "threshold_", "achieved_", "rule_description_"}
    assert not any(isinstance(v, np.ndarray) for v in vars(sel).values())
    # a second selector fitted on equal arrays learns the same: nothing else leaks in
    assert ThresholdSelector("sensitivity", target=0.8).fit(Y.copy(), P.copy()).to_dict() == sel.to_dict()
    # applying it to test scores does not refit
    before = sel.to_dict()
    sel.predict(np.random.default_rng(0).random(100))
    assert sel.to_dict() == before


def test_round_trip_through_json():
    sel = ThresholdSelector("specificity", target=0.6).fit(Y, P)
    restored = ThresholdSelector.from_dict(json.loads(json.dumps(sel.to_dict())))
    assert restored.to_dict() == sel.to_dict()
    np.testing.assert_array_equal(restored.predict(P), sel.predict(P))
    np.testing.assert_array_equal(sel.predict(P), (P >= 0.5).astype(int))


@pytest.mark.parametrize(
    "rule, target, match",
    [("f1", None, "unknown rule"), ("sensitivity", None, "needs a target"), ("specificity", 1.2, r"\[0, 1\]"),
     ("youden", 0.9, "no target")],
)  # fmt: skip
def test_bad_rules_raise_config_error(rule, target, match):
    with pytest.raises(ConfigError, match=match):
        ThresholdSelector(rule, target).fit(Y, P)


def test_one_class_and_unfitted_are_refused():
    with pytest.raises(ValueError, match="both classes"):
        ThresholdSelector("youden").fit([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(NotFittedError):
        ThresholdSelector().predict(P)
