"""Explanations: Grad-CAM maps, overlays, galleries and a lung-field attention check.

* :mod:`~pneumoscope.explain.cam`: :func:`compute_cams` / :func:`ensemble_cam` for every registered
  model through pytorch-grad-cam, with the target layer taken from the model card.
* :mod:`~pneumoscope.explain.lungs`: :func:`lung_mask` (classical image processing, with an
  anatomical-prior fallback), :func:`lung_attention`, :func:`border_attention`.
* :mod:`~pneumoscope.explain.overlay`: :func:`overlay` and the three-panel :func:`save_explanation_png`.
* :mod:`~pneumoscope.explain.gallery`: :func:`make_gallery` and :func:`outcome_galleries` (TP/TN/FP/FN).
* :mod:`~pneumoscope.explain.command`: :func:`explain_command`, behind ``pneumoscope explain``.

Importing this package is cheap: the submodules (pytorch-grad-cam, OpenCV, matplotlib) load on
first use of one of their names (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CAM_METHODS": "cam",
    "compute_cams": "cam",
    "ensemble_cam": "cam",
    "reshape_transform_for": "cam",
    "target_layer": "cam",
    "PRIOR_ELLIPSES": "lungs",
    "border_attention": "lungs",
    "lung_attention": "lungs",
    "lung_mask": "lungs",
    "prior_mask": "lungs",
    "overlay": "overlay",
    "save_explanation_png": "overlay",
    "make_gallery": "gallery",
    "outcome_galleries": "gallery",
    "select_outcomes": "gallery",
    "explain_command": "command",
    "explain_files": "command",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"pneumoscope.explain.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
