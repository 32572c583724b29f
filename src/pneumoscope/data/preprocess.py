"""Deterministic preprocessing: decoded grayscale image → fixed-size uint8 array.

This is the part of the pipeline that is the same every epoch, so it is done once per
(file content, parameters) and stored in the on-disk cache (:mod:`pneumoscope.data.cache`).
Augmentation, which must differ every epoch, happens later on tensors (:mod:`pneumoscope.data.presets`).

Steps: grayscale uint8 → resize to ``size``×``size`` (``squash`` like the notebooks, or ``pad`` to keep
the aspect ratio) → optional CLAHE and Gaussian blur (the EfficientNet seed notebook's recipe) → uint8.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

import cv2
import numpy as np

#: Bump when the output of :func:`preprocess` changes for the same parameters; it is part of every cache key.
PREPROCESS_VERSION = 1


@dataclass(frozen=True)
class PreprocessSpec:
    """Parameters of the deterministic preprocessing; its :meth:`key` names the cache."""

    size: int = 224
    resize: Literal["squash", "pad"] = "squash"
    clahe: bool = False
    clahe_clip: float = 2.0
    clahe_grid: int = 8
    blur_sigma: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        return cls(**d)

    def key(self) -> str:
        """A short hash of the parameters and :data:`PREPROCESS_VERSION`."""
        blob = json.dumps({"v": PREPROCESS_VERSION, **self.to_dict()}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def resize_gray(img: np.ndarray, size: int, mode: str = "squash") -> np.ndarray:
    """Resize a 2-D uint8 image to ``size``×``size``.

    ``squash`` ignores the aspect ratio (what the notebooks and the 224-px dataset copy did);
    ``pad`` scales the long side to ``size`` and pads the short side with the image's median border
    value, centred. Area interpolation when shrinking (anti-aliased), bilinear when enlarging.
    """
    h, w = img.shape
    if mode == "squash":
        interp = cv2.INTER_AREA if (h >= size and w >= size) else cv2.INTER_LINEAR
        return cv2.resize(img, (size, size), interpolation=interp)
    if mode != "pad":
        raise ValueError(f"resize mode must be 'squash' or 'pad', got {mode!r}")
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(img, (nw, nh), interpolation=interp)
    border = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]])
    out = np.full((size, size), int(np.median(border)), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = small
    return out


def preprocess(img: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Apply ``spec`` to a decoded image (2-D uint8 grayscale, or H×W×C which is converted)."""
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.shape[2] == 3 else img[..., 0]
    if img.dtype != np.uint8:
        raise ValueError(f"preprocess expects uint8, got {img.dtype}")
    return enhance(resize_gray(np.ascontiguousarray(img), spec.size, spec.resize), spec)


def enhance(img: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The steps of :func:`preprocess` after the resize: ``spec``'s CLAHE, then its Gaussian blur."""
    out = img
    if spec.clahe:
        clahe = cv2.createCLAHE(clipLimit=spec.clahe_clip, tileGridSize=(spec.clahe_grid, spec.clahe_grid))
        out = clahe.apply(out)
    if spec.blur_sigma > 0:
        out = cv2.GaussianBlur(out, (0, 0), sigmaX=spec.blur_sigma)
    return out
