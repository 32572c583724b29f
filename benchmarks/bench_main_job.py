"""The main job, timed: ``pneumoscope run`` (data check → train default → evaluate on test → report).

Records the wall time of each step, the training throughput, peak memory of the whole job, the
validation-chosen operating point and the official-test metrics with their CIs, beside the
published reference points (each marked with its protocol).

    PYTHONPATH=src python benchmarks/bench_main_job.py --data ../shared/data/chest_xray --out out/bench_main

Run it on a quiet machine: the figures are wall times.
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
from common import command_line, fmt, machine_info, md_table, proc_status_mb, write_results  # noqa: E402

REFERENCES = [
    ("Kermany et al. 2018, Inception-V3", "selected on test", 0.928, 0.932, 0.901, 0.968),
    ("best seed notebook, ResNet-18", "selected on test", 0.9247, 0.979, 0.821, 0.962),
    ("MedMNIST v2, ResNet-50 (224)", "fixed recipe", 0.884, None, None, 0.962),
    ("MedMNIST v2, Google AutoML Vision", "vendor tuning", 0.946, None, None, 0.991),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("PNEUMOSCOPE_DATA", "../shared/data/chest_xray"))
    ap.add_argument("--out", default="out/bench_main")
    ap.add_argument("--config", default="default")
    ap.add_argument("--out-name", default="main_job")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args()

    out = Path(args.out)
    machine = machine_info()  # before the job: its load average is the machine's, not the job's own
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pneumoscope", "run", "--data", args.data, "--out", str(out),
                             "--config", args.config, "--no-progress"], stderr=subprocess.PIPE, text=True)
    peak = 0.0
    assert proc.stderr is not None
    for line in proc.stderr:  # the job logs to stderr; keep the memory high-water mark while it runs
        sys.stderr.write(line)
        peak = max(peak, proc_status_mb(proc.pid) or 0.0)
    rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"pneumoscope run failed with exit code {rc}")
    from pneumoscope.config import load_config

    run = out / "runs" / load_config(args.config).name  # the run directory is named after the config's name
    hist = [l for l in (run / "metrics.csv").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    ev = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    timings = json.loads((out / "timings.json").read_text())
    m, ci = ev["metrics"], ev.get("ci", {})
    payload = {"config": args.config, "wall_seconds": wall, "timings": timings, "train_seconds": summary["train_seconds"],
               "epochs_run": len(hist) - 1, "best_epoch": summary["best_epoch"], "threshold": ev["threshold"],
               "val_metrics": summary["val_metrics"], "test_metrics": m, "test_ci": ci,
               "peak_rss_mb_main_process": peak, "references": REFERENCES}

    def pc(k):
        c = ci.get(k, {})
        return f"{100 * m[k]:.1f} % [{100 * c.get('lo', float('nan')):.1f}, {100 * c.get('hi', float('nan')):.1f}]"

    rows = [["pneumoscope `default` (this run)", "threshold & epoch chosen on patient-grouped val", pc("accuracy"),
             pc("sensitivity"), pc("specificity"),
             f"{m['auroc']:.4f} [{ci.get('auroc', {}).get('lo', float('nan')):.3f}, {ci.get('auroc', {}).get('hi', float('nan')):.3f}]"]]
    for name, proto, acc, sens, spec, auc in REFERENCES:
        rows.append([name, proto, f"{100 * acc:.1f} %", f"{100 * sens:.1f} %" if sens else "—",
                     f"{100 * spec:.1f} %" if spec else "—", f"{auc:.3f}"])
    table = md_table(["model", "protocol", "accuracy [95 % CI]", "sensitivity", "specificity", "AUROC"], rows)
    table += (f"\n\nConfusion matrix (rows = truth NORMAL, PNEUMONIA): {ev['confusion']}; threshold "
              f"{ev['threshold']['value']:.4f} ({ev['threshold'].get('rule_description')}).\n\n"
              + md_table(["step", "seconds"], [[k, fmt(v)] for k, v in timings.items()])
              + f"\n\nTraining throughput (tail on cached features) per epoch: see `{run}/metrics.csv`; "
              f"peak RSS of the job: {fmt(peak)} MB.")
    write_results(args.out_name, payload, table, command_line(), results_dir=args.results_dir, machine=machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
