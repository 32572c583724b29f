"""Metrics against scikit-learn on random data and against numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from pneumoscope.evaluate.metrics import (
    BINARY_METRIC_KEYS,
    MetricAccumulator,
    _binary_metrics_batched,
    _multiclass_metrics_batched,
    binary_metrics,
    counts_text,
    multiclass_metrics,
)

FAST = settings(max_examples=25, deadline=None)


@st.composite
def binary_data(draw, min_size: int = 2, max_size: int = 60):
    """Labels with both classes and probabilities rounded to 2 decimals (so ties occur)."""
    n = draw(st.integers(min_size, max_size))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1
    p = np.round(rng.random(n), 2)
    return y, p


# ---- binary_metrics: hand-computed case ------------------------------------------------------


def test_binary_metrics_hand_computed():
    # pred at 0.5 = [0, 1, 0, 1, 1] -> TN (0.1), FP (0.6), FN (0.4), TP (0.8, 0.9)
    m = binary_metrics(np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.6, 0.4, 0.8, 0.9]), threshold=0.5)
    assert (m["n"], m["n_pos"], m["n_neg"]) == (5, 3, 2)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["threshold"] == 0.5
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["npv"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 / 3)  # 2*2 / (2*2 + 1 + 1)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # F1 of class 0: 2*1 / (2*1 + 1 + 1)
    # 6 (pos, neg) pairs; only (0.4 vs 0.6) is misordered
    assert m["auroc"] == pytest.approx(5 / 6)
    # ranked 0.9 P, 0.8 P, 0.6 N, 0.4 P: AP = 1/3*1 + 1/3*1 + 1/3*3/4
    assert m["pr_auc"] == pytest.approx(11 / 12)
    assert m["brier"] == pytest.approx((0.01 + 0.36 + 0.36 + 0.04 + 0.01) / 5)
    assert list(m) == list(BINARY_METRIC_KEYS)


def test_score_equal_to_threshold_counts_as_positive():
    m = binary_metrics([0, 1], [0.3, 0.3], threshold=0.3)
    assert (m["tp"], m["fp"]) == (1, 1)


def test_single_class_gives_nan_not_exception():
    m = binary_metrics([1, 1, 1], [0.2, 0.7, 0.9])
    assert math.isnan(m["auroc"]) and math.isnan(m["pr_auc"])
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert math.isnan(m["specificity"])  # no negatives
    assert m["npv"] == 0.0  # one negative call (0.2), and it was wrong
    m0 = binary_metrics([0, 0], [0.1, 0.2])
    assert math.isnan(m0["precision"])  # no positive calls
    assert math.isnan(m0["sensitivity"]) and math.isnan(m0["f1"])
    assert m0["f1_macro"] == 1.0  # only class 0 is defined, and it is perfect
    assert math.isnan(m0["auroc"]) and math.isnan(m0["pr_auc"])


@pytest.mark.parametrize(
    "y, p, match",
    [
        ([0, 1, 2], [0.1, 0.2, 0.3], "labels in 0..1"),
        ([0, 1], [0.1, 1.7], "logits"),
        ([0, 1], [0.1], "has 1 values"),
        ([0, 1], [0.1, np.nan], "NaN"),
        ([], [], "empty"),
        ([0.5, 1.0], [0.1, 0.2], "integer class labels"),
    ],
)
def test_binary_metrics_rejects_bad_input(y, p, match):
    with pytest.raises(ValueError, match=match):
        binary_metrics(np.asarray(y), np.asarray(p))


@FAST
@given(binary_data(), st.sampled_from([0.2, 0.5, 0.73]))
def test_binary_metrics_match_sklearn(data, threshold):
    y, p = data
    pred = (p >= threshold).astype(int)
    m = binary_metrics(y, p, threshold)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (tn, fp, fn, tp)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    kw = {"zero_division": np.nan}
    np.testing.assert_allclose(m["precision"], precision_score(y, pred, **kw))
    np.testing.assert_allclose(m["sensitivity"], recall_score(y, pred, **kw))
    np.testing.assert_allclose(m["specificity"], tn / (tn + fp))
    np.testing.assert_allclose(m["npv"], precision_score(y, pred, pos_label=0, **kw))
    np.testing.assert_allclose(m["f1"], f1_score(y, pred, **kw))
    np.testing.assert_allclose(m["f1_macro"], f1_score(y, pred, average="macro", labels=[0, 1], **kw))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))


@FAST
@given(binary_data(min_size=2, max_size=40), st.integers(0, 2**32 - 1), st.sampled_from([0.3, 0.5]))
def test_batched_kernel_equals_binary_metrics_on_expanded_data(data, seed, threshold):
    """The vectorised bootstrap kernel must give exactly binary_metrics on the repeated rows."""
    y, p = data
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 3, size=(6, y.size))
    counts[:, 0] += 1  # no empty resample
    counts[0] = 0
    counts[0, 0] = 2  # a resample with only class 0: NaN ranking metrics
    batched = _binary_metrics_batched(y, p, counts, threshold)
    for b in range(counts.shape[0]):
        ref = binary_metrics(np.repeat(y, counts[b]), np.repeat(p, counts[b]), threshold)
        for k in BINARY_METRIC_KEYS:
            np.testing.assert_allclose(batched[k][b], ref[k], rtol=1e-10, atol=1e-12, equal_nan=True, err_msg=k)


# ---- multiclass -------------------------------------------------------------------------------


def test_multiclass_hand_computed():
    y = np.array([0, 1, 2, 2])
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # -> 0 correct
            [0.5, 0.4, 0.1],  # -> 0, true 1
            [0.1, 0.2, 0.7],  # -> 2 correct
            [0.2, 0.6, 0.2],  # -> 1, true 2
        ]
    )
    m = multiclass_metrics(y, probs, ["normal", "bacterial", "viral"])
    assert m["confusion"] == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]
    assert m["accuracy"] == pytest.approx(0.5)
    n = m["per_class"]["normal"]
    assert (n["precision"], n["recall"], n["support"]) == (pytest.approx(0.5), 1.0, 1)
    assert n["specificity"] == pytest.approx(2 / 3)  # 3 non-normal cases, one called normal
    v = m["per_class"]["viral"]
    assert (v["precision"], v["recall"], v["specificity"]) == (1.0, 0.5, 1.0)
    b = m["per_class"]["bacterial"]
    assert (b["precision"], b["recall"], b["f1"]) == (0.0, 0.0, 0.0)  # 1 FP, 1 FN: defined, zero
    assert b["auroc_ovr"] == pytest.approx(2 / 3)  # its score 0.4 beats 0.2 and 0.2, not 0.6
    assert m["macro_recall"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert "tp" not in m  # binary keys only for two classes


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(3, 5), st.integers(30, 120))
def test_multiclass_matches_sklearn(seed, n_classes, n):
    rng = np.random.default_rng(seed)
    y = np.r_[np.arange(n_classes), rng.integers(0, n_classes, n - n_classes)]
    probs = rng.dirichlet(np.ones(n_classes), size=n)
    names = [f"c{k}" for k in range(n_classes)]
    m = multiclass_metrics(y, probs, names)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    kw = {"average": "macro", "zero_division": np.nan}
    np.testing.assert_allclose(m["macro_precision"], precision_score(y, pred, **kw))
    np.testing.assert_allclose(m["macro_recall"], recall_score(y, pred, **kw))
    np.testing.assert_allclose(m["macro_f1"], f1_score(y, pred, **kw))
    assert m["macro_auroc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    cm = confusion_matrix(y, pred, labels=list(range(n_classes)))
    assert m["confusion"] == cm.tolist()
    for k, name in enumerate(names):
        pc = m["per_class"][name]
        assert pc["auroc_ovr"] == pytest.approx(roc_auc_score(y == k, probs[:, k]))
        # specificity computed independently: recall of "not k" in the one-vs-rest problem
        assert pc["specificity"] == pytest.approx(recall_score(y != k, pred != k))
        assert pc["support"] == int((y == k).sum())


def test_multiclass_two_classes_agrees_with_binary():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80)
    p1 = np.round(rng.random(80), 1)  # many exact 0.5 ties
    probs = np.c_[1 - p1, p1]
    m = multiclass_metrics(y, probs, ["NORMAL", "PNEUMONIA"])
    b = binary_metrics(y, p1, 0.5)
    for k, v in b.items():
        np.testing.assert_allclose(m[k], v, err_msg=k)
    assert m["confusion"] == [[b["tn"], b["fp"]], [b["fn"], b["tp"]]]
    assert m["per_class"]["PNEUMONIA"]["recall"] == pytest.approx(b["sensitivity"])
    assert m["per_class"]["NORMAL"]["recall"] == pytest.approx(b["specificity"])


def test_multiclass_absent_class_leaves_it_out_of_macro_auroc():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1]])
    m = multiclass_metrics(y, probs, ["a", "b", "c"])
    assert math.isnan(m["per_class"]["c"]["auroc_ovr"])
    assert m["macro_auroc"] == pytest.approx((m["per_class"]["a"]["auroc_ovr"] + m["per_class"]["b"]["auroc_ovr"]) / 2)


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(2, 4), st.integers(4, 40))
def test_multiclass_batched_kernel_equals_multiclass_metrics_on_expanded_data(seed, n_classes, n):
    rng = np.random.default_rng(seed)
    y = np.r_[np.arange(n_classes), rng.integers(0, n_classes, n)]
    probs = np.round(rng.dirichlet(np.ones(n_classes), size=y.size), 1)  # ties, and exact 0.5 for C = 2
    names = [f"c{k}" for k in range(n_classes)]
    counts = rng.integers(0, 3, size=(5, y.size))
    counts[:, 0] += 1
    counts[0] = 0
    counts[0, :2] = 1  # a resample that lost most classes
    batched = _multiclass_metrics_batched(y, probs, counts, names)
    for b in range(counts.shape[0]):
        ref = multiclass_metrics(np.repeat(y, counts[b]), np.repeat(probs, counts[b], axis=0), names)
        flat = {k: v for k, v in ref.items() if k not in ("per_class", "confusion")}
        flat.update({f"per_class.{c}.{m}": v for c, d in ref["per_class"].items() for m, v in d.items()})
        assert set(flat) == set(batched)
        for k, v in flat.items():
            np.testing.assert_allclose(batched[k][b], v, rtol=1e-10, atol=1e-12, equal_nan=True, err_msg=k)


def test_multiclass_rejects_mismatched_names():
    with pytest.raises(ValueError, match="columns"):
        multiclass_metrics([0, 1], np.full((2, 3), 1 / 3), ["a", "b"])


# ---- accumulator and text ------------------------------------------------------------------------


def test_accumulator_equals_one_shot_and_resets():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p = rng.random(50)
    acc = MetricAccumulator()
    for s in range(0, 50, 16):
        acc.update(y[s : s + 16], p[s : s + 16, None])  # (B, 1) as a sigmoid head gives
    assert len(acc) == 50
    assert acc.compute(0.4) == binary_metrics(y, p, 0.4)
    acc.reset()
    assert len(acc) == 0
    with pytest.raises(ValueError, match="before any update"):
        acc.compute()


def test_accumulator_takes_torch_tensors():
    torch = pytest.importorskip("torch")
    acc = MetricAccumulator()
    acc.update(torch.tensor([0, 1, 1]), torch.tensor([0.2, 0.9, 0.4], requires_grad=True))
    assert acc.compute()["tp"] == 1


def test_accumulator_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="batch shapes differ"):
        MetricAccumulator().update([0, 1], [0.5])


def test_counts_text():
    assert counts_text(580, 624) == "92.9 % (580/624)"
    assert counts_text(np.int64(1), 3, decimals=2) == "33.33 % (1/3)"
    assert counts_text(0, 0) == "n/a (0/0)"
    with pytest.raises(ValueError):
        counts_text(5, 4)
    with pytest.raises(TypeError):
        counts_text(2.5, 4)  # type: ignore[arg-type]
