"""A lung-field mask without a trained segmentation model, and CAM-attention scores against it.

Why: a pneumonia classifier that "looks" at the text markers in the film's corners, the shoulders
or the abdomen instead of the lungs has learned a shortcut (Zech et al. 2018, PLOS Medicine,
"Variable generalization performance of a deep learning model to detect pneumonia in chest
radiographs"). The share of the CAM mass that falls inside the lung fields is a cheap screen for
that. No lung segmentation model can be installed offline here, so the mask is made with classical
image processing, and every score is reported with the method that made its mask.

Method (:func:`lung_mask`), on the preprocessed square radiograph resampled to 256 px:

1. CLAHE (clip 2, 8x8 tiles), then an *anisotropic* Gaussian blur (sigma 1.5 px across, 5 px
   down): the vertical blur merges the roughly horizontal ribs with the dark intercostal spaces
   into one lung field, while the narrow blur across keeps the thin lateral chest wall that
   separates a lung from the air outside the body.
2. Otsu threshold computed on the central region (x 15-85 %, y 10-90 %; mostly body, so the
   threshold splits lung from mediastinum/bone/abdomen rather than body from background); the
   pixels at or below it are "dark".
3. Air outside the body is removed: very dark pixels (< 0.4 x the central median, on the lightly
   blurred image without CLAHE) connected to the image border, dilated by 4 px.
4. The dark pixels are restricted to a generous anatomical gate (two ellipses, centres
   (0.29, 0.48) / (0.71, 0.48), half-axes 0.21 x 0.37; ~50 % of the image) and cut along the
   midline (a dark trachea would join the lungs); a small opening removes specks.
5. On each side of the midline the largest component (>= 1.5 % of the image) is kept; if a side
   has none, the threshold method fails. Holes are filled, a closing (9 px) and a dilation (5 px)
   smooth the outline, and the mask is resized back (nearest) to the input size.
6. Plausibility: total area within 5-60 % of the image and the smaller side at least a fifth of
   the larger one.

If step 5 or 6 fails the method falls back to an anatomical prior: two ellipses at typical lung
positions of a PA film (:data:`PRIOR_ELLIPSES`, fractions of width/height; image left = patient
right): centres (0.30, 0.49) and (0.71, 0.48), half-axes 0.14 x 0.31 and 0.14 x 0.32 (together
~27 % of the image), fitted to the mean threshold mask of 290 Kermany training images.

Measured on the Kermany images (224 px, 'squash'): the prior was used for 0/100 normal, 7/100
bacterial, 3/100 viral train images, 3/100 test images and 0/22 full-resolution originals; median
mask area ~22 %. The prior cases were lungs whitened on one side (lobar consolidation).

Limits (read before trusting a number): the threshold finds *dark* lung, so a lung whitened by
dense consolidation or a large effusion is partly missed (or the image falls back to the prior):
the mask under-covers exactly the regions a good pneumonia model should look at. Hence
:func:`lung_attention` is a screen for gross shortcuts (corners, markers, shoulders, abdomen), not
a measure of localisation accuracy. The heart and mediastinum are excluded; the lung behind the
heart and below the dome of the diaphragm is missed; dark soft tissue of the axilla, shoulders or
neck is sometimes included up to the gate's edge; in a whitened lung the mask may keep only a strip
along the chest wall. Rotated or off-centre films, lateral views, heavy collimation and the
'pad' resize move the anatomy away from the gate and the prior.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["GATE_ELLIPSES", "PRIOR_ELLIPSES", "border_attention", "lung_attention", "lung_mask", "prior_mask"]

#: (centre x, centre y, half-axis x, half-axis y) as fractions of width/height: image-left lung, image-right lung.
PRIOR_ELLIPSES: tuple[tuple[float, float, float, float], ...] = (
    (0.30, 0.49, 0.14, 0.31),
    (0.71, 0.48, 0.14, 0.32),
)
#: Where lung may be at all (step 4), same format: generous, ~50 % of the image.
GATE_ELLIPSES: tuple[tuple[float, float, float, float], ...] = (
    (0.29, 0.48, 0.21, 0.37),
    (0.71, 0.48, 0.21, 0.37),
)
MIN_AREA, MAX_AREA = 0.05, 0.60  # plausible total mask area (fraction of the image)

_WORK = 256  # working resolution (px), so the kernel sizes below mean the same for any input size
_CLAHE_CLIP = 2.0
_BLUR_SIGMA_XY = (1.5, 5.0)
_AIR_FRACTION = 0.4  # outside air: darker than this fraction of the central median
_MIN_COMPONENT = 0.015  # smallest lung component kept (fraction of the image)
_MIN_SIDE_RATIO = 0.2  # smaller lung at least this fraction of the larger


def _kernel(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def prior_mask(shape: tuple[int, int]) -> np.ndarray:
    """The anatomical prior: :data:`PRIOR_ELLIPSES` drawn on a ``shape`` = (H, W) boolean mask."""
    return _ellipses(shape, PRIOR_ELLIPSES)


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


def _ellipses(shape: tuple[int, int], ellipses: tuple[tuple[float, float, float, float], ...]) -> np.ndarray:
    """Boolean (H, W) union of ellipses given as (cx, cy, ax, ay) fractions of width/height."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    u, v = (xx + 0.5) / w, (yy + 0.5) / h
    mask = np.zeros((h, w), bool)
    for cx, cy, ax, ay in ellipses:
        mask |= ((u - cx) / ax) ** 2 + ((v - cy) / ay) ** 2 <= 1.0
    return mask


def _threshold_mask(gray: np.ndarray) -> np.ndarray | None:
    """Steps 1-5 of the module docstring at the working resolution; None when a side has no candidate."""
    n = _WORK
    raw = cv2.resize(gray, (n, n), interpolation=cv2.INTER_AREA)
    img = cv2.createCLAHE(clipLimit=_CLAHE_CLIP, tileGridSize=(8, 8)).apply(raw)
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=_BLUR_SIGMA_XY[0], sigmaY=_BLUR_SIGMA_XY[1])
    lo, hi = int(0.1 * n), int(0.9 * n)
    central = np.ascontiguousarray(img[lo:hi, int(0.15 * n) : int(0.85 * n)])
    t, _ = cv2.threshold(central, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = img <= t

    raw_blur = cv2.GaussianBlur(raw, (0, 0), 2.0)
    air = (raw_blur < _AIR_FRACTION * np.median(raw_blur[lo:hi, lo:hi])).astype(np.uint8)
    _, labels = cv2.connectedComponents(air, connectivity=8)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border[border > 0]).astype(np.uint8)
    outside = cv2.dilate(outside, _kernel(9)).astype(bool)

    cand = (dark & _ellipses((n, n), GATE_ELLIPSES) & ~outside).astype(np.uint8)
    mid = n // 2
    cand[:, mid - 2 : mid + 2] = 0
    cand = cv2.morphologyEx(cand, cv2.MORPH_OPEN, _kernel(5))
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(cand, connectivity=4)
    keep = []
    for right in (False, True):
        areas = [(stats[i, cv2.CC_STAT_AREA], i) for i in range(1, count) if (centroids[i][0] >= mid) == right]
        areas = [(a, i) for a, i in areas if a >= _MIN_COMPONENT * n * n]
        if not areas:
            return None
        keep.append(max(areas)[1])
    mask = _fill_holes(np.isin(labels, keep))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, _kernel(9))
    mask = cv2.dilate(mask, _kernel(5)).astype(bool)
    mask[:, mid - 1 : mid + 1] = False  # the closing may bridge the two lungs over the trachea again
    return mask


def _plausible(mask: np.ndarray) -> bool:
    """Total area within [MIN_AREA, MAX_AREA] and mask pixels on both sides of the midline."""
    area = float(mask.mean())
    if not MIN_AREA <= area <= MAX_AREA:
        return False
    w = mask.shape[1]
    left, right = mask[:, : w // 2].sum(), mask[:, w // 2 :].sum()
    return min(left, right) >= _MIN_SIDE_RATIO * max(left, right)


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
