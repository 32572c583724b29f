"""Choosing the operating threshold of a binary classifier, on validation data only.

A threshold tuned on the test set makes the test-set sensitivity and specificity optimistic (the
test set has then been used for model selection). :class:`ThresholdSelector` is therefore an
estimator in the scikit-learn sense: the constructor stores the rule, :meth:`ThresholdSelector.fit`
learns ``threshold_`` from the arrays it is given, and the fitted threshold is then frozen
(stored in the model card via :meth:`ThresholdSelector.to_dict`) and applied unchanged to the test
set. It must only ever be fitted on validation predictions; the trainer/evaluator is responsible
for passing it nothing else, and the object keeps no reference to the arrays it was fitted on.

Rules (a case is positive when ``prob >= threshold``, as in ``sklearn.metrics.roc_curve``):

* ``"youden"``: maximise Youden's J = sensitivity + specificity - 1 (Youden 1950, "Index for
  rating diagnostic tests", Cancer 3:32); ties go to the largest threshold.
* ``"sensitivity"``: the largest threshold whose sensitivity is >= ``target``, i.e. the best
  specificity that keeps the sensitivity floor (screening: missing pneumonia is the costly error).
* ``"specificity"``: the smallest threshold whose specificity is >= ``target``, i.e. the best
  sensitivity under a false-alarm ceiling.
* ``"fixed"``: ``target`` is the threshold itself (e.g. 0.5); ``fit`` only records what it achieves.

Candidate thresholds are the distinct scores, read from scikit-learn's ``roc_curve`` with
``drop_intermediate=False`` (dropping collinear points could skip the largest qualifying one).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_curve

from pneumoscope.errors import ConfigError
from pneumoscope.evaluate._checks import check_labels, check_prob, to_numpy
from pneumoscope.evaluate.metrics import binary_metrics

logger = logging.getLogger(__name__)

__all__ = ["ThresholdSelector"]

RULES = ("youden", "sensitivity", "specificity", "fixed")


class ThresholdSelector:
    """Learns a decision threshold on validation predictions by a named rule.

    Args:
        rule: ``"youden"``, ``"sensitivity"``, ``"specificity"`` or ``"fixed"`` (see module docs).
        target: the sensitivity / specificity floor in [0, 1] for those rules, the threshold for
            ``"fixed"``; must be ``None`` for ``"youden"``.

    Attributes (after :meth:`fit`):
        threshold_: the decision threshold (call positive when ``prob >= threshold_``).
        achieved_: ``{"sensitivity", "specificity"}`` at ``threshold_`` on the fitting data.
        rule_description_: human-readable rule, e.g. ``"sensitivity ≥ 0.98 on validation"``.

    Example:
        >>> sel = ThresholdSelector("sensitivity", target=0.9).fit(y_val, p_val)  # doctest: +SKIP
        >>> y_pred_test = sel.predict(p_test)  # doctest: +SKIP
    """

    def __init__(self, rule: str = "youden", target: float | None = None) -> None:
        self.rule = rule
        self.target = target

    def _check_params(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"threshold rule: unknown rule {self.rule!r}; expected one of {RULES}")
        if self.rule == "youden":
            if self.target is not None:
                raise ConfigError(f"threshold target: rule 'youden' takes no target, got {self.target!r}")
            return
        if self.target is None:
            raise ConfigError(f"threshold target: rule {self.rule!r} needs a target")
        t = float(self.target)
        if not math.isfinite(t) or not 0.0 <= t <= 1.0:
            raise ConfigError(f"threshold target: must be in [0, 1], got {self.target!r}")

    def fit(self, y_true: np.ndarray, prob: np.ndarray) -> "ThresholdSelector":
        """Learn ``threshold_`` from validation labels and P(positive); uses only these two arrays."""
        self._check_params()
        y = check_labels(y_true)
        p = check_prob(prob, y.size)
        if self.rule == "fixed":
            threshold = float(self.target)  # type: ignore[arg-type]
            description = f"fixed threshold {threshold:g}"
        else:
            if y.min() == y.max():
                raise ValueError(f"rule {self.rule!r} needs both classes in the fitting data, got only class {y[0]}")
            fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)  # thresholds decreasing
            if self.rule == "youden":
                i = int(np.argmax(tpr - fpr))
                description = "max Youden's J on validation"
            elif self.rule == "sensitivity":
                i = int(np.flatnonzero(tpr >= float(self.target))[0])  # type: ignore[arg-type]
                description = f"sensitivity ≥ {float(self.target):g} on validation"  # type: ignore[arg-type]
            else:
                i = int(np.flatnonzero(1.0 - fpr >= float(self.target))[-1])  # type: ignore[arg-type]
                description = f"specificity ≥ {float(self.target):g} on validation"  # type: ignore[arg-type]
            threshold = float(thresholds[i])
            if not math.isfinite(threshold):
                # roc_curve's first point (threshold inf = call nothing positive): keep it finite so
                # it survives JSON, just above the largest score.
                threshold = float(np.nextafter(p.max(), np.inf))
        m = binary_metrics(y, p, threshold)
        self.threshold_ = threshold
        self.achieved_ = {"sensitivity": m["sensitivity"], "specificity": m["specificity"]}
        self.rule_description_ = description
        logger.info(
            "threshold %.4f (%s): sensitivity %.3f, specificity %.3f on %d cases",
            threshold, description, m["sensitivity"], m["specificity"], m["n"],
        )  # fmt: skip
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "threshold_"):
            raise NotFittedError("ThresholdSelector is not fitted; call fit() on validation data first")

    def predict(self, prob: np.ndarray) -> np.ndarray:
        """0/1 decisions ``prob >= threshold_``."""
        self._check_fitted()
        p = to_numpy(prob).astype(np.float64)
        return (p >= self.threshold_).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-able state (for the model card)."""
        self._check_fitted()
        return {
            "rule": self.rule,
            "target": None if self.target is None else float(self.target),
            "threshold": float(self.threshold_),
            "achieved": dict(self.achieved_),
            "rule_description": self.rule_description_,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ThresholdSelector":
        """Rebuild a fitted selector from :meth:`to_dict` output."""
        try:
            sel = cls(rule=d["rule"], target=d.get("target"))
            sel._check_params()
            sel.threshold_ = float(d["threshold"])
            sel.achieved_ = {k: (math.nan if v is None else float(v)) for k, v in dict(d["achieved"]).items()}
            sel.rule_description_ = str(d["rule_description"])
        except KeyError as err:
            raise ConfigError(f"threshold: missing key {err.args[0]!r} in stored threshold") from None
        return sel

    def __repr__(self) -> str:
        fitted = f", threshold_={self.threshold_:.4f}" if hasattr(self, "threshold_") else ""
        return f"ThresholdSelector(rule={self.rule!r}, target={self.target!r}{fitted})"
