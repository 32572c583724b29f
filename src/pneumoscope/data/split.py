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

The official ``val`` folder joins the pool; ``test`` rows are never touched. The result is a pure
function of the manifest and the seed.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from pneumoscope.data.manifest import Manifest
from pneumoscope.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

POOL_SPLITS = ("train", "val")


def patient_split(
    manifest: Manifest,
    *,
    val_fraction: float = 0.15,
    seed: int = 0,
    stratify_on: str = "subtype",
) -> Manifest:
    """A new manifest whose train/val rows are re-split into ``train`` and ``val`` by patient.

    ``stratify_on`` is a manifest column (``'subtype'`` or ``'label'``); an empty subtype falls
    back to the label. Rows with ``status == 'error'`` follow their patient's side (``train`` when
    the patient has no readable image); they are never used to balance the split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if stratify_on not in manifest.df.columns:
        raise ConfigError(f"stratify_on: unknown manifest column {stratify_on!r}")
    df = manifest.df.copy()
    in_pool = df["official_split"].isin(POOL_SPLITS).to_numpy()
    usable = in_pool & (df["status"] == "ok").to_numpy()

    groups = group_ids(df)
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


def _log_split(pool: pd.DataFrame, stratify_on: str) -> None:
    strata = _strata(pool, stratify_on)
    is_val = (pool["split"] == "val").to_numpy()
    for name in sorted(set(strata)):
        share_pool = float(np.mean(strata == name)) if len(strata) else 0.0
        share_val = float(np.mean(strata[is_val] == name)) if is_val.any() else 0.0
        logger.info("split %s=%s: %.1f%% of pool, %.1f%% of val", stratify_on, name, 100 * share_pool, 100 * share_val)
    logger.info("patient split: %d train, %d val images", int((~is_val).sum()), int(is_val.sum()))
