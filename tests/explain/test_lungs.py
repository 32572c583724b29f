"""Lung-field mask on real radiographs, and the attention scores."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from pneumoscope.data.imageio import decode_image
from pneumoscope.data.preprocess import PreprocessSpec, preprocess
from pneumoscope.explain.lungs import (
    MAX_AREA,
    MIN_AREA,
    border_attention,
    lung_attention,
    lung_mask,
    prior_mask,
)


def _blobs(mask: np.ndarray) -> int:
    return cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1


@pytest.fixture(scope="module")
def masks(xray_files: list[Path]) -> list[tuple[Path, np.ndarray, np.ndarray, str]]:
    spec = PreprocessSpec(size=224)
    out = []
    for f in xray_files:
        gray = preprocess(decode_image(f), spec)
        mask, how = lung_mask(gray)
        out.append((f, gray, mask, how))
    return out


def test_masks_on_real_xrays_are_plausible(masks) -> None:
    ok = 0
    for f, gray, mask, how in masks:
        assert mask.dtype == bool and mask.shape == gray.shape
        assert how in ("threshold", "prior")
        if MIN_AREA <= mask.mean() <= MAX_AREA and _blobs(mask) == 2:
            ok += 1
    assert ok >= len(masks) - 1, [(f.name, round(float(m.mean()), 3), _blobs(m), h) for f, _, m, h in masks]
    # The image-processing mask (not the prior) works on most of these.
    assert sum(how == "threshold" for *_, how in masks) >= len(masks) - 2


def test_masks_lie_one_per_side_in_the_chest(masks) -> None:
    for f, _, mask, _ in masks:
        h, w = mask.shape
        left, right = mask[:, : w // 2], mask[:, w // 2 :]
        assert left.sum() > 0 and right.sum() > 0, f.name
        assert mask[: int(0.05 * h)].sum() == 0 and mask[int(0.95 * h) :].sum() == 0, f.name  # not in the frame


def test_full_resolution_input_keeps_its_size(xray_files: list[Path]) -> None:
    gray = decode_image(xray_files[-1])
    mask, how = lung_mask(gray)
    assert mask.shape == gray.shape
    assert MIN_AREA <= mask.mean() <= MAX_AREA


def test_prior_fallback_for_images_without_lungs() -> None:
    for img in (np.full((224, 224), 128, np.uint8), np.zeros((100, 150), np.uint8)):
        mask, how = lung_mask(img)
        assert how == "prior"
        assert mask.shape == img.shape
        np.testing.assert_array_equal(mask, prior_mask(img.shape))
    prior = prior_mask((224, 224))
    assert _blobs(prior) == 2 and 0.2 < prior.mean() < 0.35
    with pytest.raises(ValueError):
        lung_mask(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError):
        lung_mask(np.zeros((8, 8), np.float32))


def test_lung_attention(masks) -> None:
    _, _, mask, _ = masks[0]
    assert lung_attention(mask.astype(np.float32), mask) == pytest.approx(1.0)
    corners = np.zeros(mask.shape, np.float32)
    corners[:20, :20] = corners[:20, -20:] = corners[-20:, :20] = corners[-20:, -20:] = 1.0
    assert lung_attention(corners, mask) == pytest.approx(0.0, abs=1e-6)
    assert lung_attention(np.ones(mask.shape), mask) == pytest.approx(mask.mean())
    # a low-resolution CAM is compared against a resized mask
    small = cv2.resize(mask.astype(np.float32), (28, 28), interpolation=cv2.INTER_AREA)
    assert lung_attention(small, mask) > 0.8
    assert math.isnan(lung_attention(np.zeros(mask.shape), mask))


def test_border_attention() -> None:
    assert border_attention(np.ones((100, 100))) == pytest.approx(1 - 0.8**2)
    frame = np.ones((100, 100))
    frame[10:90, 10:90] = 0
    assert border_attention(frame) == pytest.approx(1.0)
    centre = np.zeros((100, 100))
    centre[40:60, 40:60] = 1
    assert border_attention(centre) == pytest.approx(0.0)
    assert border_attention(frame, margin=0.2) == pytest.approx(1.0)
    assert math.isnan(border_attention(np.zeros((10, 10))))
    with pytest.raises(ValueError):
        border_attention(frame, margin=0.6)
