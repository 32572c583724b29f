"""Evaluation statistics: metrics, patient-level bootstrap, thresholds, calibration, uncertainty, plots.

Pure functions over numpy arrays (plus small scikit-learn-style estimators for what is *fitted*
on validation data: the threshold and the temperature). Nothing here reads files, configs or
global state. The plotting functions are exported too, but loaded on first use (PEP 562), so that
importing the statistics (e.g. in the server) does not import matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

from pneumoscope.evaluate.bootstrap import bootstrap_ci
from pneumoscope.evaluate.calibration import TemperatureScaler, expected_calibration_error, reliability_curve
from pneumoscope.evaluate.metrics import MetricAccumulator, binary_metrics, counts_text, multiclass_metrics
from pneumoscope.evaluate.threshold import ThresholdSelector
from pneumoscope.evaluate.uncertainty import (
    fit_refer_threshold,
    mutual_information,
    predictive_entropy,
    refer_flags,
    selective_prediction_curve,
)

_PLOTS = (
    "plot_confusion",
    "plot_coverage",
    "plot_pr",
    "plot_reliability",
    "plot_roc",
    "plot_training_curves",
)

__all__ = [
    "MetricAccumulator",
    "TemperatureScaler",
    "ThresholdSelector",
    "binary_metrics",
    "bootstrap_ci",
    "counts_text",
    "expected_calibration_error",
    "fit_refer_threshold",
    "multiclass_metrics",
    "mutual_information",
    "predictive_entropy",
    "refer_flags",
    "reliability_curve",
    "selective_prediction_curve",
    *_PLOTS,
]


def __getattr__(name: str) -> Any:
    if name in _PLOTS:
        return getattr(importlib.import_module("pneumoscope.evaluate.plots"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
