"""The dataset as a table: one row per image file, with labels, patient, size, hashes and status.

Following torchxrayvision, a dataset is metadata aligned with the images; splitting, checking and
caching are functions of this table (plus a seed), so they can be re-run, diffed and saved.

Conventions of the table (:data:`MANIFEST_COLUMNS`):

* text columns never hold ``None``/``NaN``: "unknown" is the empty string, so a CSV round trip is
  exact; ``width``/``height`` are nullable integers (``<NA>`` for files that failed to decode);
* ``path`` is absolute; ``split`` is what training uses (train/val/test), ``official_split``
  where the file came from; ``status`` is ``'ok'`` or ``'error'`` with the reason in ``error``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from pneumoscope.errors import DatasetError
from pneumoscope.utils.io import atomic_path, atomic_write_json

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "path",
    "split",
    "official_split",
    "label",
    "subtype",
    "patient_id",
    "patient_source",
    "width",
    "height",
    "mode",
    "content_hash",
    "pixel_hash",
    "status",
    "error",
]
INT_COLUMNS = ("width", "height")
TEXT_COLUMNS = tuple(c for c in MANIFEST_COLUMNS if c not in INT_COLUMNS)
#: Display / iteration order of splits.
SPLIT_ORDER = ("train", "val", "test")

_PARQUET_META_KEY = b"pneumoscope.manifest"


def split_sort_key(split: str) -> tuple[int, str]:
    """Sort key putting train, val, test first and any other split name after, alphabetically."""
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


def normalize_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy with exactly :data:`MANIFEST_COLUMNS`, text as ``str`` ("" for missing), ints nullable."""
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise DatasetError(f"manifest table lacks columns: {', '.join(missing)}")
    out = df.loc[:, MANIFEST_COLUMNS].copy()
    for col in TEXT_COLUMNS:
        out[col] = out[col].astype(object).where(out[col].notna(), "").astype(str)
    for col in INT_COLUMNS:
        out[col] = pd.to_numeric(out[col], errors="coerce").astype("Int64")
    return out.reset_index(drop=True)


class Manifest:
    """A table of image files plus where they came from (``root``, ``layout``, ``class_names``).

    ``layout`` is ``'kermany'`` (train/val/test/CLASS folders), ``'classfolders'`` (ROOT/CLASS)
    or ``'csv'``. ``class_names`` fixes the class index order used by every model
    (index 0 = NORMAL, 1 = PNEUMONIA for the Kermany data).
    """

    def __init__(self, df: pd.DataFrame, root: Path, layout: str, class_names: list[str]) -> None:
        self._df = normalize_frame(df)
        self._root = Path(root)
        self._layout = str(layout)
        self._class_names = list(class_names)

    # -- properties -----------------------------------------------------------------------
    @property
    def df(self) -> pd.DataFrame:
        return self._df

    @property
    def root(self) -> Path:
        return self._root

    @property
    def layout(self) -> str:
        return self._layout

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    # -- views ------------------------------------------------------------------------------
    def _with(self, df: pd.DataFrame) -> Manifest:
        return Manifest(df, self._root, self._layout, self._class_names)

    def ok(self) -> Manifest:
        """Only the rows whose image decoded (``status == 'ok'``)."""
        return self._with(self._df[self._df["status"] == "ok"])

    def subset(self, split: str | list[str]) -> Manifest:
        """Rows whose ``split`` is ``split`` (or one of a list of splits)."""
        wanted = [split] if isinstance(split, str) else list(split)
        return self._with(self._df[self._df["split"].isin(wanted)])

    def totals(self) -> pd.DataFrame:
        """Usable images (status ok) per split x label x subtype, as columns
        ``split, label, subtype, count``, ordered train/val/test then by class order."""
        ok = self._df[self._df["status"] == "ok"]
        counts = ok.groupby(["split", "label", "subtype"], sort=False).size().reset_index(name="count")
        class_rank = {name: i for i, name in enumerate(self._class_names)}
        keys = [
            (split_sort_key(split), class_rank.get(label, len(class_rank)), label, subtype)
            for split, label, subtype in zip(counts["split"], counts["label"], counts["subtype"])
        ]
        order = sorted(range(len(counts)), key=keys.__getitem__)
        return counts.iloc[order].reset_index(drop=True)

    def __len__(self) -> int:
        return len(self._df)

    def __repr__(self) -> str:
        df = self._df
        n_err = int((df["status"] != "ok").sum())
        lines = [
            f"Manifest(layout={self._layout!r}, root='{self._root}', images={len(df)}, errors={n_err})",
            f"  classes: {', '.join(self._class_names) or '(none)'}",
        ]
        ok = df[df["status"] == "ok"]
        if len(ok):
            table = pd.crosstab(ok["split"], ok["label"])
            cols = [c for c in self._class_names if c in table.columns]
            cols += [c for c in table.columns if c not in cols]
            table = table.reindex(columns=cols)
            table = table.loc[sorted(table.index, key=split_sort_key)]
            table["total"] = table.sum(axis=1)
            table.index.name = None
            table.columns.name = None
            lines += ["  " + line for line in table.to_string().splitlines()]
        return "\n".join(lines)

    # -- persistence ------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {"root": str(self._root), "layout": self._layout, "class_names": self._class_names}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to ``.csv`` (+ ``<path>.meta.json`` sidecar) or ``.parquet`` (metadata inside).

        Both writes are atomic, so an interrupted save never leaves a half table behind.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".csv":
            with atomic_path(path) as tmp:
                self._df.to_csv(tmp, index=False)
            atomic_write_json(_sidecar(path), self.metadata())
        elif suffix in (".parquet", ".pq"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(self._df, preserve_index=False)
            meta = dict(table.schema.metadata or {})
            meta[_PARQUET_META_KEY] = json.dumps(self.metadata()).encode("utf-8")
            table = table.replace_schema_metadata(meta)
            with atomic_path(path) as tmp:
                pq.write_table(table, tmp)
        else:
            raise DatasetError(f"{path}: manifest must be saved as .csv or .parquet")
        logger.info("manifest with %d rows written to %s", len(self), path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read a manifest written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"{path}: manifest file not found")
        suffix = path.suffix.lower()
        if suffix == ".csv":
            df = pd.read_csv(
                path,
                dtype={c: str for c in TEXT_COLUMNS},
                keep_default_na=False,
                na_values={c: [""] for c in INT_COLUMNS},
            )
            meta = _read_sidecar(path)
        elif suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            raw = (table.schema.metadata or {}).get(_PARQUET_META_KEY)
            meta = json.loads(raw.decode("utf-8")) if raw else {}
            df = table.to_pandas()
        else:
            raise DatasetError(f"{path}: manifest must be a .csv or .parquet file")
        df = normalize_frame(df)
        if not meta:
            logger.warning("%s: no manifest metadata found; root/layout/classes inferred", path)
        root = Path(meta.get("root") or _common_root(df["path"]))
        layout = meta.get("layout") or "unknown"
        class_names = meta.get("class_names") or sorted(x for x in df["label"].unique() if x)
        return cls(df, root, layout, list(class_names))


def require_classes(manifest: Manifest, n: int = 2) -> None:
    """Raise :class:`DatasetError` unless at least ``n`` classes have usable images.

    The scan itself accepts any folder (so ``data check`` can report on it); trainers call this
    to refuse a dataset that cannot train a classifier.
    """
    ok = manifest.df[manifest.df["status"] == "ok"]
    if ok.empty:
        raise DatasetError(
            f"{manifest.root}: no readable images found (layout {manifest.layout!r}); expected "
            "train/test/<CLASS>/ folders, <CLASS>/ folders or a CSV with path,label columns"
        )
    counts = ok.groupby("label").size()
    counts = counts[counts.index != ""]
    if len(counts) < n:
        found = ", ".join(f"{k}: {v}" for k, v in counts.items()) or "none"
        raise DatasetError(
            f"{manifest.root}: need images of at least {n} classes, found {len(counts)} ({found})"
        )


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def _read_sidecar(path: Path) -> dict[str, Any]:
    side = _sidecar(path)
    if not side.is_file():
        return {}
    try:
        return json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DatasetError(f"{side}: unreadable manifest metadata: {err}") from err


def _common_root(paths: pd.Series) -> str:
    values = [p for p in paths if p]
    if not values:
        return "."
    try:
        return os.path.commonpath([os.path.dirname(p) for p in values])
    except ValueError:
        return "."
