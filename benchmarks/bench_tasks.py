"""Beyond binary: the ``bacterial-viral`` and ``three-class`` configs through the honest protocol.

For each task it runs the main job (``pneumoscope run --config <task>``: data check → train with
the epoch chosen on the patient-grouped validation split → evaluate on the official test split →
report) into ``OUT/<task>``, unless that folder already holds a finished evaluation (then the
finished run is read, so a table can be rebuilt without retraining). The table puts the test
figures with their patient-bootstrap CIs beside the issue's targets and the published reference
points (each marked with its protocol).

    PYTHONPATH=src python benchmarks/bench_tasks.py --data ../shared/data/chest_xray --out out
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, fmt, machine_info, md_table, write_results  # noqa: E402

TASKS = {  # config → (out folder, targets on the official test split)
    "bacterial-viral": ("bvv", {"auroc": 0.90}),
    "three-class": ("three_class", {"accuracy": 0.85, "macro_auroc": 0.95}),
}
REFERENCES = {
    "bacterial-viral": [("Kermany et al. 2018 (selected on test)", "accuracy 90.7 %, AUROC 0.940"),
                        ("a seed notebook", "accuracy ~75 %")],
    "three-class": [("a seed notebook", "accuracy ~70 %"), ("best public report", "accuracy ~91 %")],
}


def find_eval(out: Path) -> Path | None:
    hits = sorted(out.glob("runs/*/eval/test/metrics.json"))
    return hits[0] if hits else None


def run_task(config: str, out: Path, data: str) -> float | None:
    """Runs the main job for ``config`` unless finished; returns its wall seconds when it ran."""
    if find_eval(out) is not None:
        return None
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pneumoscope", "run", "--data", data, "--out", str(out),
                    "--config", config, "--no-progress"], check=True)
    return time.perf_counter() - t0


def ci_text(m: dict, ci: dict, key: str, pct: bool) -> str:
    v, c = m[key], ci.get(key, {})
    if pct:
        return f"{100 * v:.1f} % [{100 * c.get('lo', float('nan')):.1f}, {100 * c.get('hi', float('nan')):.1f}]"
    return f"{v:.3f} [{c.get('lo', float('nan')):.3f}, {c.get('hi', float('nan')):.3f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("PNEUMOSCOPE_DATA", "../shared/data/chest_xray"))
    ap.add_argument("--out", default="out", help="parent folder of the task runs (default: %(default)s)")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args()
    machine = machine_info()
    payload, sections = {}, []
    for config, (folder, targets) in TASKS.items():
        out = Path(args.out) / folder
        wall = run_task(config, out, args.data)
        ev = json.loads(find_eval(out).read_text())
        summary = json.loads(next(out.glob("runs/*/summary.json")).read_text())
        timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
        m, ci = ev["metrics"], ev["ci"]
        met = {k: bool(m[k] >= t) for k, t in targets.items()}
        payload[config] = {"metrics": {k: v for k, v in m.items() if k not in ("per_class", "confusion")},
                           "ci": ci, "confusion": ev["confusion"], "class_names": ev["class_names"],
                           "best_epoch": summary.get("best_epoch"), "val_metrics": summary.get("val_metrics"),
                           "timings": timings, "wall_seconds_this_call": wall, "targets": targets, "met": met,
                           "run_dir": str(next(out.glob("runs/*"))), "n_images": ev["n_images"]}
        if ev["task"] == "three_class":
            rows = [["accuracy", ci_text(m, ci, "accuracy", True), "≥ 85 %", "met" if met["accuracy"] else "NOT met"],
                    ["macro AUROC (one-vs-rest)", ci_text(m, ci, "macro_auroc", False), "≥ 0.95",
                     "met" if met["macro_auroc"] else "NOT met"],
                    ["macro F1", ci_text(m, ci, "macro_f1", False), "", ""]]
            rows += [[f"{c}: recall / AUROC", f"{m['per_class'][c]['recall']:.3f} / {m['per_class'][c]['auroc_ovr']:.3f}",
                      "", ""] for c in ev["class_names"]]
        else:
            rows = [["AUROC (viral = positive)", ci_text(m, ci, "auroc", False), "≥ 0.90",
                     "met" if met["auroc"] else "NOT met"],
                    ["accuracy at the validation threshold", ci_text(m, ci, "accuracy", True), "", ""],
                    ["sensitivity (viral)", ci_text(m, ci, "sensitivity", True), "", ""],
                    ["specificity (bacterial)", ci_text(m, ci, "specificity", True), "", ""]]
        refs = "; ".join(f"{who}: {what}" for who, what in REFERENCES[config])
        sections.append("\n\n".join([
            f"## `{config}` ({ev['n_images']} test images; classes {ev['class_names']})",
            md_table(["metric (official test split)", "value [95 % CI, patient bootstrap]", "target", ""], rows),
            f"Confusion matrix (rows = truth, columns = prediction, order {ev['class_names']}): {ev['confusion']}. "
            f"Best epoch {summary.get('best_epoch')} chosen on validation "
            f"({', '.join(f'{k} {v:.4f}' for k, v in (summary.get('val_metrics') or {}).items() if isinstance(v, float))}). "
            f"Main-job timings (s): { {k: round(v, 1) for k, v in timings.items()} }.",
            f"References (different protocols): {refs}.",
        ]))
    table = "\n\n".join(sections)
    j, md = write_results("tasks", payload, table, command_line(), results_dir=args.results_dir, machine=machine)
    sys.stdout.write(table + f"\n\nwrote {j} and {md}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
