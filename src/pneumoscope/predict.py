"""Predict image files, folders or a CSV of paths with a trained or exported model.

``pneumoscope predict MODEL INPUT... --out DIR`` is :func:`predict_command`, a thin wrapper around
:func:`predict_files`. The model is a run, checkpoint or exported (ONNX) directory, loaded with
:func:`~pneumoscope.inference.load_predictor`; files of any size and format (JPEG, PNG 8/16-bit
gray/RGB/RGBA/palette, DICOM) are decoded by :func:`~pneumoscope.data.imageio.decode_image` and
preprocessed by the model's own :meth:`~pneumoscope.inference.Predictor.prepare`, the same code
evaluation and the server use.

The output table has one row per file: ``file``, ``prob_<class>`` per class (temperature
calibrated), ``decision`` (class name, from the stored threshold), ``threshold``, ``uncertainty``
(predictive entropy in nats of the probabilities, averaged over test-time augmentations when
``tta > 0``), ``refer`` (uncertainty above the model's ``refer_threshold`` when model.json has one)
and ``error`` (empty, or the one-line reason a file could not be used). A bad file never stops
the run: it is logged as ``path: reason`` and gets an error row.

Resumable: the CSV is rewritten atomically after each batch (see :class:`_CsvWriter` for the
throttle on very large tables), and a second run with the same ``--out`` skips files that already
have a prediction (failed files are tried again), so a killed run loses at most the batch in
flight and never duplicates a row.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from pneumoscope.data.imageio import NON_UTF8_NAME_REASON, SUPPORTED_EXTENSIONS, decode_image, display_path
from pneumoscope.errors import ConfigError, DatasetError, ImageDecodeError, ModelError
from pneumoscope.inference import Predictor, backend_of, load_predictor, model_version, pytorch_predictor
from pneumoscope.utils.faults import fault_point
from pneumoscope.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

CSV_NAME = "predictions.csv"
JSON_NAME = "predictions.json"
CAM_DIR = "cam"
#: Longest side of the images written with Grad-CAM overlays (and returned by the server).
CAM_MAX_SIDE = 1024


# --------------------------------------------------------------------------------------------
# inputs


def iter_image_files(folder: str | Path) -> Iterator[str]:
    """Image files under ``folder``, recursively, depth first in name order.

    The dataset scan's walker (:func:`pneumoscope.data.scan.walk_files`): hidden entries skipped,
    directory symlinks followed but every real directory visited once, so a loop ends; image
    extensions plus extension-less files with a DICOM preamble.
    """
    from pneumoscope.data.scan import is_candidate, walk_files

    for path in walk_files(Path(folder)):
        if is_candidate(path):
            yield str(path)


def _csv_paths(csv_path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Paths from a CSV's ``path`` column, relative ones taken relative to the CSV's folder."""
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise DatasetError(f"{csv_path}: cannot read as CSV: {err}") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    if "path" not in table.columns:
        raise DatasetError(f"{csv_path}: CSV has no 'path' column (found: {', '.join(table.columns) or 'none'})")
    files, problems = [], []
    for line_no, raw in enumerate(table["path"].str.strip(), start=2):
        if not raw:
            problems.append((f"{csv_path}:{line_no}", "empty path"))
        else:
            files.append(raw if os.path.isabs(raw) else os.path.normpath(os.path.join(csv_path.parent, raw)))
    return files, problems


def collect_inputs(inputs: Sequence[str | Path]) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand files, folders (recursive) and CSVs (``path`` column) into a list of files.

    Returns ``(files, problems)``: files in the order given (duplicates dropped, first kept) and
    ``(where, reason)`` for entries that name no file at all (an empty CSV cell). A path that does
    not exist is kept as a file: decoding reports it like any other bad file.
    """
    files: list[str] = []
    problems: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list(iter_image_files(p))
            if not found:
                log.warning("%s: no image files found (extensions %s)", p, ", ".join(sorted(SUPPORTED_EXTENSIONS)))
            files.extend(found)
        elif p.suffix.lower() == ".csv" and p.is_file():
            found, bad = _csv_paths(p)
            files.extend(found)
            problems.extend(bad)
        else:
            files.append(str(item))
    unique = list(dict.fromkeys(files))
    if len(unique) < len(files):
        log.warning("%d files were listed more than once; each is predicted once", len(files) - len(unique))
    # a name that is not UTF-8 cannot be written to the CSV/JSON table: reported, not predicted
    problems += [(display_path(f), NON_UTF8_NAME_REASON) for f in unique if display_path(f) != f]
    return [f for f in unique if display_path(f) == f], problems


# --------------------------------------------------------------------------------------------
# one batch


def prob_column(class_name: str) -> str:
    return f"prob_{class_name}"


def output_columns(class_names: Sequence[str]) -> list[str]:
    """Columns of the prediction table, in order."""
    return ["file", *[prob_column(c) for c in class_names], "decision", "threshold", "uncertainty", "refer", "error"]


def refer_threshold(meta: dict) -> float | None:
    """The uncertainty cut-off stored in model.json (``refer_threshold``: a number or ``{"threshold": x}``)."""
    value = meta.get("refer_threshold")
    if isinstance(value, dict):
        value = value.get("threshold", value.get("uncertainty_threshold"))
    return None if value is None else float(value)


@dataclass
class BatchResult:
    """Predictions for N prepared images: calibrated ``probs`` (N, C), ``decision`` class indices,
    ``uncertainty`` (predictive entropy, nats) and ``refer`` flags."""

    probs: np.ndarray
    decision: np.ndarray
    uncertainty: np.ndarray
    refer: np.ndarray


def tta_mean_probs(predictor: Predictor, u8: torch.Tensor, n: int, *, plain: np.ndarray | None = None,
                   seed: int = 0, batch_size: int = 64) -> np.ndarray:
    """The mean of the plain pass and ``n`` mildly augmented passes (:meth:`Predictor.tta_probs`).

    The one definition of a TTA mean, shared by ``predict --tta`` and ``evaluate --tta``. The
    passes run ``batch_size`` images at a time: ``evaluate`` hands over a whole split, and one
    forward pass over 900 images at once held about 13 GB of activations.
    """
    if plain is None:
        plain = predictor.predict_u8(u8, batch_size=batch_size).probs
    return np.concatenate([plain[None], predictor.tta_probs(u8, n, seed=seed, batch_size=batch_size)]).mean(0)


def predict_prepared(predictor: Predictor, u8: torch.Tensor, *, tta: int = 0) -> BatchResult:
    """Predict preprocessed uint8 images (N, S, S). With ``tta > 0`` the probabilities are the mean
    of the plain pass and ``tta`` mildly augmented passes (:func:`tta_mean_probs`).

    ``refer`` compares the single-pass entropy with the model's cut-off, which ``evaluate`` fits on
    that same single-pass entropy of the validation split, whatever ``tta`` is.
    """
    from pneumoscope.evaluate.uncertainty import predictive_entropy

    batch = max(1, len(u8))  # the caller's batch (predict batches its files), in one pass
    plain = predictor.predict_u8(u8, batch_size=batch).probs
    probs = tta_mean_probs(predictor, u8, tta, plain=plain, batch_size=batch) if tta > 0 else plain
    uncertainty = predictive_entropy(np.clip(probs, 0.0, 1.0))
    cut = refer_threshold(predictor.meta)
    single = uncertainty if tta == 0 else predictive_entropy(np.clip(plain, 0.0, 1.0))
    refer = single > cut if cut is not None else np.zeros(len(probs), bool)
    return BatchResult(probs=probs, decision=predictor.decide(probs), uncertainty=uncertainty, refer=refer)


def cam_overlays(predictor: Predictor, u8: torch.Tensor, originals: Sequence[np.ndarray],
                 target: Sequence[int], *, max_side: int = CAM_MAX_SIDE) -> list[tuple[np.ndarray, np.ndarray]]:
    """Grad-CAM of class ``target[i]`` for each prepared image, shown on the original image.

    ``predictor`` must have a PyTorch model (see :func:`~pneumoscope.inference.pytorch_predictor`).
    The map computed on the model input is mapped back to the original geometry (undoing the
    ``pad`` letterbox when the model uses it) and drawn on the original image scaled to at most
    ``max_side`` pixels. Returns ``(gray_u8, overlay_rgb_u8)`` pairs of the same height and width.
    """
    import cv2

    from pneumoscope.explain.overlay import overlay

    cams = np.asarray(predictor.cams(u8, [int(t) for t in target], "gradcam"), np.float32)
    size = predictor.spec.size
    out = []
    for img, cam in zip(originals, cams):
        if cam.shape != (size, size):
            cam = cv2.resize(cam, (size, size), interpolation=cv2.INTER_LINEAR)
        h, w = img.shape
        if predictor.spec.resize == "pad":  # the same geometry as data.preprocess.resize_gray
            scale = size / max(h, w)
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            top, left = (size - nh) // 2, (size - nw) // 2
            cam = cam[top : top + nh, left : left + nw]
        scale = min(1.0, max_side / max(h, w))
        dh, dw = max(1, round(h * scale)), max(1, round(w * scale))
        gray = cv2.resize(img, (dw, dh), interpolation=cv2.INTER_AREA) if (dh, dw) != (h, w) else img
        cam = np.clip(cv2.resize(np.ascontiguousarray(cam), (dw, dh), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
        out.append((gray, np.asarray(overlay(gray, cam), np.uint8)))
    return out


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG encoding of a uint8 gray (H, W) or RGB (H, W, 3) array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _cam_names(files: Sequence[str]) -> dict[str, str]:
    """``file -> <stem>.png``; stems that occur more than once get a short hash of the path."""
    stems = [Path(f).stem or "image" for f in files]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return {f: (s if counts[s] == 1 else f"{s}-{hashlib.sha1(f.encode()).hexdigest()[:8]}") + ".png"
            for f, s in zip(files, stems)}


# --------------------------------------------------------------------------------------------
# output files


@dataclass(frozen=True)
class OutputPaths:
    """Where the table goes: ``--out x.csv`` / ``x.json`` name one of the pair, a folder gets both."""

    csv: Path
    json: Path
    cam_dir: Path

    @classmethod
    def from_out(cls, out: str | Path) -> "OutputPaths":
        out = Path(out)
        suffix = out.suffix.lower()
        if suffix == ".csv":
            csv, js = out, out.with_suffix(".json")
        elif suffix == ".json":
            csv, js = out.with_suffix(".csv"), out
        else:
            csv, js = out / CSV_NAME, out / JSON_NAME
        return cls(csv=csv, json=js, cam_dir=csv.parent / CAM_DIR)


def _read_previous(paths: OutputPaths, columns: list[str], threshold: float | None, version: str) -> list[dict]:
    """Rows of an earlier run with the same output, after checking it was made by this model."""
    if not paths.csv.exists():
        return []
    numeric = [c for c in columns if c.startswith("prob_")] + ["threshold", "uncertainty"]
    try:
        df = pd.read_csv(paths.csv, dtype={"file": str, "decision": str, "error": str}, keep_default_na=False,
                         na_values={c: [""] for c in numeric})
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise DatasetError(f"{paths.csv}: cannot read the previous predictions to resume ({err}); "
                           "delete it or choose another --out") from None
    if list(df.columns) != columns:
        raise ModelError(f"{paths.csv}: written for other classes/columns ({', '.join(map(str, df.columns))}); "
                         "cannot resume with this model - choose another --out")
    try:
        info = json.loads(paths.json.read_text()) if paths.json.exists() else {}
    except (OSError, ValueError):
        info = {}
    if info.get("model_version") not in (None, version):
        raise ModelError(f"{paths.json}: written by model version {info['model_version']}, this is {version}; "
                         "choose another --out to keep both")
    df["refer"] = df["refer"].astype(str).str.lower().isin(["true", "1"])
    done = df[df["error"] == ""]
    if threshold is not None and len(done) and not np.allclose(done["threshold"].astype(float), threshold, atol=1e-9):
        raise ModelError(f"{paths.csv}: written with another decision threshold; choose another --out")
    return df.to_dict("records")


class _CsvWriter:
    """Rewrite the CSV atomically after each batch (header + all rows so far).

    Each rewrite costs O(table size); to keep a 100k-file run from spending its time rewriting, a
    write is skipped while less than 10x the duration of the previous write has passed since it,
    which bounds the overhead to ~10 % and the work at risk to a fraction of a second. The final
    :meth:`flush` always writes.
    """

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = path
        self.columns = columns
        self.header = pd.DataFrame(columns=columns).to_csv(index=False)
        self.chunks: list[str] = []
        self._last_end = 0.0
        self._last_cost = 0.0

    def add(self, rows: list[dict]) -> None:
        if rows:
            self.chunks.append(pd.DataFrame(rows, columns=self.columns).to_csv(index=False, header=False))
        if time.perf_counter() - self._last_end >= 10 * self._last_cost:
            self.flush()

    def flush(self) -> None:
        start = time.perf_counter()
        atomic_write_text(self.path, self.header + "".join(self.chunks))
        self._last_end = time.perf_counter()
        self._last_cost = self._last_end - start


# --------------------------------------------------------------------------------------------
# the command


def predict_files(
    model: str | Path | Predictor,
    inputs: list[str],
    *,
    out: Path | None,
    batch_size: int = 32,
    cam: bool = False,
    tta: int = 0,
    progress: bool = True,
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Predict every image in ``inputs`` (files, folders, CSVs); see the module docstring.

    Returns the table (one row per input file, in input order; rows kept from an earlier run
    with the same ``out`` that are not among ``inputs`` come last) and the ``(file, reason)``
    failures of this call. With ``out`` None nothing is written. ``cam`` writes a Grad-CAM
    overlay per file to ``<out dir>/cam/<stem>.png`` (needs the PyTorch weights).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if tta < 0:
        raise ConfigError(f"tta must be >= 0, got {tta}")
    if cam and out is None:
        raise ConfigError("cam=True needs an output location (--out) for the overlay images")
    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    cam_predictor = pytorch_predictor(predictor) if cam else None  # fails early when impossible
    version = model_version(predictor)
    columns = output_columns(predictor.class_names)
    paths = OutputPaths.from_out(out) if out is not None else None

    files, problems = collect_inputs(inputs)
    previous = _read_previous(paths, columns, predictor.threshold, version) if paths else []
    rows: dict[str, dict] = {r["file"]: r for r in previous if not r["error"]}
    todo = [f for f in files if f not in rows]
    if len(todo) < len(files):
        log.info("%s: %d of %d files already predicted; skipping them", paths.csv, len(files) - len(todo), len(files))
    errors: list[tuple[str, str]] = []
    for where, reason in problems:
        log.error("%s: %s", where, reason)
        rows[where] = _error_row(where, reason, predictor)
        errors.append((where, reason))

    writer = _CsvWriter(paths.csv, columns) if paths else None
    if writer:
        writer.add(list(rows.values()))
    cam_names = _cam_names(files) if cam else {}
    bar = tqdm(total=len(todo), unit="img", desc="predict", disable=not progress, file=sys.stderr)
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            new_rows, new_errors = _predict_batch(predictor, batch, tta=tta, cam_predictor=cam_predictor,
                                                  cam_dir=paths.cam_dir if paths else None, cam_names=cam_names)
            rows.update((r["file"], r) for r in new_rows)
            errors.extend(new_errors)
            fault_point("predict_batch")  # tests: killed after predicting, before the CSV rewrite
            if writer:
                writer.add(new_rows)
            bar.update(len(batch))
    finally:
        bar.close()
        if writer:
            writer.flush()

    order = {f: i for i, f in enumerate([w for w, _ in problems] + files)}
    table = pd.DataFrame(sorted(rows.values(), key=lambda r: order.get(r["file"], len(order))), columns=columns)
    table["refer"] = table["refer"].astype(bool)
    if paths:
        atomic_write_text(paths.csv, table.to_csv(index=False))
        atomic_write_json(paths.json, {
            "model_id": predictor.model_id, "model_version": version, "backend": backend_of(predictor),
            "class_names": predictor.class_names, "threshold": predictor.threshold,
            "refer_threshold": refer_threshold(predictor.meta), "tta": tta,
            "predictions": table.to_dict("records"),
        })
    n_ok = int((table["error"] == "").sum())
    log.info("%d files predicted, %d failed%s", n_ok, len(table) - n_ok, f"; table: {paths.csv}" if paths else "")
    return table, errors


def _error_row(file: str, reason: str, predictor: Predictor) -> dict:
    row: dict = {"file": file}
    row.update({prob_column(c): float("nan") for c in predictor.class_names})
    row.update(decision="", threshold=predictor.threshold if predictor.threshold is not None else float("nan"),
               uncertainty=float("nan"), refer=False, error=reason)
    return row


def _predict_batch(predictor: Predictor, batch: list[str], *, tta: int, cam_predictor: Predictor | None,
                   cam_dir: Path | None, cam_names: dict[str, str]) -> tuple[list[dict], list[tuple[str, str]]]:
    rows: dict[str, dict] = {}
    errors: list[tuple[str, str]] = []
    ok_files, originals, prepared = [], [], []
    for f in batch:
        try:
            img = decode_image(f, name=f)
            prepared.append(predictor.prepare([img])[0])
        except ImageDecodeError as err:
            reason = err.reason
        except Exception as err:  # noqa: BLE001 - one odd file must not stop the run
            reason = f"cannot preprocess: {type(err).__name__}: {err}"
        else:
            ok_files.append(f)
            originals.append(img)
            continue
        log.error("%s: %s", f, reason)
        rows[f] = _error_row(f, reason, predictor)
        errors.append((f, reason))
    if ok_files:
        u8 = torch.stack(prepared)
        res = predict_prepared(predictor, u8, tta=tta)
        thr = predictor.threshold if predictor.threshold is not None else float("nan")
        for i, f in enumerate(ok_files):
            row: dict = {"file": f}
            row.update({prob_column(c): float(res.probs[i, k]) for k, c in enumerate(predictor.class_names)})
            row.update(decision=predictor.class_names[int(res.decision[i])], threshold=thr,
                       uncertainty=float(res.uncertainty[i]), refer=bool(res.refer[i]), error="")
            rows[f] = row
        if cam_predictor is not None and cam_dir is not None:
            _write_cams(cam_predictor, u8, originals, res.decision, [cam_dir / cam_names[f] for f in ok_files])
    return [rows[f] for f in batch], errors


def _write_cams(predictor: Predictor, u8: torch.Tensor, originals: list[np.ndarray], target: np.ndarray,
                dests: list[Path]) -> None:
    try:
        pairs = cam_overlays(predictor, u8, originals, target.tolist())
    except Exception as err:  # noqa: BLE001 - the predictions stand; only the pictures are missing
        log.error("Grad-CAM failed for %d files (%s: %s); predictions kept", len(dests), type(err).__name__, err)
        return
    for (_, rgb), dest in zip(pairs, dests):
        atomic_write_bytes(dest, png_bytes(rgb))


def format_table(table: pd.DataFrame, class_names: Sequence[str], max_rows: int = 20) -> str:
    """A short plain-text view of the prediction table (first ``max_rows`` rows and a summary)."""
    if table.empty:
        return "no files\n"
    show = class_names[1:] if len(class_names) == 2 else class_names
    width = min(60, max(len("file"), *(len(str(f)) for f in table["file"].head(max_rows))))
    probs = "  ".join(f"{('p_' + c)[:12]:>12}" for c in show)
    head = f"{'file':<{width}}  {probs}  {'decision':<12} {'uncert':>6} refer"
    lines = [head]
    for r in table.head(max_rows).to_dict("records"):
        name = str(r["file"])
        name = name if len(name) <= width else "..." + name[-(width - 3):]
        if r["error"]:
            lines.append(f"{name:<{width}}  ERROR: {r['error']}")
            continue
        probs = "  ".join(f"{r[prob_column(c)]:>12.4f}" for c in show)
        lines.append(f"{name:<{width}}  {probs}  {str(r['decision'])[:12]:<12} {r['uncertainty']:>6.3f} "
                     f"{'yes' if r['refer'] else ''}")
    if len(table) > max_rows:
        lines.append(f"... {len(table) - max_rows} more rows")
    ok = table[table["error"] == ""]
    counts = ", ".join(f"{int((ok['decision'] == c).sum())} {c}" for c in class_names)
    lines.append(f"{len(table)} files: {counts}, {len(table) - len(ok)} failed, {int(ok['refer'].sum())} to refer")
    return "\n".join(lines) + "\n"


def predict_command(model: str | Path, inputs: list[str], *, out: str | Path | None = None, batch_size: int = 32,
                    cam: bool = False, tta: int = 0, progress: bool = True) -> int:
    """CLI glue for ``pneumoscope predict``: run, print a short table; exit code 0 if every file
    succeeded, 1 if any failed."""
    predictor = load_predictor(model)
    table, errors = predict_files(predictor, inputs, out=Path(out) if out is not None else None,
                                  batch_size=batch_size, cam=cam, tta=tta, progress=progress)
    sys.stdout.write(format_table(table, predictor.class_names))
    if out is not None:
        paths = OutputPaths.from_out(out)
        sys.stdout.write(f"written: {paths.csv}, {paths.json}" + (f", {paths.cam_dir}/" if cam else "") + "\n")
    return 1 if errors else 0
