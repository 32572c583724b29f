"""CAM galleries per outcome (TP/TN/FP/FN, or correct/incorrect per class) and attention statistics.

The galleries show the *most confident* cases of each outcome: confident false positives and
negatives are where a shortcut (text markers, a chest drain, the film edge) shows up first.
Selection is deterministic (confidence, then file path), so two runs on the same table give the
same galleries. Attention statistics are computed on the selected images only, so they describe
the confident cases, not the whole test set; they are reported with their counts.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscope.errors import ImageDecodeError
from pneumoscope.explain.lungs import border_attention, lung_attention, lung_mask
from pneumoscope.explain.overlay import new_figure, overlay, save_figure

logger = logging.getLogger(__name__)

__all__ = ["BINARY_GROUPS", "make_gallery", "outcome_galleries", "select_outcomes"]

#: Binary outcome groups: (true label, decision, most confident = highest P(class 1)?).
BINARY_GROUPS: dict[str, tuple[int, int, bool]] = {
    "tp": (1, 1, True),
    "tn": (0, 0, False),
    "fp": (0, 1, True),
    "fn": (1, 0, False),
}


def make_gallery(
    items: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    cols: int = 4,
    title: str = "",
    *,
    alpha: float = 0.4,
) -> Path:
    """One PNG grid of CAM overlays. Each item: ``image`` (2-D uint8), ``cam`` ([0, 1]), ``title`` (str)
    and optionally ``mask`` (boolean lung mask, drawn as a white contour). An empty list gives a
    figure that says so. Written atomically; returns the path."""
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    n = len(items)
    cols = max(1, min(cols, n)) if n else 1
    rows = max(1, math.ceil(n / cols))
    fig = new_figure(max(2.6 * cols, 4.0), 2.8 * rows + (0.5 if title else 0.0))
    if title:
        fig.suptitle(title, fontsize=10 if cols >= 3 else 8)
    if not n:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no images in this group", ha="center", va="center")
        ax.set_axis_off()
        return save_figure(fig, path)
    for k, item in enumerate(items):
        ax = fig.add_subplot(rows, cols, k + 1)
        gray = np.asarray(item["image"])
        ax.imshow(overlay(gray, item["cam"], alpha=alpha))
        mask = item.get("mask")
        if mask is not None and np.asarray(mask).any():
            ax.contour(np.asarray(mask, np.float32), levels=[0.5], colors="white", linewidths=0.7)
        ax.set_title(str(item.get("title", "")), fontsize=7)
        ax.set_axis_off()
    return save_figure(fig, path)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "class"


def select_outcomes(
    rows, class_names: Sequence[str], n_per_group: int = 8, seed: int = 0  # noqa: ANN001 - a DataFrame
) -> dict[str, list[int]]:
    """Row positions (``iloc``) of up to ``n_per_group`` most confident rows per outcome group.

    Binary (two classes; ``prob`` = P(class 1)): ``tp``, ``tn``, ``fp``, ``fn``; TP and FP sorted by
    highest ``prob``, TN and FN by lowest. Multiclass (``prob`` = probability of the decided class):
    ``correct_<class>`` and ``incorrect_<class>`` by true class, highest ``prob`` first. Ties are
    broken by a ``seed``-ed permutation, so the choice is deterministic.
    """
    missing = {"path", "label", "decision", "prob"} - set(rows.columns)
    if missing:
        raise ValueError(f"rows need columns path, label, decision, prob; missing {sorted(missing)}")
    label = rows["label"].to_numpy().astype(np.int64)
    decision = rows["decision"].to_numpy().astype(np.int64)
    prob = rows["prob"].to_numpy().astype(np.float64)
    tiebreak = np.random.default_rng(seed).permutation(len(rows))

    def top(sel: np.ndarray, highest: bool) -> list[int]:
        idx = np.flatnonzero(sel)
        key = -prob[idx] if highest else prob[idx]
        order = np.lexsort((tiebreak[idx], key))
        return [int(i) for i in idx[order][:n_per_group]]

    if len(class_names) == 2:
        return {g: top((label == t) & (decision == d), hi) for g, (t, d, hi) in BINARY_GROUPS.items()}
    groups: dict[str, list[int]] = {}
    for c, name in enumerate(class_names):
        groups[f"correct_{_slug(name)}"] = top((label == c) & (decision == c), True)
        groups[f"incorrect_{_slug(name)}"] = top((label == c) & (decision != c), True)
    return groups


def _group_title(group: str, names: Sequence[str]) -> str:
    if group in BINARY_GROUPS:
        t, d, _ = BINARY_GROUPS[group]
        return f"{group.upper()} (true {names[t]}, decided {names[d]})"
    return group.replace("_", " ")


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def _summary(records: list[dict]) -> dict[str, Any]:
    return {
        "n": len(records),
        "mean_lung_attention": _mean([r["lung_attention"] for r in records]),
        "mean_border_attention": _mean([r["border_attention"] for r in records]),
    }


def _explain_group(
    predictor, rows, positions: list[int], group: str, method: str  # noqa: ANN001
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """CAMs of the decided class for ``rows.iloc[positions]``: (attention records, gallery items)."""
    from pneumoscope.data.imageio import decode_image
    names = list(predictor.class_names)
    prob_label = f"P({names[1]})" if len(names) == 2 else "p"
    images, kept = [], []
    for pos in positions:
        row = rows.iloc[pos]
        try:
            images.append(decode_image(row["path"]))
        except ImageDecodeError as err:
            logger.error("%s", err)
            continue
        kept.append(row)
    if not images:
        return [], []
    u8 = predictor.prepare(images)
    cams = predictor.cams(u8, [int(r["decision"]) for r in kept], method)
    records, items = [], []
    for row, img, cam in zip(kept, u8.numpy(), cams):
        mask, how = lung_mask(img)
        rec = {
            "path": str(row["path"]),
            "group": group,
            "label": names[int(row["label"])],
            "decision": names[int(row["decision"])],
            "prob": float(row["prob"]),
            "lung_attention": lung_attention(cam, mask),
            "border_attention": border_attention(cam),
            "mask_method": how,
        }
        records.append(rec)
        title = f"{Path(rec['path']).name[:28]}\n{prob_label} {rec['prob']:.2f}, lung {rec['lung_attention']:.2f}"
        items.append({"image": img, "cam": cam, "mask": mask, "title": title})
    return records, items


def outcome_galleries(
    predictor,  # noqa: ANN001 - pneumoscope.inference.Predictor
    rows,  # noqa: ANN001 - pandas.DataFrame with path, label, decision, prob
    out_dir: str | os.PathLike[str],
    n_per_group: int = 8,
    method: str = "gradcam",
    seed: int = 0,
    *,
    cols: int = 4,
) -> dict[str, Any]:
    """Write ``gallery_<group>.png`` per outcome group into ``out_dir`` and score CAM attention.

    ``rows`` holds one row per evaluated image: ``path``, ``label`` (int), ``decision`` (int) and
    ``prob`` (P(class 1) for binary models, the decided class's probability otherwise). Each
    selected image is preprocessed with the predictor's own preprocessing and explained for its
    *decided* class; its lung-field and border attention are measured on the same square image.
    Unreadable files are logged and skipped. Returns::

        {"galleries": {group: file name},
         "attention": {"per_image": [...], "by_class": {true class: summary},
                       "by_outcome": {group: summary}, "mask_method_counts": {...}}}

    where a summary is ``{"n", "mean_lung_attention", "mean_border_attention"}``.
    """
    out_dir = Path(out_dir)
    names = list(predictor.class_names)
    groups = select_outcomes(rows, names, n_per_group, seed)
    galleries: dict[str, str] = {}
    per_image: list[dict[str, Any]] = []
    for group, positions in groups.items():
        records, items = _explain_group(predictor, rows, positions, group, method)
        per_image.extend(records)
        filename = f"gallery_{group}.png"
        title = _group_title(group, names) + (f"\n{len(items)} most confident, {method}" if items else "\nno images")
        make_gallery(items, out_dir / filename, cols=cols, title=title)
        galleries[group] = filename
        logger.info("wrote %s (%d images)", out_dir / filename, len(items))
    by_class = {c: _summary([r for r in per_image if r["label"] == c]) for c in names}
    by_outcome = {g: _summary([r for r in per_image if r["group"] == g]) for g in groups}
    counts = {"threshold": 0, "prior": 0}
    for r in per_image:
        counts[r["mask_method"]] += 1
    return {
        "galleries": galleries,
        "attention": {
            "per_image": per_image,
            "overall": _summary(per_image),
            "by_class": by_class,
            "by_outcome": by_outcome,
            "mask_method_counts": counts,
        },
    }
