"""Patient-grouped, stratified validation split cut from the official train (+ val) images.

Why: several children have many radiographs, and the official 16-image ``val`` folder is far too
small to choose epochs or thresholds on. A validation set cut image by image would put the same
child on both sides and inflate every validation score, so the cut is made by *group*:

* a group is a patient id, and patients whose images are pixel-identical (same ``pixel_hash``,
  e.g. one image filed under two patient numbers) are merged into one group, so a duplicate can
  never sit on both sides either;
* groups are assigned with scikit-learn's ``StratifiedGroupKFold(n_splits=round(1/val_fraction),
  shuffle=True, random_state=seed)`` and the first fold becomes ``val``. Its greedy assignment
  keeps the class (by default: subtype normal/bacterial/viral) proportions of ``val`` within about
  1 % of the pool's on the Kermany data. The realised fraction is ``1/n_splits`` of the groups
  (0.15 -> 1/7 = 14.3 % of the images, roughly).

``method='ordered'`` cuts a *temporal* validation split instead (TRIPOD's "temporal validation"):
within each class stratum, the patients earliest in their file-naming series (by the first number
in the patient id: ``IM-0115`` -> 115, ``person78`` -> 78) go to ``val`` until the stratum's
``val_fraction`` of images is reached; the seed plays no part. Why: the published Kermany test
split is itself a cut by number, not a random draw. Each naming series gives test a contiguous
early block (normals ``IM-0001..0111`` and ``NORMAL2-IM-0007..0381``, bacteria ``person78..175``;
see :mod:`pneumoscope.data.names`), and test normals are where models trained on a random
validation split fail (about 66 % specificity against 99 %+ on validation). A validation block that
sits next to the test block in acquisition order carries at least part of that shift, so thresholds
and epochs chosen on it are chosen under shift, from train images only. The test split is used
for nothing but the knowledge of how it was cut, which is in its file names.

The official ``val`` folder joins the pool; ``test`` rows are never touched. The result is a pure
function of the manifest, the method and (for ``random``) the seed.

:func:`external_split` validates on *another* labelled dataset instead (TRIPOD's "external
validation"): the whole train pool trains, and epochs, temperature and threshold are chosen on
images from elsewhere — another hospital, scanner or period. Why: on Kermany every split cut from
train is as easy as train (99 %+ specificity on its normals, random or ordered), while the official
test normals are not (about 66–80 %); a split cut from train cannot see that shift, a validation
set from outside the training source can.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from pneumoscope.data.manifest import Manifest
from pneumoscope.data.names import naming_series
from pneumoscope.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

POOL_SPLITS = ("train", "val")
SPLIT_METHODS = ("random", "ordered")
EXTERNAL = "external"  # the method recorded for a validation set from data.val_source
_NUMBER = re.compile(r"\d+")


def patient_split(
    manifest: Manifest,
    *,
    val_fraction: float = 0.15,
    seed: int = 0,
    stratify_on: str = "subtype",
    method: str = "random",
) -> Manifest:
    """A new manifest whose train/val rows are re-split into ``train`` and ``val`` by patient.

    ``stratify_on`` is a manifest column (``'subtype'`` or ``'label'``); an empty subtype falls
    back to the label. Rows with ``status == 'error'`` follow their patient's side (``train`` when
    the patient has no readable image); they are never used to balance the split. ``method``:
    ``'random'`` (stratified group folds, seeded) or ``'ordered'`` (lowest patient numbers per
    stratum and naming series; see the module docstring).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if method not in SPLIT_METHODS:
        raise ConfigError(f"split method must be one of {', '.join(SPLIT_METHODS)}, got {method!r}")
    if stratify_on not in manifest.df.columns:
        raise ConfigError(f"stratify_on: unknown manifest column {stratify_on!r}")
    df = manifest.df.copy()
    in_pool = df["official_split"].isin(POOL_SPLITS).to_numpy()
    usable = in_pool & (df["status"] == "ok").to_numpy()

    groups = group_ids(df)
    if method == "ordered":
        val_groups = _ordered_val_groups(df[usable], groups[usable], val_fraction, stratify_on)
    else:
        val_groups = _choose_val_groups(df[usable], groups[usable], val_fraction, seed, stratify_on)

    pool_is_val = np.isin(groups, list(val_groups)) & in_pool
    df.loc[in_pool, "split"] = "train"
    df.loc[pool_is_val, "split"] = "val"
    _log_split(df[usable], stratify_on)
    return Manifest(df, manifest.root, manifest.layout, manifest.class_names)


def group_ids(df: pd.DataFrame) -> np.ndarray:
    """One group label per row: patients linked by a shared pixel hash form one group.

    Connected components over (patient id, pixel hash) with a small union-find; rows without a
    patient id count as their own patient (keyed by path).
    """
    patients = [pid if pid else f"file:{path}" for pid, path in zip(df["patient_id"], df["path"])]
    parent: dict[str, str] = {p: p for p in patients}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_by_hash: dict[str, str] = {}
    for patient, digest in zip(patients, df["pixel_hash"]):
        if not digest:
            continue
        other = first_by_hash.setdefault(digest, patient)
        a, b = find(patient), find(other)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.array([find(p) for p in patients], dtype=object)


def _strata(df: pd.DataFrame, column: str) -> np.ndarray:
    values = df[column].astype(str).to_numpy()
    labels = df["label"].astype(str).to_numpy()
    return np.where(values == "", labels, values)


def _choose_val_groups(
    pool: pd.DataFrame, groups: np.ndarray, val_fraction: float, seed: int, stratify_on: str
) -> set[str]:
    from sklearn.model_selection import StratifiedGroupKFold

    unique_groups = np.unique(groups)
    if len(unique_groups) < 2:
        raise DatasetError(
            f"cannot cut a validation set: the train pool has {len(unique_groups)} patient(s), need at least 2"
        )
    n_splits = max(2, round(1.0 / val_fraction))
    if n_splits > len(unique_groups):
        logger.warning(
            "only %d patients in the train pool: validation fraction raised to 1/%d",
            len(unique_groups),
            len(unique_groups),
        )
        n_splits = len(unique_groups)
    y = _strata(pool, stratify_on)
    biggest = int(np.unique(np.asarray(y), return_counts=True)[1].max())
    if n_splits > biggest:  # scikit-learn refuses more folds than the largest class has members
        n_splits = max(2, biggest)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    try:
        _, val_idx = next(splitter.split(np.zeros(len(pool)), y, groups))
    except ValueError as err:  # a pool too small to split (a handful of images)
        raise DatasetError(f"cannot cut a validation set from {len(pool)} images: {err}") from None
    return set(groups[val_idx])


def _ordered_val_groups(pool: pd.DataFrame, groups: np.ndarray, val_fraction: float, stratify_on: str) -> set[str]:
    """Per stratum: the groups earliest in their naming series, until ``val_fraction`` of its images.

    "Earliest" is a row's rank among the distinct patient numbers of its series in that stratum,
    divided by their count (0 = first), so two series (``IM`` and ``NORMAL2-IM``) are taken from
    at the same pace; a group's key is the smallest over its rows (ids without a number rank last,
    by the id itself). Every image of a chosen group counts, including images of a group taken by
    an earlier stratum (the Kermany person numbers join a bacterial and a viral series), and a
    stratum's last group always stays in train.
    """
    if len(np.unique(groups)) < 2:
        raise DatasetError(
            f"cannot cut a validation set: the train pool has {len(np.unique(groups))} patient(s), need at least 2"
        )
    ids = pool["patient_id"].astype(str).to_numpy()
    table = pd.DataFrame({
        "group": groups, "stratum": _strata(pool, stratify_on), "pid": ids,
        "series": [naming_series(os.path.basename(str(path))) or "" for path in pool["path"]],
        "number": [float(m.group()) if (m := _NUMBER.search(pid)) else np.inf for pid in ids],
    })
    val: set[str] = set()
    for _, block in table.groupby("stratum", sort=True):
        rank = block.groupby("series")["number"].rank(method="dense")
        block = block.assign(key=(rank - 1) / block.groupby("series")["number"].transform("nunique"))
        order = block.groupby("group").agg(n=("group", "size"), key=("key", "min"), pid=("pid", "min"))
        order = order.sort_values(["key", "pid"])
        target = val_fraction * len(block)
        taken = int(order.loc[order.index.isin(list(val)), "n"].sum())
        for group, n in zip(order.index[:-1], order["n"].to_numpy()[:-1]):
            if taken >= target:
                break
            if group not in val:
                val.add(group)
                taken += int(n)
    if not val:
        raise DatasetError(f"cannot cut an ordered validation set from {len(pool)} images: every stratum has one patient")
    return val


def _log_split(pool: pd.DataFrame, stratify_on: str) -> None:
    strata = _strata(pool, stratify_on)
    is_val = (pool["split"] == "val").to_numpy()
    for name in sorted(set(strata)):
        share_pool = float(np.mean(strata == name)) if len(strata) else 0.0
        share_val = float(np.mean(strata[is_val] == name)) if is_val.any() else 0.0
        logger.info("split %s=%s: %.1f%% of pool, %.1f%% of val", stratify_on, name, 100 * share_pool, 100 * share_val)
    logger.info("patient split: %d train, %d val images", int((~is_val).sum()), int(is_val.sum()))


def external_split(manifest: Manifest, external: Manifest) -> Manifest:
    """The whole train pool of ``manifest`` as ``train``; the labelled images of ``external`` as ``val``.

    ``external`` is another dataset (any layout :func:`~pneumoscope.data.scan.scan_dataset`
    reads). Its ``test`` rows are dropped: a folder's official test split is never used to choose
    anything. Its classes must be the same as ``manifest``'s (case aside). Train images that share a
    patient id, a file (content hash) or the pixels (pixel hash) with any external image are
    dropped from train, with a warning: otherwise the validation set would not be external. Rows
    of ``manifest`` whose path is an external image's (a manifest saved after an earlier external
    split) are replaced, so the function can be applied again to its own output. ``manifest``'s
    test rows are kept as they are and never compared with anything.
    """
    ours = [c.lower() for c in manifest.class_names]
    theirs = [c.lower() for c in external.class_names]
    if sorted(ours) != sorted(theirs):
        raise DatasetError(f"{external.root}: data.val_source classes {external.class_names} do not match the "
                           f"training data's classes {manifest.class_names}")
    ext = external.df[external.df["official_split"] != "test"].copy()
    n_test = int((external.df["official_split"] == "test").sum())
    if n_test:
        logger.info("%s: %d images of its test split are not used for validation", external.root, n_test)
    if not (ext["status"] == "ok").any():
        raise DatasetError(f"{external.root}: data.val_source has no readable labelled image outside its test split")
    ext["split"] = "val"
    df = manifest.df[~manifest.df["path"].isin(set(ext["path"]))].copy()
    in_pool = df["official_split"].isin(POOL_SPLITS).to_numpy()
    df.loc[in_pool, "split"] = "train"

    def _shared(column: str) -> np.ndarray:
        values = set(ext.loc[ext[column].astype(str) != "", column].astype(str))
        return df[column].astype(str).isin(values).to_numpy() if values else np.zeros(len(df), bool)

    leak = in_pool & (_shared("patient_id") | _shared("content_hash") | _shared("pixel_hash"))
    if leak.any():
        logger.warning("%d train images share a patient, a file or the pixels with the external validation set "
                       "%s: dropped from train", int(leak.sum()), external.root)
    df = pd.concat([df[~leak], ext], ignore_index=True)
    names = manifest.class_names
    usable = (df["split"].isin(POOL_SPLITS) & (df["status"] == "ok")).to_numpy()
    _log_split(df[usable], "subtype")
    return Manifest(df, manifest.root, manifest.layout, names)


def validation_split(manifest: Manifest, *, val_fraction: float = 0.15, seed: int = 0, method: str = "random",
                     val_source: str | os.PathLike[str] | None = None, progress: bool = False,
                     workers: int = 2) -> Manifest:
    """The validation split a run uses: :func:`external_split` with ``val_source`` (a labelled folder
    or CSV, scanned here), else :func:`patient_split` cut from train by ``method``."""
    if val_source is None:
        return patient_split(manifest, val_fraction=val_fraction, seed=seed, method=method)
    from pneumoscope.data.scan import scan_dataset

    source = Path(val_source)
    if not source.exists():
        raise DatasetError(f"{val_source}: data.val_source: no such folder or CSV")
    if source.resolve() == Path(manifest.root).resolve():
        raise DatasetError(f"{val_source}: data.val_source is the training data itself; give another dataset")
    return external_split(manifest, scan_dataset(source, progress=progress, workers=workers))
