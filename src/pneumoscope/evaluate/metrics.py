"""Classification metrics as pure functions over numpy arrays, plus a small accumulator.

The shape follows MONAI (``compute_roc_auc`` / ``ROCAUCMetric``): a pure function that maps
arrays to numbers, and a class that only collects batches and calls the function once at the end,
so a metric computed inside a training loop is exactly the metric computed offline.

Every number comes from scikit-learn where scikit-learn has it (``confusion_matrix``,
``precision_recall_fscore_support``, ``roc_auc_score``, ``average_precision_score``,
``brier_score_loss``, ``accuracy_score``). Written here, because scikit-learn has no such thing,
and tested against it: per-class specificity in the multiclass case, and the vectorised kernels
(``binary_metrics.batched``, ``multiclass_metrics.batched``) that evaluate a thousand bootstrap
resamples in one pass, where a thousand scikit-learn calls would take 5-20 s.

Conventions that matter clinically:

* a case is called positive when ``prob >= threshold`` (the same rule as ``sklearn.metrics.roc_curve``,
  so an operating point picked on an ROC curve reproduces exactly here);
* a ratio whose denominator is zero (precision with no positive calls, specificity with no
  negatives, ...) is NaN, never a silent 0 or 1: ``zero_division=np.nan`` throughout;
* AUROC and PR-AUC are NaN when ``y_true`` holds only one class instead of raising, because small
  subgroups and bootstrap resamples hit that case routinely.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from pneumoscope.evaluate._checks import check_labels, check_prob, check_probs_2d, to_numpy

logger = logging.getLogger(__name__)

__all__ = ["MetricAccumulator", "binary_metrics", "counts_text", "multiclass_metrics"]

#: The keys of :func:`binary_metrics`, in order.
BINARY_METRIC_KEYS: tuple[str, ...] = (
    "n", "n_pos", "n_neg", "threshold", "tp", "fp", "tn", "fn", "accuracy", "precision",
    "sensitivity", "specificity", "f1", "npv", "f1_macro", "auroc", "pr_auc", "brier",
)  # fmt: skip


def binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Confusion counts, threshold metrics and ranking metrics of a binary classifier.

    Args:
        y_true: (N,) labels in {0, 1} (1 = positive, e.g. pneumonia).
        prob: (N,) predicted P(positive) in [0, 1] (not logits; checked).
        threshold: a case is called positive when ``prob >= threshold``.

    Returns:
        dict with ``n, n_pos, n_neg, threshold, tp, fp, tn, fn`` (ints / float) and ``accuracy,
        precision, sensitivity, specificity, f1, npv, f1_macro, auroc, pr_auc, brier`` (floats).
        ``sensitivity`` is the recall of class 1, ``specificity`` the recall of class 0 and ``npv``
        the precision of class 0, all read from ``precision_recall_fscore_support`` with
        ``labels=[0, 1]``; ``f1_macro`` is the mean F1 of the two classes, leaving out a class whose
        F1 is undefined (absent from both truth and predictions), as scikit-learn does with
        ``zero_division=np.nan``. ``pr_auc`` is average precision (step-wise, not trapezoidal, which
        would be optimistic). ``auroc`` and ``pr_auc`` are NaN when only one class is present.

    Example:
        >>> m = binary_metrics([0, 0, 1, 1, 1], [0.1, 0.6, 0.4, 0.8, 0.9])
        >>> (m["tp"], m["fp"], m["tn"], m["fn"])
        (2, 1, 1, 1)
    """
    y = check_labels(y_true)
    p = check_prob(prob, y.size)
    threshold = float(threshold)
    pred = (p >= threshold).astype(np.int64)

    (tn, fp), (fn, tp) = confusion_matrix(y, pred, labels=[0, 1])
    precision, recall, f1, _ = precision_recall_fscore_support(
        y, pred, labels=[0, 1], average=None, zero_division=np.nan
    )
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    both = n_pos > 0 and n_neg > 0
    f1_defined = f1[~np.isnan(f1)]
    return {
        "n": int(y.size),
        "n_pos": n_pos,
        "n_neg": n_neg,
        "threshold": threshold,
        "tp": int(tp),
        "fp": int(fp),
        "tn": int(tn),
        "fn": int(fn),
        "accuracy": float(accuracy_score(y, pred)),
        "precision": float(precision[1]),
        "sensitivity": float(recall[1]),
        "specificity": float(recall[0]),
        "f1": float(f1[1]),
        "npv": float(precision[0]),
        "f1_macro": float(f1_defined.mean()) if f1_defined.size else math.nan,
        "auroc": float(roc_auc_score(y, p)) if both else math.nan,
        "pr_auc": float(average_precision_score(y, p)) if both else math.nan,
        "brier": float(brier_score_loss(y, p, pos_label=1)),
    }


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den == 0`` (the ``zero_division=np.nan`` convention)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Row means of (B, K) ignoring NaN (scikit-learn's macro average with ``zero_division=np.nan``); NaN if all are."""
    ok = ~np.isnan(x)
    return _safe_div(np.where(ok, x, 0.0).sum(axis=1), ok.sum(axis=1).astype(np.float64))


def _binary_metrics_batched(
    y_true: np.ndarray, prob: np.ndarray, counts: np.ndarray, threshold: float = 0.5
) -> dict[str, np.ndarray]:
    """:func:`binary_metrics` for many resamples at once, given as integer multiplicities.

    Written here (scikit-learn has no batched form) because the bootstrap calls the metric a
    thousand times and scikit-learn's per-call input validation alone costs ~5 ms. Row ``b`` of
    ``counts`` (shape (B, N)) says how often each case occurs in resample ``b``; the result for row
    ``b`` equals ``binary_metrics(np.repeat(y_true, counts[b]), np.repeat(prob, counts[b]))``
    (tested).
    """
    y_true = check_labels(y_true)
    prob = check_prob(prob, y_true.size)
    w = np.asarray(counts, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != y_true.size:
        raise ValueError(f"counts must have shape (B, {y_true.size}), got {w.shape}")
    pos = (y_true == 1).astype(np.float64)
    neg = 1.0 - pos
    pred = (prob >= float(threshold)).astype(np.float64)
    n = w.sum(axis=1)
    n_pos = w @ pos
    n_neg = n - n_pos
    tp = w @ (pos * pred)
    fp = w @ (neg * pred)
    fn = n_pos - tp
    tn = n_neg - fp
    precision = _safe_div(tp, tp + fp)
    sensitivity = _safe_div(tp, n_pos)
    specificity = _safe_div(tn, n_neg)
    npv = _safe_div(tn, tn + fn)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    f1_neg = _safe_div(2 * tn, 2 * tn + fn + fp)
    f1_macro = _nanmean_rows(np.stack([f1_neg, f1], axis=1))

    auroc, pr_auc = _ranking_batched(pos, prob, w, n_pos, n_neg)
    brier = _safe_div(w @ (prob - y_true) ** 2, n)
    return {
        "n": n,
        "n_pos": n_pos,
        "n_neg": n_neg,
        "threshold": np.full(n.shape, float(threshold)),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "accuracy": _safe_div(tp + tn, n),
        "precision": precision,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "f1": f1,
        "npv": npv,
        "f1_macro": f1_macro,
        "auroc": auroc,
        "pr_auc": pr_auc,
        "brier": brier,
    }


def _ranking_batched(
    pos: np.ndarray, score: np.ndarray, w: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision for each row of the weight matrix ``w`` (B, N); NaN if a class is missing.

    Weights of tied scores are aggregated, then the distinct scores are swept once: AUROC is the
    Mann-Whitney statistic with ties counted 1/2, AP the step sum ``sum_k (R_k - R_{k-1}) P_k`` over
    decreasing thresholds, both exactly what scikit-learn computes on the expanded data.
    """
    neg = 1.0 - pos
    codes = np.unique(score, return_inverse=True)[1].ravel()
    order = np.argsort(codes, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(codes[order]) != 0])
    w_sorted = w[:, order]
    wp = np.add.reduceat(w_sorted * pos[order], starts, axis=1)  # (B, U) positives per distinct score
    wn = np.add.reduceat(w_sorted * neg[order], starts, axis=1)  # (B, U) negatives per distinct score
    neg_below = np.cumsum(wn, axis=1) - wn
    both = (n_pos > 0) & (n_neg > 0)
    auroc = np.where(both, _safe_div((wp * (neg_below + 0.5 * wn)).sum(axis=1), n_pos * n_neg), np.nan)
    tp_cum = np.cumsum(wp[:, ::-1], axis=1)  # thresholds in decreasing order
    fp_cum = np.cumsum(wn[:, ::-1], axis=1)
    prec_k = np.nan_to_num(_safe_div(tp_cum, tp_cum + fp_cum), nan=0.0)  # 0/0 only where the recall step is 0
    pr_auc = np.where(both, _safe_div((wp[:, ::-1] * prec_k).sum(axis=1), n_pos), np.nan)
    return auroc, pr_auc


# The bootstrap looks for this attribute (see pneumoscope.evaluate.bootstrap.bootstrap_ci).
binary_metrics.batched = _binary_metrics_batched  # type: ignore[attr-defined]


def multiclass_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class and macro-averaged metrics, and the confusion matrix of a C-class classifier.

    The predicted class is the argmax of ``probs``; with two classes it is ``probs[:, 1] >= 0.5``
    instead, so that every number agrees with :func:`binary_metrics` at 0.5 even on exact ties.

    Args:
        y_true: (N,) integer labels in ``0 .. C-1``.
        probs: (N, C) class probabilities.
        class_names: the C class names, in column order.

    Returns:
        dict with ``accuracy``; ``per_class`` = {name: {precision, recall, f1, specificity, support,
        auroc_ovr}}; ``macro_precision``, ``macro_recall``, ``macro_f1`` (scikit-learn's
        ``average="macro"`` with ``zero_division=np.nan``: undefined classes are left out);
        ``macro_auroc`` (mean one-vs-rest AUROC over the classes for which it is defined, which is
        scikit-learn's ``roc_auc_score(multi_class="ovr", average="macro")`` when every class
        occurs); ``confusion`` (C×C list of ints, rows = true class, columns = predicted). For
        C == 2 also every key of :func:`binary_metrics` on ``probs[:, 1]`` at 0.5.
        Per-class specificity is written here (scikit-learn has no multiclass specificity):
        TN / (TN + FP) of class k against the rest, read off the confusion matrix.
    """
    names = [str(c) for c in class_names]
    n_classes = len(names)
    if n_classes < 2:
        raise ValueError(f"need at least two class names, got {names}")
    if len(set(names)) != n_classes:
        raise ValueError(f"class names must be unique, got {names}")
    y = check_labels(y_true, n_classes)
    p = check_probs_2d(probs, y.size, n_classes)
    labels = list(range(n_classes))
    pred = (p[:, 1] >= 0.5).astype(np.int64) if n_classes == 2 else p.argmax(axis=1)

    cm = confusion_matrix(y, pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=labels, average=None, zero_division=np.nan
    )
    macro_p, macro_r, macro_f1, _ = precision_recall_fscore_support(
        y, pred, labels=labels, average="macro", zero_division=np.nan
    )
    total = cm.sum()
    per_class: dict[str, dict[str, float | int]] = {}
    aurocs = []
    for k, name in enumerate(names):
        fp_k = cm[:, k].sum() - cm[k, k]
        tn_k = total - cm[k, :].sum() - cm[:, k].sum() + cm[k, k]
        is_k = (y == k).astype(np.int64)
        defined = 0 < is_k.sum() < y.size
        auroc_k = float(roc_auc_score(is_k, p[:, k])) if defined else math.nan
        if defined:
            aurocs.append(auroc_k)
        per_class[name] = {
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "f1": float(f1[k]),
            "specificity": float(tn_k / (tn_k + fp_k)) if tn_k + fp_k > 0 else math.nan,
            "support": int(support[k]),
            "auroc_ovr": auroc_k,
        }
    if len(aurocs) < n_classes:  # info, not warning: bootstrap resamples of small sets hit this routinely
        logger.info(
            "macro AUROC over %d of %d classes: the others are absent from (or make up all of) y_true",
            len(aurocs), n_classes,
        )  # fmt: skip
    out: dict[str, Any] = {
        "accuracy": float(accuracy_score(y, pred)),
        "per_class": per_class,
        "macro_precision": float(macro_p),
        "macro_recall": float(macro_r),
        "macro_f1": float(macro_f1),
        "macro_auroc": float(np.mean(aurocs)) if aurocs else math.nan,
        "confusion": cm.astype(int).tolist(),
    }
    if n_classes == 2:
        binary = binary_metrics(y, p[:, 1], threshold=0.5)
        out.update({k: v for k, v in binary.items() if k not in out})
    return out


def _multiclass_metrics_batched(
    y_true: np.ndarray, probs: np.ndarray, counts: np.ndarray, class_names: Sequence[str]
) -> dict[str, np.ndarray]:
    """The numeric leaves of :func:`multiclass_metrics` (dotted keys) for many resamples at once.

    Same contract as :func:`_binary_metrics_batched`: row ``b`` of ``counts`` gives the
    multiplicity of each case, and the result equals ``multiclass_metrics`` on the expanded rows
    (tested); the confusion matrix of each resample is one matrix product with one-hot (true,
    predicted) cells.
    """
    names = [str(c) for c in class_names]
    n_classes = len(names)
    y = check_labels(y_true, n_classes)
    p = check_probs_2d(probs, y.size, n_classes)
    w = np.asarray(counts, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != y.size:
        raise ValueError(f"counts must have shape (B, {y.size}), got {w.shape}")
    pred = (p[:, 1] >= 0.5).astype(np.int64) if n_classes == 2 else p.argmax(axis=1)
    cells = np.zeros((y.size, n_classes * n_classes))
    cells[np.arange(y.size), y * n_classes + pred] = 1.0
    cm = (w @ cells).reshape(-1, n_classes, n_classes)  # (B, C, C), rows = true
    n = w.sum(axis=1)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    fp = predicted - tp
    tn = n[:, None] - support - predicted + tp
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * tp, support + predicted)
    specificity = _safe_div(tn, tn + fp)
    auroc = np.stack(
        [
            _ranking_batched((y == k).astype(np.float64), p[:, k], w, support[:, k], n - support[:, k])[0]
            for k in range(n_classes)
        ],
        axis=1,
    )
    out: dict[str, np.ndarray] = {"accuracy": _safe_div(tp.sum(axis=1), n)}
    for k, name in enumerate(names):
        out[f"per_class.{name}.precision"] = precision[:, k]
        out[f"per_class.{name}.recall"] = recall[:, k]
        out[f"per_class.{name}.f1"] = f1[:, k]
        out[f"per_class.{name}.specificity"] = specificity[:, k]
        out[f"per_class.{name}.support"] = support[:, k]
        out[f"per_class.{name}.auroc_ovr"] = auroc[:, k]
    out["macro_precision"] = _nanmean_rows(precision)
    out["macro_recall"] = _nanmean_rows(recall)
    out["macro_f1"] = _nanmean_rows(f1)
    out["macro_auroc"] = _nanmean_rows(auroc)
    if n_classes == 2:
        binary = _binary_metrics_batched(y, p[:, 1], w, threshold=0.5)
        out.update({k: v for k, v in binary.items() if k not in out})
    return out


multiclass_metrics.batched = _multiclass_metrics_batched  # type: ignore[attr-defined]


class MetricAccumulator:
    """Collects (labels, P(positive)) batch by batch and computes :func:`binary_metrics` once.

    AUROC and average precision are not averages over batches, so a loop must keep every
    prediction; this class does only that (MONAI's ``Cumulative`` metrics, in small).

    Example:
        >>> acc = MetricAccumulator()
        >>> acc.update([0, 1], [0.2, 0.7]); acc.update([1], [0.4])
        >>> acc.compute(threshold=0.5)["tp"]
        1
    """

    def __init__(self) -> None:
        self._y: list[np.ndarray] = []
        self._p: list[np.ndarray] = []

    def update(self, y: Any, prob: Any) -> None:
        """Append a batch: ``y`` (B,) labels in {0, 1}, ``prob`` (B,) or (B, 1) P(positive); tensors are fine."""
        y_arr = to_numpy(y).reshape(-1)
        p_arr = to_numpy(prob)
        if p_arr.ndim == 2 and p_arr.shape[1] == 1:
            p_arr = p_arr[:, 0]
        if p_arr.ndim != 1 or p_arr.shape[0] != y_arr.shape[0]:
            raise ValueError(f"batch shapes differ: y {y_arr.shape}, prob {p_arr.shape}")
        self._y.append(y_arr.copy())
        self._p.append(p_arr.astype(np.float64, copy=True))

    def compute(self, threshold: float = 0.5) -> dict[str, Any]:
        """:func:`binary_metrics` over everything seen since the last :meth:`reset`."""
        if not self._y:
            raise ValueError("MetricAccumulator.compute() before any update()")
        return binary_metrics(np.concatenate(self._y), np.concatenate(self._p), threshold=threshold)

    def reset(self) -> None:
        """Forget all batches."""
        self._y.clear()
        self._p.clear()

    def __len__(self) -> int:
        return int(sum(a.shape[0] for a in self._y))

    def __repr__(self) -> str:
        return f"MetricAccumulator(n={len(self)})"


def counts_text(k: int, n: int, decimals: int = 1) -> str:
    """A percentage that always carries its counts, e.g. ``counts_text(580, 624) == "92.9 % (580/624)"``.

    A bare "92.9 %" hides whether it rests on 14 cases or 1,400; reports print the counts too.
    ``n == 0`` gives ``"n/a (0/0)"``.
    """
    k = operator.index(k)
    n = operator.index(n)
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"counts_text needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return "n/a (0/0)"
    return f"{100.0 * k / n:.{decimals}f} % ({k}/{n})"
