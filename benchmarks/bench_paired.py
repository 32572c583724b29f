"""A with-vs-without comparison of two training variants: validation first, then a paired test bootstrap.

Trains each variant (``pneumoscope train --config CONFIG [--set ...]``) unless its run directory
already holds a finished run, evaluates both once on the official test split (``--tta 0``: the
deployed single-pass predictor), and writes the paired patient-bootstrap differences A − B
(:mod:`pneumoscope.report.paired`) beside both runs' **validation** figures, the only basis for
a choice.

    PYTHONPATH=src python benchmarks/bench_paired.py --config three-class \\
        --a-set train.dummy_class=true --a-out out/3c_dummy --b-out out/three_class --out-name three_class_dummy
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, fmt, machine_info, md_table, publish  # noqa: E402

VAL_KEYS = ("macro_auroc", "auroc", "accuracy", "macro_f1", "brier")


def ensure_run(config: str, sets: list[str], out: Path, data: str, threads: int | None) -> None:
    if not (out / "summary.json").exists():
        extra = [a for s in sets for a in ("--set", s)]
        if threads:
            extra += ["--set", f"train.threads={threads}"]
        resume = ["--resume", str(out)] if (out / "checkpoints" / "last.json").exists() else ["--out", str(out)]
        subprocess.run([sys.executable, "-m", "pneumoscope", "train", "--config", config, "--data", data, *resume,
                        "--no-progress", *([] if resume[0] == "--resume" else extra)], check=True)
    if not (out / "eval" / "test" / "metrics.json").exists():
        subprocess.run([sys.executable, "-m", "pneumoscope", "evaluate", str(out), "--data", data, "--split", "test",
                        "--tta", "0", "--no-progress"], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, "paired")
    ap.add_argument("--config", required=True)
    ap.add_argument("--a-set", nargs="*", default=[], help="--set overrides that make variant A")
    ap.add_argument("--b-set", nargs="*", default=[], help="--set overrides that make variant B")
    ap.add_argument("--a-out", required=True)
    ap.add_argument("--b-out", required=True)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (1 lets two runs share 2 cores)")
    ap.add_argument("--train-only", choices=("a", "b"), default=None, help="train (and evaluate) one variant, then stop")
    args = ap.parse_args()
    machine = machine_info()
    runs = {"a": (args.a_set, Path(args.a_out)), "b": (args.b_set, Path(args.b_out))}
    for key, (sets, out) in runs.items():
        if args.train_only in (None, key):
            ensure_run(args.config, sets, out, args.data, args.threads)
    if args.train_only:
        return 0
    from pneumoscope.report.paired import paired_comparison

    cmp_dir = Path(args.a_out).parent / f"paired-{args.out_name}"
    paired_comparison(args.a_out, args.b_out, cmp_dir, split="test", n_boot=2000)
    paired = json.loads((cmp_dir / "paired.json").read_text())
    val = {k: json.loads((out / "summary.json").read_text())["val_metrics"] for k, (_, out) in runs.items()}
    keys = [k for k in VAL_KEYS if k in val["a"] and k in val["b"]]
    val_rows = [[k, fmt(val["a"][k], 4), fmt(val["b"][k], 4), fmt(val["a"][k] - val["b"][k], 4)] for k in keys]
    a_desc = " ".join(shlex.quote(s) for s in args.a_set) or "(config as is)"
    b_desc = " ".join(shlex.quote(s) for s in args.b_set) or "(config as is)"
    md = (f"A = `{args.a_out}` (`--config {args.config}` with {a_desc}); B = `{args.b_out}` (`--config "
          f"{args.config}` with {b_desc}). Each at its own validation-chosen operating point.\n\n"
          "## Validation (patient-grouped split of train; the only basis for a choice)\n\n"
          + md_table(["metric", "A", "B", "A − B"], val_rows)
          + "\n\n## Official test split, paired patient bootstrap (read once, after training)\n\n"
          + (cmp_dir / "paired.md").read_text().split("\n\n", 1)[-1].strip() + "\n")
    publish(args, {"config": args.config, "a": {"sets": args.a_set, "run": args.a_out, "val": val["a"]},
                   "b": {"sets": args.b_set, "run": args.b_out, "val": val["b"]}, "paired": paired}, md, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
