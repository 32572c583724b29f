"""CPU scaling of the distributed code path: 1 process vs ``torchrun`` with 2 gloo processes.

Same images, same global batch (per-process batch divided by the number of processes), one
epoch of the notebook CNN (``seed-cnn3`` recipe at 150 px) on this machine. Reports epoch wall time
and global images/s. With 2 cores, 2 processes × 1 thread compete for the same cores as
1 process × 2 threads, so little gain is expected; the figure shows the overhead of DDP itself.

    PYTHONPATH=src python benchmarks/bench_ddp.py --data ../shared/data/chest_xray
"""

from __future__ import annotations

import argparse
import csv
import os
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


def run(nproc: int, data: str, work: Path, per_class: int, batch: int, epochs: int) -> dict:
    out = work / f"ddp{nproc}"
    sets = [f"data.limit_per_class={per_class}", f"train.batch_size={batch // nproc}",
            f"train.phases.0.epochs={epochs}", "train.early_stopping=null"]
    args = ["train", "--config", "seed-cnn3", "--data", data, "--out", str(out), "--no-progress",
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
    return {"processes": nproc, "threads_per_process": int(threads), "epoch_seconds": secs,
            "images_per_epoch": n_train, "global_images_per_s": n_train / best, "val_auroc": float(rows[-1]["val_auroc"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("PNEUMOSCOPE_DATA", "../shared/data/chest_xray"))
    ap.add_argument("--per-class", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32, help="global batch")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out-name", default="ddp_cpu_scaling")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = [run(n, args.data, Path(tmp), args.per_class, args.batch, args.epochs) for n in (1, 2)]
    base = res[0]["global_images_per_s"]
    table = md_table(["processes", "threads each", "best epoch (s)", "global img/s", "speed-up"],
                     [[r["processes"], r["threads_per_process"], fmt(min(r["epoch_seconds"])),
                       fmt(r["global_images_per_s"]), f"{r['global_images_per_s'] / base:.2f}×"] for r in res])
    table += "\n\nGPU: no accelerator was lent to this task, so the single-GPU DDP-overhead figure is not measured here."
    write_results(args.out_name, {"runs": res}, table, command_line(), results_dir=args.results_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
