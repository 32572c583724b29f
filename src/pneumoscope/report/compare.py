"""``pneumoscope compare RUN RUN ...``: several runs side by side on the same evaluated split.

Writes ``compare.md``, ``compare.csv`` and ``roc_compare.png`` (overlaid ROC curves) to ``--out``.
Each run must have been evaluated (``pneumoscope evaluate RUN``) on the split being compared; the
table shows the headline metrics with their CIs and the missed-pneumonia (false negative) counts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from pneumoscope.errors import PneumoscopeError
from pneumoscope.utils.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)


def _ci(ev: dict, key: str) -> str:
    ci = (ev.get("ci") or {}).get(key)
    return f"[{ci['lo']:.3f}, {ci['hi']:.3f}]" if ci and ci.get("lo") is not None else ""


def compare_runs(runs: list[str | Path], out: str | Path, split: str = "test") -> pd.DataFrame:
    from pneumoscope.evaluate.plots import plot_roc

    out = Path(out)
    rows, curves = [], {}
    for run in runs:
        ev_path = Path(run) / "eval" / split / "metrics.json"
        if not ev_path.exists():
            raise PneumoscopeError(f"{run}: no evaluation on split {split!r}; run `pneumoscope evaluate {run} --split {split}`")
        ev = json.loads(ev_path.read_text())
        m = ev["metrics"]
        name = Path(run).name
        row = {"run": name, "model": ev["model"], "images": ev["n_images"], "accuracy": m["accuracy"],
               "accuracy_ci": _ci(ev, "accuracy")}
        if "tp" in m:
            row.update({"sensitivity": m["sensitivity"], "specificity": m["specificity"], "auroc": m["auroc"],
                        "auroc_ci": _ci(ev, "auroc"), "f1": m["f1"], "missed_pneumonia_FN": m["fn"],
                        "false_alarms_FP": m["fp"], "threshold": ev["threshold"]["value"]})
            pred = pd.read_csv(Path(run) / "eval" / split / "predictions.csv")
            pos = ev["class_names"][1]
            curves[name] = ((pred["label"] == pos).astype(int).to_numpy(), pred[f"prob_{pos}"].to_numpy())
        else:
            row.update({"macro_auroc": m["macro_auroc"], "macro_f1": m["macro_f1"]})
        rows.append(row)
    df = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "compare.csv") as tmp:
        df.to_csv(tmp, index=False)
    atomic_write_text(out / "compare.md", f"# Runs compared on the {split} split\n\n" + df.to_markdown(index=False, floatfmt=".4f") + "\n")
    if curves:
        plot_roc(curves, out / "roc_compare.png", title=f"ROC on the {split} split")
    log.info("comparison written to %s", out)
    return df
