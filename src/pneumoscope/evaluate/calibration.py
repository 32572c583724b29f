"""Calibration: temperature scaling, expected calibration error and reliability curves.

Modern CNNs are over-confident (Guo, Pleiss, Sun & Weinberger 2017, "On Calibration of Modern
Neural Networks", ICML). Temperature scaling divides the logits by one scalar T > 0 fitted by
minimising the negative log-likelihood on validation data; it changes confidence, never the
ranking, so AUROC and the argmax are untouched while probabilities become usable for referral
and thresholds. Like the threshold, T must be fitted on validation data only.

ECE and the reliability curve are written here: scikit-learn has ``calibration_curve`` but no
ECE and no bin counts (the tests check the curve against ``calibration_curve``). Bins are equal
width on [0, 1], half-open ``(a, b]`` with the first bin closed (scikit-learn's and Guo et al.'s
convention). Two variants, chosen by the shape of ``prob``:

* ``prob`` of shape (N,): P(positive); each bin compares the mean predicted probability with the
  observed fraction of positives (the binary reliability diagram).
* ``prob`` of shape (N, C): top-label calibration as in Guo et al.: confidence = max probability,
  "accuracy" = fraction of cases whose argmax is correct.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, softmax

from pneumoscope.evaluate._checks import check_labels, check_prob, check_probs_2d, to_numpy

logger = logging.getLogger(__name__)

__all__ = ["TemperatureScaler", "expected_calibration_error", "reliability_curve"]


class TemperatureScaler:
    """One-parameter post-hoc calibration: ``p = sigmoid(z / T)`` or ``softmax(z / T)`` (Guo et al. 2017).

    Works for binary logits of shape (N,) (one logit per case, P(positive) = sigmoid) and for
    multiclass logits of shape (N, C). ``log T`` is found by bounded scalar minimisation of the
    mean NLL (``scipy.optimize.minimize_scalar``); the NLL is convex in 1/T, hence unimodal in
    log T, so a bracketing search is enough and needs no learning rate.

    Args:
        bounds: allowed range of T; a fit that ends on a bound is logged as a warning (it happens
            when the validation logits separate the classes perfectly).

    Attributes (after :meth:`fit`):
        temperature_: fitted T (> 1 means the model was over-confident).
        nll_before_, nll_after_: mean NLL on the fitting data at T = 1 and at ``temperature_``.
    """

    def __init__(self, bounds: tuple[float, float] = (0.05, 20.0)) -> None:
        self.bounds = bounds

    @staticmethod
    def _nll_fn(logits: Any, y_true: Any) -> Any:
        z = to_numpy(logits).astype(np.float64)
        if z.ndim == 2 and z.shape[1] == 1:
            z = z[:, 0]
        if not np.all(np.isfinite(z)):
            raise ValueError("logits contain NaN or inf")
        if z.ndim == 1:
            y = check_labels(y_true)
            if y.shape[0] != z.shape[0]:
                raise ValueError(f"{z.shape[0]} logits but {y.shape[0]} labels")
            sign = 2.0 * y - 1.0
            return lambda log_t: float(np.mean(np.logaddexp(0.0, -sign * z / math.exp(log_t))))
        if z.ndim == 2:
            y = check_labels(y_true, n_classes=z.shape[1])
            if y.shape[0] != z.shape[0]:
                raise ValueError(f"{z.shape[0]} logits but {y.shape[0]} labels")
            rows = np.arange(z.shape[0])
            return lambda log_t: float(-np.mean(log_softmax(z / math.exp(log_t), axis=1)[rows, y]))
        raise ValueError(f"logits must have shape (N,) or (N, C), got {z.shape}")

    def fit(self, logits: np.ndarray, y_true: np.ndarray) -> "TemperatureScaler":
        """Fit T on validation logits and labels (binary (N,) + {0,1}, or (N, C) + 0..C-1)."""
        lo, hi = (float(b) for b in self.bounds)
        if not 0.0 < lo < 1.0 < hi:
            raise ValueError(f"bounds must satisfy 0 < low < 1 < high, got {self.bounds}")
        nll = self._nll_fn(logits, y_true)
        res = minimize_scalar(nll, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-6})
        self.temperature_ = float(math.exp(res.x))
        self.nll_before_ = nll(0.0)
        self.nll_after_ = float(res.fun)
        if min(abs(res.x - math.log(lo)), abs(res.x - math.log(hi))) < 1e-3:
            logger.warning(
                "temperature %.4g is at the bound %s: the fitting logits may separate the classes perfectly",
                self.temperature_, self.bounds,
            )  # fmt: skip
        logger.info(
            "temperature scaling: T = %.4f, NLL %.4f -> %.4f", self.temperature_, self.nll_before_, self.nll_after_
        )
        return self

    def transform(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities: (N,) P(positive) for binary logits, (N, C) rows summing to 1 otherwise."""
        if not hasattr(self, "temperature_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("TemperatureScaler is not fitted; call fit() on validation logits first")
        z = to_numpy(logits).astype(np.float64)
        if z.ndim == 2 and z.shape[1] == 1:
            z = z[:, 0]
        if z.ndim == 1:
            return expit(z / self.temperature_)
        if z.ndim == 2:
            return softmax(z / self.temperature_, axis=1)
        raise ValueError(f"logits must have shape (N,) or (N, C), got {z.shape}")

    def to_dict(self) -> dict[str, float]:
        """``{"temperature": T}`` for the model card."""
        return {"temperature": self.temperature_}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TemperatureScaler":
        """Rebuild a fitted scaler from :meth:`to_dict` output."""
        t = float(d["temperature"])
        if not t > 0 or not math.isfinite(t):
            raise ValueError(f"temperature must be a positive number, got {d['temperature']!r}")
        obj = cls()
        obj.temperature_ = t
        return obj

    def __repr__(self) -> str:
        t = f"temperature_={self.temperature_:.4f}" if hasattr(self, "temperature_") else "unfitted"
        return f"TemperatureScaler({t})"


def _confidence_and_target(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray, str]:
    """(confidence, observed 0/1 outcome, kind) for the binary or the top-label variant."""
    p = to_numpy(prob)
    if p.ndim == 2 and p.shape[1] > 1:
        y = check_labels(y_true, n_classes=p.shape[1])
        probs = check_probs_2d(p, y.size)
        return probs.max(axis=1), (probs.argmax(axis=1) == y).astype(np.float64), "top-label"
    y = check_labels(y_true)
    return check_prob(p, y.size), y.astype(np.float64), "binary"


def reliability_curve(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> dict[str, Any]:
    """Per-bin mean confidence and observed accuracy (the data of a reliability diagram).

    Args:
        y_true: (N,) labels.
        prob: (N,) P(positive) or (N, C) class probabilities (top-label variant, see module docs).
        n_bins: equal-width bins on [0, 1].

    Returns:
        dict with ``bin_edges`` (n_bins + 1), ``bin_centers``, ``accuracy`` (observed fraction
        positive / correct), ``confidence`` (mean predicted probability / max probability), both
        NaN in empty bins, ``counts`` (int), ``ece`` (the expected calibration error of these
        bins), ``n_bins`` and ``kind`` (``"binary"`` or ``"top-label"``).
    """
    n_bins = int(n_bins)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, target, kind = _confidence_and_target(y_true, prob)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], conf, side="left")  # (a, b] bins, as sklearn's calibration_curve
    counts = np.bincount(bins, minlength=n_bins)
    sum_conf = np.bincount(bins, weights=conf, minlength=n_bins)
    sum_target = np.bincount(bins, weights=target, minlength=n_bins)
    nonempty = counts > 0
    safe = np.where(nonempty, counts, 1)
    accuracy = np.where(nonempty, sum_target / safe, np.nan)
    confidence = np.where(nonempty, sum_conf / safe, np.nan)
    ece = float(np.sum(counts[nonempty] * np.abs(accuracy[nonempty] - confidence[nonempty])) / conf.size)
    return {
        "bin_edges": edges,
        "bin_centers": (edges[:-1] + edges[1:]) / 2.0,
        "accuracy": accuracy,
        "confidence": confidence,
        "counts": counts.astype(np.int64),
        "ece": ece,
        "n_bins": n_bins,
        "kind": kind,
    }


def expected_calibration_error(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 15) -> float:
    """ECE = sum over bins of (bin size / N) * |observed accuracy - mean confidence| (Naeini et al. 2015; Guo et al. 2017).

    ``prob`` of shape (N,) gives the binary ECE on P(positive); shape (N, C) gives the multiclass
    (top-label, max-probability confidence) ECE of Guo et al. Equal-width bins; 15 as in Guo et al.
    ECE depends on the number of bins and is biased upwards for small N, so compare values only at
    the same ``n_bins`` and similar N.
    """
    return float(reliability_curve(y_true, prob, n_bins=n_bins)["ece"])
