"""Input checks shared by the evaluation functions.

Every public function in :mod:`pneumoscope.evaluate` turns its inputs into plain numpy arrays and
checks them here, so a wrong shape, a label outside ``{0, 1}`` or a logit passed where a
probability belongs fails at once with a message that says which argument is wrong, instead of
producing a plausible-looking number.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(x: Any) -> np.ndarray:
    """``x`` as a numpy array; torch tensors (also on GPU, also with grad) are detached and copied to CPU.

    Done by duck typing so that this package never imports torch just to read an array.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def check_labels(y_true: Any, n_classes: int = 2, name: str = "y_true") -> np.ndarray:
    """``y_true`` as a 1-D int64 array with values in ``0 .. n_classes - 1``."""
    y = to_numpy(y_true)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise ValueError(f"{name} is empty")
    if y.dtype == bool:
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ValueError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(
            f"{name} must hold labels in 0..{n_classes - 1}, got values {np.unique(y)[:10].tolist()}"
        )
    return y


def check_prob(prob: Any, n: int, name: str = "prob") -> np.ndarray:
    """``prob`` as a 1-D float64 array of length ``n`` with finite values in [0, 1].

    The range check catches the most common mistake in evaluation code: passing logits.
    """
    p = to_numpy(prob)
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    if p.ndim != 1:
        raise ValueError(f"{name} must be 1-D (P(positive class)), got shape {p.shape}")
    if p.shape[0] != n:
        raise ValueError(f"{name} has {p.shape[0]} values but y_true has {n}")
    p = p.astype(np.float64)
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} contains NaN or inf")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(
            f"{name} must be probabilities in [0, 1], got range [{p.min():.4g}, {p.max():.4g}] "
            "(logits? apply a sigmoid/softmax first)"
        )
    return p


def check_probs_2d(probs: Any, n: int, n_classes: int | None = None, name: str = "probs") -> np.ndarray:
    """``probs`` as an (n, C) float64 array of finite values in [0, 1]."""
    p = to_numpy(probs)
    if p.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, C), got shape {p.shape}")
    if p.shape[0] != n:
        raise ValueError(f"{name} has {p.shape[0]} rows but y_true has {n}")
    if n_classes is not None and p.shape[1] != n_classes:
        raise ValueError(f"{name} has {p.shape[1]} columns but {n_classes} classes were named")
    p = p.astype(np.float64)
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} contains NaN or inf")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(
            f"{name} must be probabilities in [0, 1], got range [{p.min():.4g}, {p.max():.4g}] "
            "(logits? apply a softmax first)"
        )
    return p


def check_finite_1d(x: Any, n: int | None, name: str) -> np.ndarray:
    """``x`` as a finite 1-D float64 array (of length ``n`` when given)."""
    a = to_numpy(x).astype(np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} values, expected {n}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a
