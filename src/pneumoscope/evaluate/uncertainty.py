"""Uncertainty scores, selective prediction and referral of uncertain cases.

A screening model that may say "not sure, refer to a radiologist" is judged by how accurate it is
on the cases it keeps. The accuracy–coverage (risk–coverage) curve of Geifman & El-Yaniv 2017
("Selective Classification for Deep Neural Networks", NeurIPS) shows that trade-off; its area
(AURC, Geifman, Uziel & El-Yaniv 2019) summarises it. Uncertainty can be the predictive entropy
of one forward pass, or, from S stochastic passes (MC dropout, Gal & Ghahramani 2016; test-time
augmentation), the entropy of the mean prediction and the mutual information between prediction
and model (BALD, Houlsby et al. 2011), which isolates the model's (epistemic) part.

Written here because scikit-learn has none of it. All entropies are in nats.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from scipy.special import entr

from pneumoscope.evaluate._checks import check_finite_1d, check_labels, check_prob, check_probs_2d, to_numpy

logger = logging.getLogger(__name__)

__all__ = [
    "fit_refer_threshold",
    "mutual_information",
    "predictive_entropy",
    "refer_flags",
    "selective_prediction_curve",
]


def _entropy(p: np.ndarray, binary: bool) -> np.ndarray:
    """Entropy along the last axis (or of Bernoulli(p) when ``binary``), in nats; 0 log 0 = 0."""
    if binary:
        return entr(p) + entr(1.0 - p)
    return entr(p).sum(axis=-1)


def _check_prob_array(p: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(p)) or p.min(initial=0.0) < 0.0 or p.max(initial=0.0) > 1.0:
        raise ValueError(f"{name} must be finite probabilities in [0, 1] (logits? apply sigmoid/softmax first)")


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy of the predictive distribution per case, in nats.

    ``probs`` of shape (N,) is read as P(positive) (Bernoulli entropy, at most log 2); (N, C) as
    class probabilities whose rows sum to 1 (at most log C). For MC-dropout / TTA samples pass the
    mean over samples, ``samples.mean(axis=0)``.
    """
    p = to_numpy(probs).astype(np.float64)
    if p.ndim == 2 and p.shape[1] == 1:  # (N, 1) from a sigmoid head
        p = p[:, 0]
    if p.ndim not in (1, 2) or p.shape[0] == 0:
        raise ValueError(f"probs must have shape (N,) or (N, C), got {p.shape}")
    _check_prob_array(p, "probs")
    return _entropy(p, binary=p.ndim == 1)


def mutual_information(samples: np.ndarray) -> np.ndarray:
    """BALD mutual information per case from S stochastic predictions, in nats.

    ``MI = H(mean_s p_s) - mean_s H(p_s)``: the part of the predictive entropy that comes from
    disagreement between the samples (model uncertainty), as opposed to every sample being unsure
    (data uncertainty). ``samples`` has shape (S, N) of P(positive) or (S, N, C). Tiny negative
    values from rounding are clipped to 0.
    """
    s = to_numpy(samples).astype(np.float64)
    if s.ndim not in (2, 3) or s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"samples must have shape (S, N) or (S, N, C), got {s.shape}")
    _check_prob_array(s, "samples")
    binary = s.ndim == 2
    mi = _entropy(s.mean(axis=0), binary) - _entropy(s, binary).mean(axis=0)
    return np.clip(mi, 0.0, None)


def selective_prediction_curve(
    y_true: np.ndarray, prob: np.ndarray, uncertainty: np.ndarray, threshold: float = 0.5
) -> dict[str, Any]:
    """Accuracy of the retained most-certain cases as coverage goes from 1 down to 1/N.

    Cases are sorted by ``uncertainty`` ascending; at coverage k/N the k most certain are kept.
    Cases with equal uncertainty cannot be ordered, so within a tie the curve uses their mean
    correctness (the expected curve under a random order) instead of an arbitrary sort order.

    Args:
        y_true: (N,) labels.
        prob: (N,) P(positive), decided at ``threshold`` (``prob >= threshold``); or (N, C) class
            probabilities, decided by argmax (``threshold`` then unused).
        uncertainty: (N,) higher = less certain (entropy, MI, ...).
        threshold: decision threshold for binary ``prob``.

    Returns:
        dict with ``coverage`` (N,) = 1, (N-1)/N, ..., 1/N; ``accuracy`` (N,) at those coverages;
        ``auc`` = area under the accuracy–coverage curve (mean of ``accuracy``, higher is better)
        and ``aurc`` = 1 - ``auc``, the area under the risk–coverage curve (lower is better).
    """
    p = to_numpy(prob)
    if p.ndim == 2 and p.shape[1] > 1:
        y = check_labels(y_true, n_classes=p.shape[1])
        correct = (check_probs_2d(p, y.size).argmax(axis=1) == y).astype(np.float64)
    else:
        y = check_labels(y_true)
        correct = ((check_prob(p, y.size) >= float(threshold)).astype(np.int64) == y).astype(np.float64)
    u = check_finite_1d(uncertainty, y.size, "uncertainty")
    n = y.size

    order = np.argsort(u, kind="stable")
    u_sorted = u[order]
    c_sorted = correct[order]
    starts = np.flatnonzero(np.r_[True, np.diff(u_sorted) != 0])
    block_sizes = np.diff(np.r_[starts, n])
    block_means = np.add.reduceat(c_sorted, starts) / block_sizes
    c_expected = np.repeat(block_means, block_sizes)

    kept = np.arange(1, n + 1)
    accuracy_by_k = np.cumsum(c_expected) / kept  # accuracy keeping the k most certain
    coverage = kept[::-1] / n
    accuracy = accuracy_by_k[::-1]
    auc = float(accuracy.mean())
    return {"coverage": coverage, "accuracy": accuracy, "auc": auc, "aurc": 1.0 - auc}


def fit_refer_threshold(uncertainty_val: np.ndarray, refer_fraction: float) -> float:
    """Uncertainty cut-off, chosen on validation data, that refers about ``refer_fraction`` of cases.

    Cases with ``uncertainty > threshold`` are referred. With k = round(refer_fraction · N) the
    threshold lies midway between the k-th largest and the next value, so new cases near the
    boundary are not decided by an exact tie with a validation case. ``refer_fraction`` is read
    as a reading budget: if those two values are equal the threshold is that value and fewer
    than k validation cases are referred (ties are never split, and the budget never exceeded).
    Fit on validation, then apply the fixed threshold to test data: referring a fixed fraction of
    the *test* set would tune the rule on the data it is judged on.
    """
    u = check_finite_1d(uncertainty_val, None, "uncertainty_val")
    f = float(refer_fraction)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"refer_fraction must be in [0, 1], got {refer_fraction}")
    s = np.sort(u)
    n = s.size
    k = int(math.floor(f * n + 0.5))
    if k == 0:
        return float(s[-1])
    if k == n:
        return float(np.nextafter(s[0], -np.inf))
    lo, hi = s[n - k - 1], s[n - k]  # largest kept, smallest referred
    t = float(lo + (hi - lo) / 2.0) if hi > lo else float(lo)
    referred = int(np.sum(u > t))
    if referred != k:
        logger.info("refer threshold %.4g refers %d of %d validation cases (asked %d; ties)", t, referred, n, k)
    return t


def refer_flags(
    uncertainty: np.ndarray,
    refer_fraction: float | None = None,
    uncertainty_threshold: float | None = None,
) -> np.ndarray:
    """Boolean (N,) flags: True = refer to a human reader.

    Give ``uncertainty_threshold`` (fitted on validation with :func:`fit_refer_threshold`; flags
    ``uncertainty > uncertainty_threshold``) or ``refer_fraction`` (the threshold is fitted on
    these same values, so about that fraction is flagged). With neither, ``refer_fraction=0.1``.
    """
    u = check_finite_1d(uncertainty, None, "uncertainty")
    if refer_fraction is not None and uncertainty_threshold is not None:
        raise ValueError("give refer_fraction or uncertainty_threshold, not both")
    if uncertainty_threshold is None:
        uncertainty_threshold = fit_refer_threshold(u, 0.1 if refer_fraction is None else refer_fraction)
    return u > float(uncertainty_threshold)
