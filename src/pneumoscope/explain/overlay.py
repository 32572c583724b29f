"""Heatmap overlays and the three-panel explanation figure (image | heatmap | blend).

Figures are built on a ``matplotlib.figure.Figure`` with an Agg canvas (no pyplot state, safe in a
server thread, as in :mod:`pneumoscope.evaluate.plots`) and written through
:func:`~pneumoscope.utils.io.atomic_path`. The colour blend itself is OpenCV's ``applyColorMap``,
as in pytorch-grad-cam's ``show_cam_on_image``, but without its re-normalisation by the maximum,
so a blend keeps the radiograph's own brightness.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np

from pneumoscope.utils.io import atomic_path

logger = logging.getLogger(__name__)

__all__ = ["COLORMAPS", "cam_to_size", "heatmap", "new_figure", "overlay", "save_explanation_png", "save_figure"]

#: Colormap names accepted by :func:`overlay` → OpenCV constants.
COLORMAPS: dict[str, int] = {
    "jet": cv2.COLORMAP_JET,
    "turbo": cv2.COLORMAP_TURBO,
    "inferno": cv2.COLORMAP_INFERNO,
    "magma": cv2.COLORMAP_MAGMA,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "hot": cv2.COLORMAP_HOT,
}
_DPI = 100


def _check_gray(gray: np.ndarray) -> np.ndarray:
    gray = np.asarray(gray)
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 grayscale image, got {gray.dtype} {gray.shape}")
    return gray


def cam_to_size(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A 2-D CAM resized (bilinear) to ``shape`` = (H, W) and clipped to [0, 1], float32."""
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"cam must be 2-D, got shape {cam.shape}")
    if not np.isfinite(cam).all():
        raise ValueError("cam contains NaN or infinite values")
    h, w = shape
    if cam.shape != (h, w):
        cam = cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(cam, 0.0, 1.0)


def heatmap(cam: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """RGB uint8 (H, W, 3) colour image of a [0, 1] CAM."""
    try:
        cmap = COLORMAPS[colormap]
    except KeyError:
        raise ValueError(f"unknown colormap {colormap!r}; choose one of {sorted(COLORMAPS)}") from None
    cam = cam_to_size(cam, np.asarray(cam).shape)
    bgr = cv2.applyColorMap(np.uint8(np.round(255 * cam)), cmap)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def overlay(gray_u8: np.ndarray, cam: np.ndarray, alpha: float = 0.4, colormap: str = "jet") -> np.ndarray:
    """Blend a CAM onto a grayscale radiograph: RGB uint8 (H, W, 3), ``(1 - alpha) * image + alpha * heatmap``.

    ``cam`` (any size, values in [0, 1]) is resized bilinearly to the image.
    """
    gray = _check_gray(gray_u8)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = heatmap(cam_to_size(cam, gray.shape), colormap).astype(np.float32)
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    out = (1.0 - alpha) * rgb + alpha * heat
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _prob_text(prob: float | Mapping[str, float] | None) -> str:
    if prob is None:
        return ""
    if isinstance(prob, Mapping):
        return "  ".join(f"{k}: {float(v):.3f}" for k, v in prob.items())
    return f"p = {float(prob):.3f}"


def new_figure(width_in: float, height_in: float):  # noqa: ANN202
    """A matplotlib ``Figure`` on its own Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike[str]) -> Path:  # noqa: ANN001
    """Write a matplotlib figure as PNG atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    logger.debug("wrote %s", path)
    return path


def save_explanation_png(
    path: str | os.PathLike[str],
    gray: np.ndarray,
    cam: np.ndarray,
    title: str,
    prob: float | Mapping[str, float] | None = None,
    mask: np.ndarray | None = None,
    *,
    alpha: float = 0.4,
    colormap: str = "jet",
) -> Path:
    """One PNG with three panels: the image, the CAM heatmap (with a colour bar), and the blend.

    ``prob`` (one probability or ``{class name: probability}``) is printed under ``title``;
    ``mask`` (boolean, e.g. from :func:`~pneumoscope.explain.lungs.lung_mask`) is drawn as a white
    contour on the blend. Written atomically; returns the path.
    """
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.cm import ScalarMappable

    gray = _check_gray(gray)
    cam_full = cam_to_size(cam, gray.shape)
    fig = new_figure(11.0, 4.3)
    axes = fig.subplots(1, 3)
    axes[0].imshow(gray, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(heatmap(cam_full, colormap))
    axes[1].set_title("class activation map", fontsize=9)
    axes[2].imshow(overlay(gray, cam_full, alpha=alpha, colormap=colormap))
    axes[2].set_title("overlay" + (" + lung-field mask" if mask is not None else ""), fontsize=9)
    if mask is not None:
        m = np.asarray(mask, bool)
        if m.shape != gray.shape:
            m = cv2.resize(m.astype(np.uint8), gray.shape[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
        if m.any() and not m.all():
            axes[2].contour(m.astype(np.float32), levels=[0.5], colors="white", linewidths=1.0)
    for ax in axes:
        ax.set_axis_off()
    cmap_name = colormap if colormap in colormaps else "jet"
    fig.colorbar(ScalarMappable(Normalize(0, 1), cmap=colormaps[cmap_name]), ax=axes[1], fraction=0.046, pad=0.02)
    text = _prob_text(prob)
    fig.suptitle(title + (f"\n{text}" if text else ""), fontsize=10)
    return save_figure(fig, path)
