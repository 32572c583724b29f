"""Evaluation figures: ROC, PR, confusion matrix, reliability, coverage and training curves.

Each function draws one small figure (5 × 4 in at 120 dpi, i.e. 600 × 480 px, except the stacked
training curves), writes it as PNG through :func:`pneumoscope.utils.io.atomic_path` (a report
never embeds half a file) and returns the path. Figures are built with
``matplotlib.figure.Figure`` on an Agg canvas rather than ``pyplot``: no global figure registry,
no backend switch at import, nothing to close, safe in a server thread.

The numbers in legends (AUROC, AP, ECE, AURC) come from the functions of this package, so a
figure never disagrees with the table beside it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from pneumoscope.evaluate._checks import check_labels, check_prob, to_numpy
from pneumoscope.evaluate.metrics import binary_metrics
from pneumoscope.utils.io import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "plot_confusion",
    "plot_coverage",
    "plot_pr",
    "plot_reliability",
    "plot_roc",
    "plot_training_curves",
]

FIGSIZE: tuple[float, float] = (5.0, 4.0)
DPI = 120

PathLike = str | os.PathLike[str]
Curves = Mapping[str, tuple[np.ndarray, np.ndarray]]


def _figure(figsize: tuple[float, float] = FIGSIZE) -> Figure:
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    logger.debug("wrote %s", path)
    return path


def _checked_curves(curves: Curves) -> list[tuple[str, np.ndarray, np.ndarray]]:
    if not curves:
        raise ValueError("curves is empty: give {label: (y_true, prob)}")
    out = []
    for label, (y_true, prob) in curves.items():
        y = check_labels(y_true, name=f"y_true of {label!r}")
        p = check_prob(prob, y.size, name=f"prob of {label!r}")
        if y.min() == y.max():
            raise ValueError(f"curve {label!r}: needs both classes, got only class {y[0]}")
        out.append((str(label), y, p))
    return out


def _operating_point(label: str, y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    m = binary_metrics(y, p, threshold)
    return {
        "fpr": 1.0 - m["specificity"],
        "tpr": m["sensitivity"],
        "precision": m["precision"],
        "roc_text": f"{label} @ {threshold:.3g}: sens {m['sensitivity']:.2f}, spec {m['specificity']:.2f}",
        "pr_text": f"{label} @ {threshold:.3g}: sens {m['sensitivity']:.2f}, PPV {m['precision']:.2f}",
    }


def plot_roc(
    curves: Curves,
    path: PathLike,
    operating_points: Mapping[str, float] | None = None,
    title: str = "ROC curve",
) -> Path:
    """Overlaid ROC curves, AUROC in the legend.

    Args:
        curves: ``{label: (y_true, prob)}``, e.g. ``{"test": (y, p), "validation": (yv, pv)}``.
        path: output PNG.
        operating_points: ``{label: threshold}``; marks the point that threshold gives on that
            label's data (e.g. the validation-fitted threshold applied to the test curve).
        title: figure title.
    """
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1, label="chance")
    data = _checked_curves(curves)
    colors = {}
    for label, y, p in data:
        fpr, tpr, _ = roc_curve(y, p)
        (line,) = ax.plot(fpr, tpr, linewidth=1.6, label=f"{label} (AUROC {roc_auc_score(y, p):.3f})")
        colors[label] = line.get_color()
    for label, threshold in (operating_points or {}).items():
        match = [(y, p) for lab, y, p in data if lab == label]
        if not match:
            raise ValueError(f"operating point for {label!r}, which is not among the curves {list(curves)}")
        op = _operating_point(label, *match[0], float(threshold))
        ax.plot(op["fpr"], op["tpr"], marker="o", markersize=7, linestyle="none",
                markeredgecolor="black", color=colors[label], label=op["roc_text"])  # fmt: skip
    ax.set(xlim=(0, 1), ylim=(0, 1.01), title=title,
           xlabel="1 − specificity (false-positive rate)", ylabel="sensitivity (true-positive rate)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def plot_pr(
    curves: Curves,
    path: PathLike,
    operating_points: Mapping[str, float] | None = None,
    title: str = "Precision–recall curve",
) -> Path:
    """Overlaid precision–recall curves, average precision in the legend, prevalence as baseline.

    Arguments as :func:`plot_roc`. The curve is drawn as a step function, which is what average
    precision integrates (linear interpolation between PR points would be optimistic).
    """
    fig = _figure()
    ax = fig.add_subplot()
    data = _checked_curves(curves)
    colors = {}
    for label, y, p in data:
        precision, recall, _ = precision_recall_curve(y, p)
        ap = average_precision_score(y, p)
        (line,) = ax.step(recall, precision, where="post", linewidth=1.6, label=f"{label} (AP {ap:.3f})")
        colors[label] = line.get_color()
        prevalence = float(y.mean())
        ax.axhline(prevalence, linestyle=":", linewidth=1, color=line.get_color(),
                   label=f"{label} prevalence {prevalence:.2f}")  # fmt: skip
    for label, threshold in (operating_points or {}).items():
        match = [(y, p) for lab, y, p in data if lab == label]
        if not match:
            raise ValueError(f"operating point for {label!r}, which is not among the curves {list(curves)}")
        op = _operating_point(label, *match[0], float(threshold))
        ax.plot(op["tpr"], op["precision"], marker="o", markersize=7, linestyle="none",
                markeredgecolor="black", color=colors[label], label=op["pr_text"])  # fmt: skip
    ax.set(xlim=(0, 1), ylim=(0, 1.01), title=title, xlabel="recall (sensitivity)", ylabel="precision (PPV)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=7)
    return _save(fig, path)


def plot_confusion(
    cm: np.ndarray | Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: PathLike,
    title: str = "Confusion matrix",
) -> Path:
    """Confusion matrix (rows = true class) with the count and the row percentage in each cell.

    Colour encodes the row fraction (per-class recall on the diagonal), so a rare class's errors
    are as visible as a common class's.
    """
    m = to_numpy(cm)
    names = [str(c) for c in class_names]
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(names):
        raise ValueError(f"cm must be square with one row per class name ({len(names)}), got shape {m.shape}")
    if np.any(m < 0) or np.any(m != np.round(m)):
        raise ValueError("cm must hold non-negative integer counts")
    m = m.astype(np.int64)
    row = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, row, out=np.zeros(m.shape, dtype=np.float64), where=row > 0)

    fig = _figure()
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, label="fraction of true class")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            pct = f"{100 * frac[i, j]:.1f} %" if row[i, 0] > 0 else "n/a"
            ax.text(j, i, f"{m[i, j]}\n{pct}", ha="center", va="center", fontsize=9,
                    color="white" if frac[i, j] > 0.5 else "black")  # fmt: skip
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, names)
    ax.set_yticks(ticks, names)
    ax.set(xlabel="predicted", ylabel="true", title=f"{title} (n = {int(m.sum())})")
    return _save(fig, path)


def plot_reliability(
    before: Mapping[str, Any],
    after: Mapping[str, Any] | None,
    path: PathLike,
    labels: tuple[str, str] = ("before calibration", "after calibration"),
    title: str = "Reliability diagram",
) -> Path:
    """Reliability diagram of one or two :func:`~pneumoscope.evaluate.calibration.reliability_curve` results.

    ECE (with its number of bins, since ECE depends on it) is in the legend; a lower panel shows
    how many cases fall in each bin, because a badly calibrated bin with 3 cases means little.
    """
    curves = [(labels[0], before)] + ([(labels[1], after)] if after is not None else [])
    fig = _figure()
    ax, ax_n = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1, label="perfect calibration")
    width = None
    for k, (label, c) in enumerate(curves):
        for key in ("confidence", "accuracy", "counts", "bin_centers", "ece", "n_bins"):
            if key not in c:
                raise ValueError(f"{label}: not a reliability_curve() result (missing {key!r})")
        conf, acc = np.asarray(c["confidence"]), np.asarray(c["accuracy"])
        counts, centers = np.asarray(c["counts"]), np.asarray(c["bin_centers"])
        ok = counts > 0
        (line,) = ax.plot(conf[ok], acc[ok], marker="o", markersize=4, linewidth=1.5,
                          label=f"{label} (ECE {float(c['ece']):.3f}, {int(c['n_bins'])} bins)")  # fmt: skip
        width = 1.0 / int(c["n_bins"]) / len(curves)
        ax_n.bar(centers + (k - (len(curves) - 1) / 2) * width, counts, width=width * 0.9, color=line.get_color())
    kind = before.get("kind", "binary")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), title=title,
           ylabel="observed fraction positive" if kind == "binary" else "accuracy")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=7)
    ax_n.set(xlabel="predicted probability" if kind == "binary" else "confidence (max probability)",
             ylabel="cases")  # fmt: skip
    return _save(fig, path)


def plot_coverage(curve: Mapping[str, Any], path: PathLike, title: str = "Selective prediction") -> Path:
    """Accuracy of retained cases against coverage, from :func:`~pneumoscope.evaluate.uncertainty.selective_prediction_curve`."""
    for key in ("coverage", "accuracy", "aurc"):
        if key not in curve:
            raise ValueError(f"not a selective_prediction_curve() result (missing {key!r})")
    coverage, accuracy = np.asarray(curve["coverage"]), np.asarray(curve["accuracy"])
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(coverage, accuracy, linewidth=1.6, label=f"retained cases (AURC {float(curve['aurc']):.3f})")
    ax.axhline(float(accuracy[0]), linestyle=":", color="grey", linewidth=1,
               label=f"no referral ({float(accuracy[0]):.3f})")  # fmt: skip
    ax.set(xlim=(0, 1), title=title, xlabel="coverage (fraction of cases not referred)",
           ylabel="accuracy of retained cases")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=7)
    return _save(fig, path)


def training_phase_starts(history: Any, x: np.ndarray) -> list[tuple[float, str]]:
    """``(x position, phase name)`` half an epoch before each epoch whose ``phase`` differs from the last."""
    if "phase" not in history.columns or len(history) == 0:
        return []
    phases = history["phase"].astype(str).to_numpy()
    return [(float(x[i]) - 0.5, phases[i]) for i in range(1, len(phases)) if phases[i] != phases[i - 1]]


def plot_training_curves(history: Any, path: PathLike, title: str = "Training history") -> Path:
    """Loss, AUROC and learning-rate panels from a per-epoch history table.

    ``history`` is a pandas DataFrame with ``epoch`` and any of ``*_loss`` (e.g. ``train_loss``,
    ``val_loss``), ``*_auroc`` and ``lr`` / ``lr*`` columns; panels without columns are left out,
    NaN entries (metrics logged every few epochs) are skipped, and the epoch of the best
    ``val_auroc`` is marked. With a ``phase`` column (two-phase fine-tuning), each phase after the
    first is marked where it starts, so a jump in loss or learning rate is read as the phase change
    it is.
    """
    cols = [str(c) for c in history.columns]
    panels = [
        ("loss", [c for c in cols if c.endswith("_loss") or c == "loss"], False),
        ("AUROC", [c for c in cols if c.endswith("_auroc") or c == "auroc"], False),
        ("learning rate", [c for c in cols if c == "lr" or c.startswith("lr_")], True),
    ]
    panels = [p for p in panels if p[1]]
    if not panels:
        raise ValueError(f"history has no loss, AUROC or lr columns to plot: {cols}")
    x = history["epoch"].to_numpy() if "epoch" in cols else np.arange(len(history))
    best_epoch = None
    if "val_auroc" in cols and history["val_auroc"].notna().any():
        best_epoch = x[int(np.nanargmax(history["val_auroc"].to_numpy(dtype=np.float64)))]
    phase_starts = training_phase_starts(history, x)

    fig = _figure((FIGSIZE[0], max(FIGSIZE[1], 2.2 * len(panels))))
    axes = np.atleast_1d(fig.subplots(len(panels), 1, sharex=True))
    for ax, (name, columns, log_scale) in zip(axes, panels):
        for c in columns:
            v = history[c].to_numpy(dtype=np.float64)
            ok = np.isfinite(v)
            ax.plot(x[ok], v[ok], marker="." if ok.sum() < 30 else None, linewidth=1.4, label=c)
        if log_scale and all((history[c].dropna() > 0).all() for c in columns):
            ax.set_yscale("log")
        if best_epoch is not None:
            ax.axvline(best_epoch, linestyle=":", color="grey", linewidth=1)
        for start, _ in phase_starts:
            ax.axvline(start, linestyle="--", color="tab:purple", linewidth=1, alpha=0.7)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for start, phase in phase_starts:
        axes[0].annotate(f"phase {phase}", xy=(start, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -10),
                         textcoords="offset points", fontsize=7, color="tab:purple")
    axes[0].set_title(title if best_epoch is None else f"{title} (best val AUROC at epoch {best_epoch})")
    axes[-1].set_xlabel("epoch")
    return _save(fig, path)
