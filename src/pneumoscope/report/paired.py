"""Paired comparison of two evaluated runs: metric differences with patient-bootstrap CIs.

Why paired: two runs evaluated on the same test images (e.g. a classifier trained with and without
GAN-synthesised images, or with and without the dummy class) make correlated errors. Separate
per-run intervals overlap even when one run is reliably better; the right interval is the one of
the *difference*, computed on the same resampled patients for both runs (a paired cluster
bootstrap: each resample draws patients with replacement and evaluates both runs on that draw).

Each run keeps its own validation-chosen operating point (the threshold in its ``metrics.json``);
nothing is chosen on the compared split. Output: ``paired.json`` and ``paired.md`` in ``out``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pneumoscope.errors import PneumoscopeError
from pneumoscope.evaluate.bootstrap import bootstrap_ci
from pneumoscope.evaluate.metrics import binary_metrics, multiclass_metrics
from pneumoscope.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

BINARY_KEYS = ("accuracy", "sensitivity", "specificity", "f1", "auroc", "pr_auc", "brier")
MULTI_KEYS = ("accuracy", "macro_recall", "macro_f1", "macro_auroc")


def _load(run: str | Path, split: str) -> tuple[dict, pd.DataFrame]:
    d = Path(run) / "eval" / split
    if not (d / "metrics.json").exists() or not (d / "predictions.csv").exists():
        raise PneumoscopeError(f"{run}: no evaluation on split {split!r}; run `pneumoscope evaluate {run} --split {split}`")
    return json.loads((d / "metrics.json").read_text()), pd.read_csv(d / "predictions.csv", dtype={"patient_id": str},
                                                                      keep_default_na=False)


class _Diff:
    """``metric(run A) - metric(run B)`` on columns of one probability array, with a batched form."""

    def __init__(self, n_classes: int, class_names: list[str], thr_a: float, thr_b: float) -> None:
        self.c, self.names, self.thr = n_classes, class_names, (thr_a, thr_b)
        self.keys = BINARY_KEYS if n_classes == 2 else MULTI_KEYS

    def _parts(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (p[:, 0], p[:, 1]) if self.c == 2 else (p[:, : self.c], p[:, self.c :])

    def _one(self, y, p, thr):
        return binary_metrics(y, p, threshold=thr) if self.c == 2 else multiclass_metrics(y, p, self.names)

    def __call__(self, y: np.ndarray, p: np.ndarray) -> dict:
        a, b = self._parts(p)
        ma, mb = self._one(y, a, self.thr[0]), self._one(y, b, self.thr[1])
        return {k: ma[k] - mb[k] for k in self.keys}

    def batched(self, y: np.ndarray, p: np.ndarray, counts: np.ndarray) -> dict:
        a, b = self._parts(p)
        if self.c == 2:
            ma = binary_metrics.batched(y, a, counts, threshold=self.thr[0])
            mb = binary_metrics.batched(y, b, counts, threshold=self.thr[1])
        else:
            ma = multiclass_metrics.batched(y, a, counts, self.names)
            mb = multiclass_metrics.batched(y, b, counts, self.names)
        return {k: ma[k] - mb[k] for k in self.keys}


def paired_comparison(run_a: str | Path, run_b: str | Path, out: str | Path, *, split: str = "test",
                      n_boot: int = 2000, seed: int = 0) -> dict:
    """Differences A − B of the headline metrics on ``split`` with 95 % paired patient-bootstrap CIs."""
    ev_a, pa = _load(run_a, split)
    ev_b, pb = _load(run_b, split)
    names = list(ev_a["class_names"])
    if [c.lower() for c in ev_b["class_names"]] != [c.lower() for c in names]:
        raise PneumoscopeError(f"{run_a} and {run_b} have different classes ({names} vs {ev_b['class_names']})")
    merged = pa.merge(pb, on="path", suffixes=("_a", "_b"), validate="one_to_one")
    if len(merged) != len(pa) or len(merged) != len(pb):
        raise PneumoscopeError(f"{run_a} ({len(pa)} images) and {run_b} ({len(pb)} images) were not evaluated on "
                               f"the same images of split {split!r}; re-evaluate both on the same data")
    if (merged["label_a"] != merged["label_b"]).any():
        raise PneumoscopeError(f"{run_a} and {run_b}: the same image carries different labels")
    y = merged["label_a"].map({c: i for i, c in enumerate(names)}).to_numpy(np.int64)
    cols_a = merged[[f"prob_{c}_a" for c in names]].to_numpy(np.float64)
    cols_b = merged[[f"prob_{c}_b" for c in names]].to_numpy(np.float64)
    c = len(names)
    p = np.column_stack([cols_a[:, 1], cols_b[:, 1]]) if c == 2 else np.column_stack([cols_a, cols_b])
    diff = _Diff(c, names, float(ev_a["threshold"]["value"]), float(ev_b["threshold"]["value"]))
    ci = bootstrap_ci(diff, y, p, groups=merged["patient_id_a"].astype(str).to_numpy(), n_boot=n_boot, seed=seed)
    ma, mb = ev_a["metrics"], ev_b["metrics"]
    rows = [{"metric": k, "A": ma[k], "B": mb[k], "A_minus_B": ci[k]["point"], "lo": ci[k]["lo"], "hi": ci[k]["hi"],
             "ci_excludes_0": bool(ci[k]["lo"] > 0 or ci[k]["hi"] < 0)} for k in diff.keys]
    res = {"split": split, "run_a": str(run_a), "run_b": str(run_b), "n_images": int(len(y)),
           "n_patients": int(merged["patient_id_a"].nunique()), "n_boot": n_boot,
           "thresholds": {"A": diff.thr[0], "B": diff.thr[1]} if c == 2 else None, "decision": "threshold" if c == 2 else "argmax",
           "differences": rows}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "paired.json", res)
    table = pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f")
    decision = (f"each run at its own validation-chosen threshold (A {diff.thr[0]:.4f}, B {diff.thr[1]:.4f})" if c == 2
                else "each run's class is its argmax (no threshold)")
    atomic_write_text(out / "paired.md", f"# Paired comparison on the {split} split\n\nA = `{run_a}`, B = `{run_b}`; "
                      f"{res['n_images']} images of {res['n_patients']} patients; {decision}. A − B with 95 % paired "
                      f"patient-bootstrap CIs ({n_boot} resamples).\n\n{table}\n")
    log.info("paired comparison written to %s", out)
    return res
