"""Which images a task uses and what its integer labels are.

* ``binary``: NORMAL (0) vs PNEUMONIA (1), all images.
* ``bacterial_vs_viral``: pneumonia images only; bacterial (0) vs viral (1), from the file names
  (``_bacteria_`` / ``_virus_``).
* ``three_class``: normal (0), bacterial (1), viral (2).

Class 1 of a binary task is the "positive" class that sensitivity, AUROC and thresholds refer to.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pneumoscope.errors import DatasetError

TASK_CLASSES: dict[str, list[str]] = {
    "binary": ["NORMAL", "PNEUMONIA"],
    "bacterial_vs_viral": ["bacterial", "viral"],
    "three_class": ["normal", "bacterial", "viral"],
}


def task_labels(df: pd.DataFrame, task: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(row_mask, labels_for_masked_rows, class_names)`` for ``task`` on a manifest table.

    Rows with status other than ``ok`` are never selected. A binary task on a dataset whose labels
    are not NORMAL/PNEUMONIA uses the dataset's own two labels in sorted order.
    """
    if task not in TASK_CLASSES:
        raise DatasetError(f"unknown task {task!r} (choose from {', '.join(TASK_CLASSES)})")
    ok = (df["status"] == "ok").to_numpy()
    if task == "binary":
        labels = df["label"].astype(str).str.upper()
        names = TASK_CLASSES["binary"]
        if not labels[ok].isin(names).all():
            found = sorted(set(labels[ok]))
            if len(found) != 2:
                raise DatasetError(f"binary task needs exactly two labels, the dataset has {found}")
            names = found
        mask = ok & labels.isin(names).to_numpy()
        y = labels[mask].map({n: i for i, n in enumerate(names)}).to_numpy(np.int64)
        return mask, y, list(names)
    names = TASK_CLASSES[task]
    sub = df["subtype"].astype(str).str.lower()
    mask = ok & sub.isin(names).to_numpy()
    if not mask.any():
        raise DatasetError(f"task {task!r} needs subtype labels ({', '.join(names)}) from the file names; "
                           "this dataset has none")
    y = sub[mask].map({n: i for i, n in enumerate(names)}).to_numpy(np.int64)
    return mask, y, list(names)
