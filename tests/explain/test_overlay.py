"""Overlays and the three-panel explanation figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscope.explain.overlay import heatmap, overlay, save_explanation_png


def _gray(h: int = 60, w: int = 80) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)


def test_overlay_shape_and_blend() -> None:
    gray = _gray()
    cam = np.zeros((7, 7), np.float32)
    cam[3, 3] = 1.0
    rgb = overlay(gray, cam)
    assert rgb.shape == (60, 80, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(overlay(gray, cam, alpha=0.0), np.repeat(gray[..., None], 3, axis=2))
    full = overlay(gray, np.ones((7, 7)), alpha=1.0)
    assert (full == full[0, 0]).all()  # pure heatmap colour where the CAM is flat
    assert tuple(full[0, 0]) == tuple(heatmap(np.ones((1, 1)))[0, 0])
    # jet: hot = red, cold = blue
    hot = heatmap(np.ones((2, 2)))[0, 0]
    cold = heatmap(np.zeros((2, 2)))[0, 0]
    assert hot[0] > hot[2] and cold[2] > cold[0]


def test_overlay_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4)))
    with pytest.raises(ValueError):
        overlay(_gray(), np.zeros((4, 4)), alpha=1.5)
    with pytest.raises(ValueError):
        overlay(_gray(), np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="colormap"):
        overlay(_gray(), np.zeros((4, 4)), colormap="rainbow-unicorn")


def test_three_panel_png(tmp_path: Path) -> None:
    gray = _gray(128, 128)
    cam = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    mask = np.zeros((128, 128), bool)
    mask[30:100, 20:60] = mask[30:100, 70:110] = True
    out = save_explanation_png(tmp_path / "sub" / "x_cam.png", gray, cam, "x.jpeg: PNEUMONIA",
                               {"NORMAL": 0.1, "PNEUMONIA": 0.9}, mask)
    plain = save_explanation_png(tmp_path / "y_cam.png", gray, cam, "y", 0.42)
    for p in (out, plain):
        assert p.exists()
        with Image.open(p) as im:
            assert im.format == "PNG"
            w, h = im.size
            assert w > 2.2 * h  # three panels side by side
    assert sorted(q.name for q in (tmp_path / "sub").iterdir()) == ["x_cam.png"]  # no temp files left
