"""``pneumoscope data check``: what is in the dataset, and what is wrong with it.

A model is only as honest as its split. Before training we want to know, from the files
themselves: the counts per split x class x subtype, image sizes and modes, class imbalance,
unreadable files, exact and pixel-identical duplicates (and whether a duplicate sits on both
sides of a split), and whether a patient appears in more than one split.

Patient overlap is reported with the naming *series* of the files involved (see
:mod:`pneumoscope.data.names`): in the Kermany data ``person100`` in train is a viral case and
``person100`` in test a bacterial one, and the bacterial and viral person numbers are independent
series, so such a shared id is most likely a numbering coincidence. Only overlaps inside one
series (or with ids from a CSV, whose series is unknown) count as a problem; the others are listed
with that explanation rather than hidden.

Outputs (``out_dir``): ``data_check.json`` (the returned dict), ``data_check.md`` and the figures
``counts.png``, ``sizes.png``, ``samples.png``. All files are written atomically.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pneumoscope.data.imageio import decode_image
from pneumoscope.data.manifest import Manifest, split_sort_key
from pneumoscope.data.names import naming_series
from pneumoscope.data.paths import resolve_data_root
from pneumoscope.data.scan import scan_dataset
from pneumoscope.data.split import validation_split
from pneumoscope.errors import DatasetError, ImageDecodeError
from pneumoscope.utils.io import atomic_path, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

REPORT_JSON = "data_check.json"
REPORT_MD = "data_check.md"
FIGURES = ("counts.png", "sizes.png", "samples.png")


# --------------------------------------------------------------------------------------------
# report (pure: manifest -> dict)


def build_report(manifest: Manifest) -> dict[str, Any]:
    """Every statistic of the check as a JSON-able dict; no files are read or written."""
    df = manifest.df
    ok = df[df["status"] == "ok"]
    report: dict[str, Any] = {
        "root": str(manifest.root),
        "layout": manifest.layout,
        "class_names": manifest.class_names,
        "n_files": int(len(df)),
        "n_ok": int(len(ok)),
        "n_errors": int(len(df) - len(ok)),
        "counts": _counts(ok, "split", manifest.class_names),
        "counts_official": _counts(ok, "official_split", manifest.class_names),
        "image_size": _size_stats(ok),
        "imbalance": _imbalance(ok, manifest.class_names),
        "corrupt": [
            {"path": p, "reason": r, "split": s}
            for p, r, s in zip(df.loc[df["status"] != "ok", "path"], df.loc[df["status"] != "ok", "error"],
                               df.loc[df["status"] != "ok", "split"])
        ],
        "duplicates": {
            "exact": _duplicate_groups(ok, "content_hash"),
            "pixel_identical": _duplicate_groups(ok, "pixel_hash"),
        },
        "patients": _patient_stats(ok),
    }
    dup = report["duplicates"]
    dup["n_exact_groups"] = len(dup["exact"])
    dup["n_pixel_groups"] = len(dup["pixel_identical"])
    dup["n_cross_split_groups"] = sum(g["cross_split"] for g in dup["pixel_identical"])
    dup["n_label_conflict_groups"] = sum(g["labels_conflict"] for g in dup["pixel_identical"])
    report["problems"] = _problems(report)
    return report


def has_problems(report: dict[str, Any]) -> bool:
    """True for corrupt files, duplicates across splits or with conflicting labels, or patients
    (likely the same child) in more than one split."""
    return bool(report.get("problems"))


def _ordered_splits(values: pd.Series) -> list[str]:
    return sorted({v for v in values if v}, key=split_sort_key)


def _counts(ok: pd.DataFrame, split_col: str, class_names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split in _ordered_splits(ok[split_col]):
        part = ok[ok[split_col] == split]
        per_class: dict[str, Any] = {}
        for label in _ordered_labels(part["label"], class_names):
            sub = part[part["label"] == label]
            per_class[label] = {
                "total": int(len(sub)),
                "subtypes": {st or "unknown": int(n) for st, n in sorted(Counter(sub["subtype"]).items())},
            }
        out[split] = {"total": int(len(part)), "classes": per_class}
    return out


def _ordered_labels(labels: pd.Series, class_names: list[str]) -> list[str]:
    present = set(labels)
    return [c for c in class_names if c in present] + sorted(present - set(class_names))


def _size_stats(ok: pd.DataFrame) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for col in ("width", "height"):
        values = ok[col].dropna().astype(int)
        stats[col] = (
            {"min": int(values.min()), "median": float(values.median()), "max": int(values.max())}
            if len(values)
            else {"min": None, "median": None, "max": None}
        )
    stats["modes"] = {m: int(n) for m, n in Counter(ok["mode"]).most_common()}
    return stats


def _imbalance(ok: pd.DataFrame, class_names: list[str]) -> dict[str, Any]:
    """Largest over smallest class count per split (``None`` when a class is missing there)."""
    out: dict[str, Any] = {}
    for split in _ordered_splits(ok["split"]):
        counts = Counter(ok.loc[ok["split"] == split, "label"])
        per_class = {c: int(counts.get(c, 0)) for c in class_names} or dict(counts)
        values = list(per_class.values())
        ratio = (max(values) / min(values)) if values and min(values) > 0 else None
        out[split] = {"counts": per_class, "ratio": None if ratio is None else round(ratio, 3)}
    return out


def _duplicate_groups(ok: pd.DataFrame, hash_col: str) -> list[dict[str, Any]]:
    with_hash = ok[ok[hash_col] != ""]
    dup = with_hash[with_hash.duplicated(hash_col, keep=False)]
    groups = []
    for digest, part in dup.groupby(hash_col, sort=True):
        part = part.sort_values("path")
        groups.append(
            {
                "hash": str(digest),
                "files": [
                    {"path": p, "split": s, "official_split": o, "label": lab, "patient_id": pid}
                    for p, s, o, lab, pid in zip(
                        part["path"], part["split"], part["official_split"], part["label"], part["patient_id"]
                    )
                ],
                "splits": _ordered_splits(part["split"]),
                "cross_split": bool(part["split"].nunique() > 1),
                "cross_official_split": bool(part["official_split"].nunique() > 1),
                "labels_conflict": bool(part["label"].nunique() > 1),
                "patients": sorted(set(part["patient_id"])),
            }
        )
    groups.sort(key=lambda g: (not g["cross_split"], g["files"][0]["path"]))
    return groups


def _patient_stats(ok: pd.DataFrame) -> dict[str, Any]:
    series = [naming_series(os.path.basename(p)) or "" for p in ok["path"]]
    table = ok.assign(series=series)
    return {
        "per_split": {s: int(table.loc[table["split"] == s, "patient_id"].nunique()) for s in _ordered_splits(table["split"])},
        "per_official_split": {
            s: int(table.loc[table["official_split"] == s, "patient_id"].nunique())
            for s in _ordered_splits(table["official_split"])
        },
        "fallback": int((table["patient_source"] == "file").sum()),
        "overlap_split": _overlap(table, "split"),
        "overlap_official": _overlap(table, "official_split"),
    }


def _overlap(table: pd.DataFrame, split_col: str) -> dict[str, Any]:
    """Patient ids seen in more than one split, each with the naming series per split."""
    entries = []
    for pid, part in table.groupby("patient_id", sort=True):
        if not pid or part[split_col].nunique() < 2:
            continue
        per_split = {
            s: sorted({x or "unknown" for x in part.loc[part[split_col] == s, "series"]})
            for s in _ordered_splits(part[split_col])
        }
        series_count = Counter(x for values in per_split.values() for x in values)
        likely_same = any(n > 1 for n in series_count.values())
        entries.append({"patient_id": str(pid), "series": per_split, "likely_same_patient": likely_same})
    pairs = Counter("/".join(e["series"].keys()) for e in entries)
    n_same = sum(e["likely_same_patient"] for e in entries)
    return {
        "n": len(entries),
        "n_likely_same_patient": n_same,
        "n_different_series_only": len(entries) - n_same,
        "by_splits": dict(sorted(pairs.items())),
        "entries": entries,
    }


def _problems(report: dict[str, Any]) -> list[str]:
    problems = []
    if report["n_errors"]:
        problems.append(f"{report['n_errors']} unreadable image files")
    dup = report["duplicates"]
    if dup["n_cross_split_groups"]:
        problems.append(f"{dup['n_cross_split_groups']} groups of pixel-identical images span splits")
    if dup["n_label_conflict_groups"]:
        problems.append(f"{dup['n_label_conflict_groups']} groups of pixel-identical images have different labels")
    overlap = report["patients"]["overlap_split"]
    if overlap["n_likely_same_patient"]:
        problems.append(
            f"{overlap['n_likely_same_patient']} patients (same id and naming series) appear in more than one split"
        )
    return problems


# --------------------------------------------------------------------------------------------
# files


def run_check(manifest: Manifest, out_dir: Path, *, sample_per_class: int = 8) -> dict[str, Any]:
    """Write the JSON/Markdown report and the figures to ``out_dir``; return the report dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(manifest)
    ok = manifest.df[manifest.df["status"] == "ok"]
    _plot_counts(report, out_dir / "counts.png")
    _plot_sizes(ok, manifest.class_names, out_dir / "sizes.png")
    _plot_samples(ok, manifest.class_names, sample_per_class, out_dir / "samples.png")
    report["figures"] = list(FIGURES)
    atomic_write_json(out_dir / REPORT_JSON, report)
    atomic_write_text(out_dir / REPORT_MD, render_markdown(report))
    logger.info("data check written to %s", out_dir)
    return report


def _save_figure(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _new_figure(width: float, height: float) -> Any:
    """A pyplot-free Agg figure: no global backend switch, no figure registry to leak."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _plot_counts(report: dict[str, Any], path: Path) -> None:
    fig = _new_figure(8, 4.5)
    ax = fig.subplots()
    counts = report["counts"]
    subtypes = sorted({st for s in counts.values() for c in s["classes"].values() for st in c["subtypes"]})
    colors = {st: f"C{i}" for i, st in enumerate(subtypes)}
    ticks, labels, x = [], [], 0.0
    for split, entry in counts.items():
        for label, cls in entry["classes"].items():
            bottom = 0
            for st in subtypes:
                n = cls["subtypes"].get(st, 0)
                if n:
                    ax.bar(x, n, bottom=bottom, color=colors[st], width=0.8)
                bottom += n
            ax.text(x, bottom, str(bottom), ha="center", va="bottom", fontsize=8)
            ticks.append(x)
            labels.append(f"{split}\n{label}")
            x += 1
        x += 0.6
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=colors[st], label=st) for st in subtypes], title="subtype", fontsize=8)
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.set_ylabel("images")
    ax.set_title("Images per split, class and subtype")
    _save_figure(fig, path)


def _plot_sizes(ok: pd.DataFrame, class_names: list[str], path: Path) -> None:
    fig = _new_figure(11, 3.6)
    ax_scatter, ax_w, ax_h = fig.subplots(1, 3)
    for i, label in enumerate(_ordered_labels(ok["label"], class_names)):
        part = ok[ok["label"] == label]
        w = part["width"].astype(float).to_numpy()
        h = part["height"].astype(float).to_numpy()
        ax_scatter.scatter(w, h, s=6, alpha=0.4, color=f"C{i}", label=label)
        ax_w.hist(w, bins=30, alpha=0.6, color=f"C{i}", label=label)
        ax_h.hist(h, bins=30, alpha=0.6, color=f"C{i}", label=label)
    ax_scatter.set(xlabel="width (px)", ylabel="height (px)", title="Image sizes")
    ax_w.set(xlabel="width (px)", ylabel="images", title="Width")
    ax_h.set(xlabel="height (px)", ylabel="images", title="Height")
    if len(ok):
        ax_scatter.legend(fontsize=8)
    _save_figure(fig, path)


def _plot_samples(ok: pd.DataFrame, class_names: list[str], per_class: int, path: Path) -> None:
    labels = _ordered_labels(ok["label"], class_names) or ["(no images)"]
    cols = max(1, per_class)
    fig = _new_figure(1.4 * cols, 1.6 * len(labels))
    axes = np.atleast_2d(fig.subplots(len(labels), cols, squeeze=False))
    rng = np.random.default_rng(0)
    for row, label in enumerate(labels):
        part = ok[ok["label"] == label]
        take = rng.choice(len(part), size=min(cols, len(part)), replace=False) if len(part) else []
        picks = part.iloc[sorted(take)] if len(part) else part
        for col in range(cols):
            ax = axes[row, col]
            ax.set_axis_off()
            if col >= len(picks):
                continue
            record = picks.iloc[col]
            try:
                ax.imshow(decode_image(record["path"]), cmap="gray", vmin=0, vmax=255)
            except ImageDecodeError as err:
                ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7)
                logger.warning("sample figure: %s", err)
            ax.set_title(f"{label}/{record['subtype'] or '?'}\n{Path(record['path']).name[:22]}", fontsize=6)
    _save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# text


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page (tables first, long lists at the end)."""
    lines = [
        "# Data check",
        "",
        f"- root: `{report['root']}` (layout `{report['layout']}`)",
        f"- files: {report['n_files']}, readable: {report['n_ok']}, unreadable: {report['n_errors']}",
        f"- classes: {', '.join(report['class_names']) or '(none)'}",
        f"- result: {'PROBLEMS: ' + '; '.join(report['problems']) if report['problems'] else 'no problems found'}",
        "",
        "## Counts (split used for training)",
        "",
        *_counts_table(report["counts"]),
        "",
        "## Counts (official split)",
        "",
        *_counts_table(report["counts_official"]),
        "",
        "## Images",
        "",
    ]
    size = report["image_size"]
    for col in ("width", "height"):
        s = size[col]
        lines.append(f"- {col}: min {s['min']}, median {s['median']}, max {s['max']}")
    lines.append("- modes: " + ", ".join(f"{m or '?'} {n}" for m, n in size["modes"].items()))
    lines += ["", "Class imbalance (largest / smallest class):", ""]
    for split, entry in report["imbalance"].items():
        counts = ", ".join(f"{k} {v}" for k, v in entry["counts"].items())
        lines.append(f"- {split}: {entry['ratio']} ({counts})")
    lines += ["", "## Patients", ""]
    patients = report["patients"]
    lines.append("- per split: " + ", ".join(f"{k} {v}" for k, v in patients["per_split"].items()))
    lines.append("- per official split: " + ", ".join(f"{k} {v}" for k, v in patients["per_official_split"].items()))
    lines.append(f"- files whose name gave no patient id (one patient per file): {patients['fallback']}")
    lines += _overlap_lines("splits used for training", patients["overlap_split"])
    lines += _overlap_lines("official splits", patients["overlap_official"])
    dup = report["duplicates"]
    lines += [
        "",
        "## Duplicates",
        "",
        f"- byte-identical groups: {dup['n_exact_groups']}",
        f"- pixel-identical groups: {dup['n_pixel_groups']} "
        f"({dup['n_cross_split_groups']} across splits, {dup['n_label_conflict_groups']} with different labels)",
        "",
    ]
    for group in dup["pixel_identical"]:
        flag = " **across splits**" if group["cross_split"] else ""
        files = ", ".join(f"`{_short(f['path'], report['root'])}` ({f['split']})" for f in group["files"])
        lines.append(f"- {files}{flag}")
    lines += ["", "## Unreadable files", ""]
    lines += [f"- `{c['path']}`: {c['reason']}" for c in report["corrupt"]] or ["none"]
    if report.get("figures"):
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in report["figures"]]
    return "\n".join(lines) + "\n"


def _counts_table(counts: dict[str, Any]) -> list[str]:
    if not counts:
        return ["(no readable images)"]
    rows = ["| split | class | subtypes | total |", "|---|---|---|---|"]
    for split, entry in counts.items():
        for label, cls in entry["classes"].items():
            subtypes = ", ".join(f"{k} {v}" for k, v in cls["subtypes"].items())
            rows.append(f"| {split} | {label} | {subtypes} | {cls['total']} |")
        rows.append(f"| {split} | **all** | | **{entry['total']}** |")
    return rows


def _overlap_lines(title: str, overlap: dict[str, Any]) -> list[str]:
    lines = [
        f"- patient ids in more than one of the {title}: {overlap['n']} "
        f"({overlap['n_likely_same_patient']} within one naming series -> likely the same child; "
        f"{overlap['n_different_series_only']} only across different naming series -> probably "
        "a numbering coincidence)"
    ]
    if overlap["by_splits"]:
        lines.append("  - by splits: " + ", ".join(f"{k} {v}" for k, v in overlap["by_splits"].items()))
    shown = [e for e in overlap["entries"] if e["likely_same_patient"]][:20]
    for e in shown:
        lines.append(f"  - `{e['patient_id']}`: " + "; ".join(f"{s}: {', '.join(v)}" for s, v in e["series"].items()))
    return lines


def _short(path: str, root: str) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path


def format_summary(report: dict[str, Any]) -> str:
    """A few human lines for the terminal (the full story is in ``data_check.md``)."""
    lines = [f"data check of {report['root']} ({report['layout']} layout)"]
    lines.append(
        f"{report['n_files']} image files, {report['n_ok']} readable, {report['n_errors']} unreadable; "
        f"classes: {', '.join(report['class_names']) or 'none'}"
    )
    for split, entry in report["counts"].items():
        parts = []
        for label, cls in entry["classes"].items():
            subtypes = "/".join(f"{v} {k}" for k, v in cls["subtypes"].items())
            parts.append(f"{label} {cls['total']}" + (f" ({subtypes})" if len(cls["subtypes"]) > 1 else ""))
        lines.append(f"  {split}: {entry['total']} = " + ", ".join(parts))
    dup = report["duplicates"]
    lines.append(
        f"duplicates: {dup['n_pixel_groups']} pixel-identical groups "
        f"({dup['n_cross_split_groups']} across splits), {dup['n_exact_groups']} byte-identical"
    )
    ov = report["patients"]["overlap_official"]
    lines.append(
        f"patients: {ov['n']} ids shared between official splits, {ov['n_likely_same_patient']} within one "
        f"naming series; {report['patients']['fallback']} files without a patient id in the name"
    )
    lines.append("problems: " + ("; ".join(report["problems"]) if report["problems"] else "none"))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI entry


def check_command(
    data: str | None,
    out: Path,
    manifest_out: Path | None = None,
    val_fraction: float = 0.15,
    seed: int = 0,
    *,
    split_method: str = "random",
    val_source: str | None = None,
    progress: bool = True,
    workers: int = 2,
) -> int:
    """Scan, split, save the manifest, write the report; exit code 0 when clean, 1 with problems.

    ``data`` is the ``--data`` value (``None``: ``$PNEUMOSCOPE_DATA``). Each unreadable file is
    logged as one ``path: reason`` line.
    """
    out = Path(out)
    root = resolve_data_root(data)
    manifest = scan_dataset(root, progress=progress, workers=workers)
    try:
        manifest = validation_split(manifest, val_fraction=val_fraction, seed=seed, method=split_method,
                                    val_source=val_source, progress=progress, workers=workers)
    except DatasetError as err:
        if val_source is not None:  # asked for by name: a bad external set stops the check
            raise
        logger.warning("no validation split cut: %s", err)
    manifest.save(Path(manifest_out) if manifest_out else out / "manifest.parquet")
    report = run_check(manifest, out)
    for bad in report["corrupt"]:
        logger.error("%s: %s", bad["path"], bad["reason"])
    for line in format_summary(report).splitlines():
        logger.info("%s", line)
    return 1 if has_problems(report) else 0
