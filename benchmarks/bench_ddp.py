"""CPU scaling of the distributed code path: 1 process vs ``torchrun`` with 2 gloo processes.

Same images, same global batch (per-process batch divided by the number of processes), epochs
of the notebook CNN (``seed-cnn3`` recipe at 150 px) on this machine. Reports epoch wall time
and global images/s. With 2 cores, 2 processes × 1 thread compete for the same cores as
1 process × 2 threads, so little gain is expected; the figure shows the overhead of DDP itself.

``--config default`` runs the ``default`` recipe instead and also reports its frozen-prefix
feature pass, which DDP shards over the ranks (each computes 1/W of it).

    PYTHONPATH=src python benchmarks/bench_ddp.py --data ../shared/data/chest_xray
    PYTHONPATH=src python benchmarks/bench_ddp.py --data ../shared/data/chest_xray --config default \
        --per-class 400 --out-name ddp_cpu_scaling_default
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, fmt, md_table, write_results  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, data: str, work: Path, per_class: int, batch: int, epochs: int, config: str) -> dict:
    out = work / f"ddp{nproc}"
    sets = [f"data.limit_per_class={per_class}", f"train.batch_size={batch // nproc}",
            f"train.phases.0.epochs={epochs}", "train.early_stopping=null"]
    args = ["train", "--config", config, "--data", data, "--out", str(out), "--no-progress",
            *sum((["--set", s] for s in sets), [])]
    threads = str(max(1, (os.cpu_count() or 2) // nproc))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PNEUMOSCOPE_CACHE": str(work / "cache")}
    if nproc == 1:
        cmd = [sys.executable, "-m", "pneumoscope", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={_port()}", "-m", "pneumoscope", *args]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    secs = [float(r["epoch_seconds"]) for r in rows]
    n_train = sum(1 for r in csv.DictReader(open(out / "split.csv")) if r["split"] == "train")
    best = min(secs)
    # rank 0's log: "phase P: feature cache (V, N, ...) in S s" (the pass, including the all-reduce)
    feature = [float(x) for x in re.findall(r"feature cache \(.*?\) in ([0-9.]+) s", (out / "train.log").read_text())]
    return {"processes": nproc, "threads_per_process": int(threads), "epoch_seconds": secs,
            "images_per_epoch": n_train, "global_images_per_s": n_train / best, "val_auroc": float(rows[-1]["val_auroc"]),
            "feature_pass_seconds": sum(feature) if feature else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("PNEUMOSCOPE_DATA", "../shared/data/chest_xray"))
    ap.add_argument("--per-class", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32, help="global batch")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--config", default="seed-cnn3", help="recipe (default: seed-cnn3; `default` adds the feature pass)")
    ap.add_argument("--out-name", default="ddp_cpu_scaling")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = [run(n, args.data, Path(tmp), args.per_class, args.batch, args.epochs, args.config) for n in (1, 2)]
    base = res[0]["global_images_per_s"]
    feature = res[0]["feature_pass_seconds"] is not None
    head = ["processes", "threads each", "best epoch (s)", "global img/s", "speed-up"]
    table = md_table(head + (["feature pass (s)"] if feature else []),
                     [[r["processes"], r["threads_per_process"], fmt(min(r["epoch_seconds"])),
                       fmt(r["global_images_per_s"]), f"{r['global_images_per_s'] / base:.2f}×"]
                      + ([fmt(r["feature_pass_seconds"])] if feature else []) for r in res])
    table = f"Recipe `{args.config}`, {args.per_class} train-folder images per class, global batch {args.batch}.\n\n" + table
    table += "\n\nGPU: no accelerator was lent to this task, so the single-GPU DDP-overhead figure is not measured here."
    write_results(args.out_name, {"runs": res}, table, command_line(), results_dir=args.results_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
