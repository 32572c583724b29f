"""Percentile bootstrap confidence intervals that resample patients, not images.

Chest X-ray datasets hold several images per patient (Kermany et al. 2018: 5,856 images of
~5,000 patients), and images of one patient share their label and much of their appearance. An
interval that resamples images treats them as independent and comes out too narrow; the cluster
(block) bootstrap draws *patients* with replacement and takes all of a drawn patient's images
along (Field & Welsh 2007, "Bootstrapping clustered data", JRSS-B 69:369), so the interval reflects
the number of independent patients. Intervals are percentile intervals (Efron & Tibshirani 1993,
ch. 13).

Resampling is written here (scikit-learn has no bootstrap). A resample is represented by how many
times each image occurs in it (a row of a (B, N) count matrix); metric functions that carry a
``batched`` attribute (as :func:`~pneumoscope.evaluate.metrics.binary_metrics` and
:func:`~pneumoscope.evaluate.metrics.multiclass_metrics` do, also inside ``functools.partial``)
evaluate all resamples in one vectorised pass (1000 patient resamples of 624 images: ~0.2 s);
anything else is called once per resample (~5-20 ms each with scikit-learn's input checks).
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from pneumoscope.evaluate._checks import to_numpy

logger = logging.getLogger(__name__)

__all__ = ["bootstrap_ci"]

MetricFn = Callable[[np.ndarray, np.ndarray], "float | Mapping[str, Any]"]

#: Upper bound on the elements of one (chunk, N) count matrix, to keep memory flat for large N.
_MAX_CHUNK_ELEMENTS = 2_000_000


def bootstrap_ci(
    metric_fn: MetricFn,
    y_true: np.ndarray,
    prob: np.ndarray,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Point estimate and (1 - alpha) percentile interval of a metric, resampling groups (patients).

    Args:
        metric_fn: ``metric_fn(y_true, prob)`` returning a number or a dict. A dict may nest dicts
            (e.g. ``per_class``); every numeric leaf gets an interval under a dotted key
            (``"per_class.NORMAL.recall"``); non-numeric leaves (lists, strings) are ignored.
            If ``metric_fn`` (or the function inside a ``functools.partial``) has an attribute
            ``batched(y_true, prob, counts, *args, **kw) -> dict[str, ndarray]``, it is used to
            evaluate all resamples at once from the (B, N) matrix of per-image multiplicities.
        y_true: (N,) labels.
        prob: (N,) or (N, C) scores, passed through to ``metric_fn``.
        groups: (N,) group id per image (patient id); all images of a drawn group come along.
            ``None`` resamples images independently.
        n_boot: number of resamples.
        alpha: 0.05 gives 95 % intervals (2.5th and 97.5th percentiles).
        seed: seed of the local ``np.random.default_rng`` (no global state is touched).

    Returns:
        For a scalar metric ``{"point", "lo", "hi", "n_valid"}``; for a dict metric
        ``{key: {"point", "lo", "hi", "n_valid"}}``. ``point`` is the metric on the full data (not
        the bootstrap mean). Resamples in which a value is undefined (NaN/inf, e.g. AUROC of a
        resample that drew only one class) are skipped for that key and ``n_valid`` counts the
        resamples that were used; ``lo``/``hi`` are NaN when none was. A ``ValueError`` from
        ``metric_fn`` on a resample that lost a class counts as undefined for all keys.
    """
    n_boot = int(n_boot)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    y = to_numpy(y_true)
    p = to_numpy(prob)
    n = y.shape[0] if y.ndim else 0
    if n == 0 or p.ndim == 0 or p.shape[0] != n:
        raise ValueError(f"y_true and prob need the same non-zero length, got {y.shape} and {p.shape}")
    if groups is None:
        codes = np.arange(n)
        unit = "images"
    else:
        g = to_numpy(groups)
        if g.shape != (n,):
            raise ValueError(f"groups must have shape ({n},), got {g.shape}")
        if _has_missing(g):
            # np.unique would merge every missing id into one giant "patient"
            raise ValueError("groups contains missing ids (None/NaN): give every image a patient id")
        codes = np.unique(g, return_inverse=True)[1].ravel()
        unit = "groups"
    n_groups = int(codes.max()) + 1

    point_raw = metric_fn(y, p)
    scalar = not isinstance(point_raw, Mapping)
    point = {"value": _as_float(point_raw)} if scalar else _flatten_numeric(point_raw)
    if not point:
        raise ValueError("metric_fn returned no numeric values")
    keys = list(point)
    values = {k: np.full(n_boot, np.nan) for k in keys}

    batched = _batched_form(metric_fn)
    n_classes = np.unique(y).size
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _MAX_CHUNK_ELEMENTS // max(n, n_groups)))
    n_failed = 0
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        counts = _resample_counts(rng, codes, n_groups, b)
        if batched is not None:
            res = batched(y, p, counts)
            for k in keys:
                if k in res:
                    values[k][start : start + b] = np.asarray(res[k], dtype=np.float64)
            continue
        for j in range(b):
            idx = np.repeat(np.arange(n), counts[j])
            yb, pb = y[idx], p[idx]
            try:
                out = metric_fn(yb, pb)
            except ValueError:
                if np.unique(yb).size == n_classes:
                    raise
                n_failed += 1  # a class was lost in this resample: undefined, counted below
                continue
            flat = {"value": _as_float(out)} if scalar else _flatten_numeric(out)
            for k in keys:
                if k in flat:
                    values[k][start + j] = flat[k]

    result: dict[str, dict[str, float | int]] = {}
    q = [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)]
    for k in keys:
        v = values[k][np.isfinite(values[k])]
        lo, hi = (float(x) for x in np.percentile(v, q)) if v.size else (math.nan, math.nan)
        result[k] = {"point": point[k], "lo": lo, "hi": hi, "n_valid": int(v.size)}

    short = {k: r["n_valid"] for k, r in result.items() if r["n_valid"] < n_boot}
    logger.info(
        "bootstrap: %d resamples of %d %s (%d images), %s, %.0f %% percentile intervals",
        n_boot, n_groups, unit, n, "vectorised" if batched is not None else "loop", 100 * (1 - alpha),
    )  # fmt: skip
    if n_failed:
        logger.info("bootstrap: metric_fn raised ValueError on %d resamples that lost a class", n_failed)
    if short:
        level = logging.WARNING if min(short.values()) < 0.9 * n_boot else logging.INFO
        logger.log(level, "bootstrap: undefined in some resamples, valid counts out of %d: %s", n_boot, short)
    return result["value"] if scalar else result


def _resample_counts(rng: np.random.Generator, codes: np.ndarray, n_groups: int, b: int) -> np.ndarray:
    """(b, N) int matrix: how often each image occurs in each of ``b`` group resamples.

    Each resample draws ``n_groups`` groups with replacement; an image occurs as often as its group
    was drawn, so a patient's images always come (and go) together.
    """
    draws = rng.integers(0, n_groups, size=(b, n_groups))
    flat = (draws + (np.arange(b) * n_groups)[:, None]).ravel()
    group_counts = np.bincount(flat, minlength=b * n_groups).reshape(b, n_groups)
    return group_counts[:, codes]


def _batched_form(metric_fn: Any) -> Callable[[np.ndarray, np.ndarray, np.ndarray], Mapping[str, Any]] | None:
    """The vectorised form of ``metric_fn`` (its ``batched`` attribute), seeing through ``functools.partial``."""
    batched = getattr(metric_fn, "batched", None)
    if batched is not None:
        return batched
    if isinstance(metric_fn, functools.partial):
        inner = getattr(metric_fn.func, "batched", None)
        if inner is not None:
            args, kwargs = metric_fn.args, dict(metric_fn.keywords)
            return lambda y, p, counts: inner(y, p, counts, *args, **kwargs)
    return None


def _has_missing(g: np.ndarray) -> bool:
    if g.dtype.kind == "f":
        return bool(np.isnan(g).any())
    if g.dtype.kind == "O":
        return any(v is None or (isinstance(v, float) and math.isnan(v)) for v in g)
    return False


def _as_float(x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"metric_fn must return a number or a dict, got {type(x).__name__}")
    return float(x)


def _flatten_numeric(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict under dotted keys; booleans and non-numbers are skipped."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten_numeric(v, prefix=f"{key}."))
        elif isinstance(v, numbers.Real) and not isinstance(v, bool):
            out[key] = float(v)
    return out
