"""The experiment roadmap, timed: ``pneumoscope sweep experiments/roadmap.yaml --reduced`` (experiments issue).

Runs the sweep (resumable: a second start after a kill continues it) and records its wall time,
peak memory, the machine, and the sweep's own tables (validation metrics of every point, winners
chosen on validation, test metrics of the winners and the ensemble, reported once) in
``results/roadmap_reduced.{json,md}``; the validation-AUROC figure is copied beside them.

    PYTHONPATH=src python benchmarks/bench_roadmap.py --data ../shared/data/chest_xray

Run it on a quiet machine (it uses both cores for 20-30 minutes); ``--full`` runs the full
roadmap instead (a GPU, or a long night on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_RESULTS_DIR, REPO, command_line, machine_info, proc_status_mb, write_results  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("PNEUMOSCOPE_DATA", "../shared/data/chest_xray"))
    ap.add_argument("--file", default=str(REPO / "experiments" / "roadmap.yaml"))
    ap.add_argument("--out", default=None, help="sweep folder (default runs/sweeps/roadmap-reduced or -full)")
    ap.add_argument("--full", action="store_true", help="the full roadmap instead of the reduced one")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args()

    name = "roadmap_full" if args.full else "roadmap_reduced"
    out = Path(args.out or f"runs/sweeps/{name.replace('_', '-')}")
    machine = machine_info()
    cmd = [sys.executable, "-m", "pneumoscope", "sweep", args.file, "--data", args.data, "--out", str(out),
           "--no-progress", *([] if args.full else ["--reduced"])]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        peak = max(peak, proc_status_mb(proc.pid) or 0.0)
    rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc not in (0, 1):  # 1: some point failed; the table says which
        raise SystemExit(f"pneumoscope sweep failed with exit code {rc}")
    res = json.loads((out / "sweep.json").read_text())
    trained = [p for p in res["points"] if p.get("status") in ("trained", "resumed")]
    note = (f"Wall time of this invocation: {wall / 60:.1f} min ({len(trained)} of {len(res['points'])} points "
            f"trained in it, the rest finished earlier), peak RSS {peak:.0f} MB.\n\n")
    table = note + (out / "results.md").read_text().split("\n", 2)[2]
    results_dir = Path(args.results_dir) if args.results_dir else DEFAULT_RESULTS_DIR
    payload = {"wall_seconds": wall, "peak_rss_mb": peak, "exit_code": rc, "sweep": res}
    write_results(name, payload, table, command_line(), results_dir=results_dir, machine=machine)
    fig = out / f"{res['select']}.png"
    if fig.exists():
        shutil.copyfile(fig, results_dir / f"{name}_{res['select']}.png")
    sys.stdout.write((results_dir / f"{name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
