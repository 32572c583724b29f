"""Scan a dataset folder (or CSV) into a :class:`~pneumoscope.data.manifest.Manifest`.

Layouts, detected in this order:

``kermany``
    ``[...]/train|val|test/<CLASS>/*`` (any case; ``training``/``validation``/``valid``/
    ``testing`` accepted). The published zip unpacks to ``chest_xray/`` holding the splits, a
    second full copy in ``chest_xray/chest_xray/`` and resource forks in ``__MACOSX/``: every image
    is counted once, keyed by (split, class, path inside the class folder) and taken from the
    OUTERMOST copy that has it (inner copies only add files the outer one lacks; a same-named file
    of another size is reported). ``__MACOSX``, hidden files and AppleDouble ``._*`` files are
    ignored.
``classfolders``
    ``ROOT/<CLASS>/*``: every image is in the official split ``train``.
``csv``
    ``root`` is a CSV file with columns ``path,label[,patient_id,split]``; relative paths are
    resolved against the CSV's folder, and a path leaving that folder (``..`` or an absolute path
    elsewhere) becomes an error row ("path outside dataset root"), so a shared CSV cannot make the
    tool read arbitrary files.

Every image is read and decoded exactly once (threads: Pillow and hashlib release the GIL while
decoding and hashing) to fill width/height/mode, the content hash and the pixel hash, and to find
broken files. A bad file never stops the scan: it becomes a row with ``status='error'`` and a
reason. Directory symlinks are followed, but each real directory is visited once, so symlink loops
cannot hang the scan. A folder with no images, or with a single class, still scans;
:func:`~pneumoscope.data.manifest.require_classes` is what refuses it for training.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from pneumoscope.data.imageio import (
    DEFAULT_MAX_PIXELS,
    NON_UTF8_NAME_REASON,
    display_path,
    is_image_name,
    pixel_digest,
    read_file_bytes,
    read_image,
)
from pneumoscope.data.manifest import MANIFEST_COLUMNS, Manifest
from pneumoscope.data.names import normalize_label, parse_filename
from pneumoscope.errors import DatasetError, ImageDecodeError

logger = logging.getLogger(__name__)

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
OUTSIDE_ROOT = "path outside dataset root"
_MAX_SEARCH_DEPTH = 3


@dataclass(frozen=True)
class _Entry:
    """One file to inspect, with what its location already says about it."""

    path: str
    official_split: str
    label: str
    subtype: str
    patient_id: str
    patient_source: str
    error: str = ""


def scan_dataset(
    root: str | os.PathLike[str],
    *,
    progress: bool = True,
    workers: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Manifest:
    """Find, label and decode every image under ``root``; one manifest row per image file.

    ``split`` equals ``official_split`` here; :func:`~pneumoscope.data.split.patient_split`
    cuts the validation set afterwards.
    """
    root = Path(os.path.abspath(os.path.expanduser(root)))
    if not root.exists():
        raise DatasetError(f"{root}: dataset path does not exist")
    started = time.perf_counter()
    if root.is_file():
        if is_image_name(root):
            raise DatasetError(f"{root}: this is one image; pass the dataset folder or a CSV file")
        layout, entries = "csv", _entries_from_csv(root)
    else:
        layout, entries = _entries_from_folders(root)
    rows = _inspect_all(entries, progress=progress, workers=workers, max_pixels=max_pixels)
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    df = df.sort_values("path", kind="stable").reset_index(drop=True)
    class_names = sorted({label for label in df["label"] if label})
    manifest = Manifest(df, root, layout, class_names)
    _log_result(manifest, time.perf_counter() - started)
    return manifest


# --------------------------------------------------------------------------------------------
# folder layouts


def _is_ignored(name: str) -> bool:
    """Hidden files, AppleDouble ``._*`` forks and macOS zip metadata are never data."""
    return name.startswith(".") or name == "__MACOSX"


def _subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders (symlinks followed), sorted by name; unreadable folders give []."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as err:
        logger.warning("%s: cannot list folder (%s)", folder, err.strerror or err)
        return []
    out = []
    for entry in entries:
        if _is_ignored(entry.name):
            continue
        try:
            if entry.is_dir():
                out.append(Path(entry.path))
        except OSError:
            continue
    return out


def walk_files(top: Path) -> Iterator[Path]:
    """Every non-hidden file under ``top``, depth first in name order.

    Directory symlinks are followed, but each real directory only once: a loop (``a/b -> a``)
    ends instead of recursing forever.
    """
    seen: set[str] = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            logger.debug("%s: already visited (symlink), skipped", folder)
            continue
        seen.add(real)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            logger.warning("%s: cannot list folder (%s)", folder, err.strerror or err)
            continue
        subdirs = []
        for entry in entries:
            if _is_ignored(entry.name):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(Path(entry.path))
            else:
                yield Path(entry.path)
        stack.extend(reversed(subdirs))


def is_candidate(path: Path) -> bool:
    """Image extension, or no extension and a DICOM preamble (DICOM files often have none)."""
    if is_image_name(path):
        return True
    if path.suffix:
        return False
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _split_folders(folder: Path) -> list[tuple[str, Path]]:
    """``(canonical split, folder)`` for the split folders directly inside ``folder``."""
    return [(SPLIT_ALIASES[d.name.lower()], d) for d in _subdirs(folder) if d.name.lower() in SPLIT_ALIASES]


def _kermany_roots(root: Path) -> list[Path]:
    """Folders that hold split folders with class folders in them, outermost first."""
    found: list[Path] = []
    seen: set[str] = set()
    queue: list[tuple[Path, int]] = [(root, 0)]
    while queue:
        folder, depth = queue.pop(0)
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        splits = _split_folders(folder)
        if any(_subdirs(split_dir) for _, split_dir in splits):
            found.append(folder)
        if depth < _MAX_SEARCH_DEPTH:
            queue.extend(
                (d, depth + 1) for d in _subdirs(folder) if d.name.lower() not in SPLIT_ALIASES
            )
    return found


def _entries_from_folders(root: Path) -> tuple[str, list[_Entry]]:
    kermany_roots = _kermany_roots(root)
    if kermany_roots:
        return "kermany", _kermany_entries(kermany_roots)
    return "classfolders", _classfolder_entries(root)


def _folder_entry(path: Path, split: str, class_folder: str) -> _Entry:
    shown = display_path(path)
    if shown != str(path):  # the manifest (Parquet/CSV) holds UTF-8 text only
        label = normalize_label(class_folder) or class_folder
        return _Entry(path=shown, official_split=split, label=label, subtype="", patient_id="",
                      patient_source="", error=NON_UTF8_NAME_REASON)
    info = parse_filename(path.name, folder_label=class_folder)
    return _Entry(
        path=str(path),
        official_split=split,
        label=info.label or "",
        subtype=info.subtype or "",
        patient_id=info.patient_id or "",
        patient_source=info.patient_source,
    )


def _kermany_entries(kermany_roots: list[Path]) -> list[_Entry]:
    kept: dict[tuple[str, str, str], _Entry] = {}
    duplicates = 0
    for kroot in kermany_roots:
        for split, split_dir in _split_folders(kroot):
            _warn_loose_files(split_dir)
            for class_dir in _subdirs(split_dir):
                label = normalize_label(class_dir.name) or class_dir.name
                n_images = 0
                for path in walk_files(class_dir):
                    if not is_candidate(path):
                        continue
                    n_images += 1
                    key = (split, label, str(path.relative_to(class_dir)))
                    if key in kept:
                        duplicates += 1
                        _compare_copies(Path(kept[key].path), path)
                        continue
                    kept[key] = _folder_entry(path, split, class_dir.name)
                if n_images == 0:
                    logger.warning("%s: class folder has no images", class_dir)
    if duplicates:
        logger.info(
            "%d images found again in nested copies (%s) were counted once",
            duplicates,
            ", ".join(str(r) for r in kermany_roots[1:]),
        )
    return list(kept.values())


def _compare_copies(kept: Path, other: Path) -> None:
    """Warn when two copies of the 'same' image differ in size (one of them is damaged)."""
    try:
        if os.stat(kept).st_size != os.stat(other).st_size:
            logger.warning("%s differs in size from its copy %s; using the first", kept, other)
    except OSError:
        pass


def _warn_loose_files(split_dir: Path) -> None:
    try:
        loose = [p for p in split_dir.iterdir() if not _is_ignored(p.name) and p.is_file() and is_image_name(p)]
    except OSError:
        return
    if loose:
        logger.warning(
            "%s: %d images outside any class folder are ignored (put them in <split>/<CLASS>/)",
            split_dir,
            len(loose),
        )


def _classfolder_entries(root: Path) -> list[_Entry]:
    entries: list[_Entry] = []
    for class_dir in _subdirs(root):
        if class_dir.name.lower() in SPLIT_ALIASES:
            logger.warning(
                "%s: looks like a split folder but holds no class folders; treated as a class", class_dir
            )
        before = len(entries)
        entries += [_folder_entry(p, "train", class_dir.name) for p in walk_files(class_dir) if is_candidate(p)]
        if len(entries) == before:
            logger.warning("%s: class folder has no images", class_dir)
    try:
        loose = [p for p in root.iterdir() if p.is_file() and not _is_ignored(p.name) and is_image_name(p)]
    except OSError:
        loose = []
    if loose:
        logger.warning(
            "%s: %d images directly in the dataset folder are ignored (no class folder)", root, len(loose)
        )
    return entries


# --------------------------------------------------------------------------------------------
# CSV layout


def _entries_from_csv(csv_path: Path) -> list[_Entry]:
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise DatasetError(f"{csv_path}: cannot read as CSV: {err}") from err
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise DatasetError(
            f"{csv_path}: CSV lacks required column(s) {', '.join(missing)} "
            f"(expected path,label[,patient_id,split]; found {', '.join(table.columns) or 'none'})"
        )
    base = str(csv_path.parent)
    entries: list[_Entry] = []
    seen: set[str] = set()
    for line_no, record in enumerate(table.to_dict("records"), start=2):
        entry = _csv_entry(record, base, f"{csv_path}:{line_no}")
        if entry.path in seen:
            logger.warning("%s:%d: %s listed again; first row kept", csv_path, line_no, entry.path)
            continue
        seen.add(entry.path)
        entries.append(entry)
    return entries


def _csv_entry(record: dict[str, Any], base: str, where: str) -> _Entry:
    raw = str(record.get("path", "")).strip()
    full = os.path.normpath(os.path.join(base, raw)) if raw else where
    label = normalize_label(record.get("label")) or ""
    split_raw = str(record.get("split", "") or "").strip().lower()
    split = SPLIT_ALIASES.get(split_raw, split_raw) if split_raw else "train"
    info = parse_filename(os.path.basename(full), folder_label=label or None)
    patient = str(record.get("patient_id", "") or "").strip()
    error = ""
    if not raw:
        error = "empty path"
    elif not _is_within(full, base):
        error = OUTSIDE_ROOT
    elif not label:
        error = "missing label"
    elif split not in ("train", "val", "test"):
        error = f"unknown split {split_raw!r} (use train, val or test)"
    return _Entry(
        path=full,
        official_split=split,
        label=label,
        subtype=info.subtype or "",
        patient_id=patient or info.patient_id or "",
        patient_source="csv" if patient else info.patient_source,
        error=error,
    )


def _is_within(path: str, base: str) -> bool:
    """Lexical containment (after normalising ``..``): symlinks inside the root stay allowed."""
    try:
        return os.path.commonpath([path, base]) == base
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# decoding


def _inspect_all(entries: list[_Entry], *, progress: bool, workers: int, max_pixels: int) -> list[dict[str, Any]]:
    def inspect(entry: _Entry) -> dict[str, Any]:
        return _inspect(entry, max_pixels)

    bar = tqdm(total=len(entries), desc="scan", unit="img", disable=not progress)
    try:
        if workers <= 1 or len(entries) < 2:
            rows = []
            for entry in entries:
                rows.append(inspect(entry))
                bar.update()
            return rows
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan") as pool:
            rows = []
            for row in pool.map(inspect, entries):
                rows.append(row)
                bar.update()
            return rows
    finally:
        bar.close()


def _inspect(entry: _Entry, max_pixels: int) -> dict[str, Any]:
    """Read, hash and decode one file; never raises (failures become the row's error)."""
    row: dict[str, Any] = {
        "path": entry.path,
        "split": entry.official_split,
        "official_split": entry.official_split,
        "label": entry.label,
        "subtype": entry.subtype,
        "patient_id": entry.patient_id,
        "patient_source": entry.patient_source,
        "width": None,
        "height": None,
        "mode": "",
        "content_hash": "",
        "pixel_hash": "",
        "status": "ok",
        "error": "",
    }
    if entry.error:
        row.update(status="error", error=entry.error)
        return row
    try:
        data = read_file_bytes(entry.path)
        row["content_hash"] = hashlib.sha256(data).hexdigest()
        image = read_image(data, name=entry.path, max_pixels=max_pixels)
    except ImageDecodeError as err:
        row.update(status="error", error=err.reason)
        return row
    except Exception as err:  # noqa: BLE001 - one bad file must never stop a scan
        row.update(status="error", error=f"cannot decode: {type(err).__name__}: {err}")
        return row
    row.update(width=image.width, height=image.height, mode=image.mode, pixel_hash=pixel_digest(image.pixels))
    return row


def _log_result(manifest: Manifest, seconds: float) -> None:
    df = manifest.df
    errors = df[df["status"] != "ok"]
    logger.info(
        "scanned %s (%s layout): %d images, %d unreadable, classes %s, %.1f s",
        manifest.root,
        manifest.layout,
        len(df),
        len(errors),
        manifest.class_names,
        seconds,
    )
    for path, reason in zip(errors["path"], errors["error"]):
        logger.debug("%s: %s", path, reason)
    if len(errors):
        logger.warning(
            "%d files could not be used (their reasons are in the manifest's 'error' column)", len(errors)
        )
