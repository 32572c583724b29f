"""A lung-field mask without a trained segmentation model, and CAM-attention scores against it.

Why: a pneumonia classifier that "looks" at the text markers in the film's corners, the shoulders
or the abdomen instead of the lungs has learned a shortcut (Zech et al. 2018, PLOS Medicine,
"Variable generalization performance of a deep learning model to detect pneumonia in chest
radiographs"). The share of the CAM mass that falls inside the lung fields is a cheap screen for
that. No lung segmentation model can be installed offline here, so the mask is made with classical
image processing.

Method (:func:`lung_mask`), on the preprocessed square radiograph, resampled to 256 px:

1. CLAHE (clip 2, 8x8 tiles) then a Gaussian blur (sigma 2 px) to even out exposure and noise.
2. Otsu threshold, inverted: the dark (air-filled) pixels. Those are the lungs, the trachea,
   and the air outside the body.
3. A small opening cuts thin bridges (e.g. a lung that touches the film edge through a gap at the
   axilla); components touching the image border (air outside the body) are dropped.
4. Of the remaining components, those of plausible size (>= 1.5 % of the image) whose centroid lies
   in the central band (x in 8-92 %, y in 10-85 %) are candidates; the two largest are kept, and a
   second one under a fifth of the first is dropped (a stomach bubble, not a lung).
5. Holes are filled, then a closing and a slight dilation smooth the outline; the mask is resized
   back to the input size.

If the result covers less than 5 % or more than 60 % of the image, or is one single blob on one side
only, the method falls back to an anatomical prior: two ellipses at typical lung positions of a PA
film (:data:`PRIOR_ELLIPSES`, in fractions of width/height, image left = patient right):
centres (0.31, 0.47) and (0.69, 0.47), half-axes 0.14 x 0.28 (together ~25 % of the image).

Limits (read before trusting a number): the threshold finds *dark* lung; a lung whitened by dense
consolidation or a large effusion is partly missed, so the mask under-covers exactly the regions a
good pneumonia model should look at: that is why :func:`lung_attention` is a screen for gross
shortcuts (corners, markers, shoulders, abdomen), not a measure of localisation accuracy. Rotated
films, lateral views, heavy collimation or the 'pad' resize shift the anatomy away from the prior.
The heart and mediastinum are (correctly) excluded; the lung area behind the heart and below the
dome of the diaphragm is missed. ``method`` ('threshold' or 'prior') is always reported beside the score.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["PRIOR_ELLIPSES", "border_attention", "lung_attention", "lung_mask", "prior_mask"]

#: (centre x, centre y, half-axis x, half-axis y) as fractions of width/height: image-left lung, image-right lung.
PRIOR_ELLIPSES: tuple[tuple[float, float, float, float], ...] = (
    (0.31, 0.47, 0.14, 0.28),
    (0.69, 0.47, 0.14, 0.28),
)

_WORK = 256  # working resolution (pixels) so the kernel sizes below mean the same on any input
MIN_AREA, MAX_AREA = 0.05, 0.60  # plausible total mask area (fraction of the image)
_MIN_COMPONENT = 0.015
_MIN_SECOND_RATIO = 0.2


def prior_mask(shape: tuple[int, int]) -> np.ndarray:
    """The anatomical prior: :data:`PRIOR_ELLIPSES` drawn on a ``shape`` = (H, W) boolean mask."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    u, v = (xx + 0.5) / w, (yy + 0.5) / h
    mask = np.zeros((h, w), bool)
    for cx, cy, ax, ay in PRIOR_ELLIPSES:
        mask |= ((u - cx) / ax) ** 2 + ((v - cy) / ay) ** 2 <= 1.0
    return mask


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes by flood-filling the background from the border."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), np.uint8)
    padded[1:-1, 1:-1] = mask.astype(np.uint8)
    flood = padded.copy()
    ff_mask = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(flood, ff_mask, (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return mask | holes


def _threshold_mask(gray: np.ndarray) -> np.ndarray | None:
    """Steps 1-5 of the module docstring at the working resolution; None when no candidate is found."""
    n = _WORK
    img = cv2.resize(gray, (n, n), interpolation=cv2.INTER_AREA)
    img = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(img)
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=2.0)
    _, dark = cv2.threshold(img, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    dark = cv2.morphologyEx(dark, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7)))
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(dark, connectivity=4)
    cands: list[tuple[int, int]] = []
    for i in range(1, count):
        x, y, bw, bh, area = stats[i]
        if x == 0 or y == 0 or x + bw >= n or y + bh >= n:
            continue  # touches the border: air outside the body
        cx, cy = centroids[i] / n
        if area < _MIN_COMPONENT * n * n or not (0.08 <= cx <= 0.92 and 0.10 <= cy <= 0.85):
            continue
        cands.append((int(area), i))
    if not cands:
        return None
    cands.sort(reverse=True)
    keep = [cands[0][1]]
    if len(cands) > 1 and cands[1][0] >= _MIN_SECOND_RATIO * cands[0][0]:
        keep.append(cands[1][1])
    mask = np.isin(labels, keep)
    mask = _fill_holes(mask)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, k)
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    return mask.astype(bool)


def _plausible(mask: np.ndarray) -> bool:
    """Total area within [MIN_AREA, MAX_AREA] and mask pixels on both sides of the midline."""
    area = float(mask.mean())
    if not MIN_AREA <= area <= MAX_AREA:
        return False
    w = mask.shape[1]
    left, right = mask[:, : w // 2].sum(), mask[:, w // 2 :].sum()
    return min(left, right) >= 0.2 * max(left, right)


def lung_mask(gray: np.ndarray) -> tuple[np.ndarray, str]:
    """``(mask, method)``: a boolean (H, W) lung-field mask of a 2-D uint8 radiograph.

    ``method`` is ``'threshold'`` when the image-processing mask is plausible, else ``'prior'``
    (the ellipses of :data:`PRIOR_ELLIPSES`). See the module docstring for the steps and limits.
    """
    gray = np.asarray(gray)
    if gray.ndim != 2:
        raise ValueError(f"lung_mask expects a 2-D grayscale image, got shape {gray.shape}")
    if gray.dtype != np.uint8:
        raise ValueError(f"lung_mask expects uint8, got {gray.dtype}")
    h, w = gray.shape
    mask = _threshold_mask(np.ascontiguousarray(gray))
    if mask is not None and _plausible(mask):
        if (h, w) != mask.shape:
            mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
        return mask, "threshold"
    logger.debug("lung mask: threshold mask implausible (area %s); using the anatomical prior",
                 None if mask is None else round(float(mask.mean()), 3))
    return prior_mask((h, w)), "prior"


def _check_cam(cam: np.ndarray) -> np.ndarray:
    cam = np.asarray(cam, dtype=np.float64)
    if cam.ndim != 2:
        raise ValueError(f"cam must be 2-D (H, W), got shape {cam.shape}")
    return np.clip(cam, 0.0, None)


def lung_attention(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of the CAM mass inside the mask: ``sum(cam * mask) / sum(cam)`` in [0, 1] (NaN for an all-zero CAM).

    The mask is resized (nearest) to the CAM's size when they differ.
    """
    cam = _check_cam(cam)
    mask = np.asarray(mask, bool)
    if mask.shape != cam.shape:
        mask = cv2.resize(mask.astype(np.uint8), cam.shape[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
    total = cam.sum()
    return float(cam[mask].sum() / total) if total > 0 else float("nan")


def border_attention(cam: np.ndarray, margin: float = 0.1) -> float:
    """Share of the CAM mass in the outer frame ``margin`` wide (fraction of each side), where
    text markers and film edges live. A uniform CAM scores ``1 - (1 - 2 * margin) ** 2`` (0.36 at 0.1)."""
    if not 0.0 < margin < 0.5:
        raise ValueError(f"margin must be in (0, 0.5), got {margin}")
    cam = _check_cam(cam)
    h, w = cam.shape
    mh, mw = max(1, round(h * margin)), max(1, round(w * margin))
    total = cam.sum()
    if total <= 0:
        return float("nan")
    inner = cam[mh : h - mh, mw : w - mw].sum()
    return float(1.0 - inner / total)
