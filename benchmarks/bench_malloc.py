"""glibc's default malloc vs pneumoscope's tuned thresholds (pneumoscope.utils.memory) on CNN passes.

Each case runs in a fresh process per setting (the thresholds are per process, and peak RSS must
be the case's own), EfficientNet-Lite0 with one input channel and channels_last, as ``default``
uses it, on random tensors of the real shapes:

* ``inference``: forward, batch 64, 224 px (the feature pass, evaluation, batch predict);
* ``full step``: forward + backward + AdamW step of the whole network, batch 32, 224 px (a full
  fine-tune);
* ``tail step``: forward + backward + AdamW of the last 4 stages + head on cached stage-5
  features, batch 32 (a ``default`` training step).

Columns: images/s, minor page faults per batch, the kernel's share of the process CPU time, and
peak RSS. ``PNEUMOSCOPE_MALLOC=default`` is glibc's own behaviour.

    PYTHONPATH=src python benchmarks/bench_malloc.py

Run it on a quiet machine (rates).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, add_common_args, fmt, machine_info, md_table, publish  # noqa: E402

CASES = ("inference", "full step", "tail step")


def child(case: str, iters: int) -> dict:
    import resource
    import time

    import torch

    from pneumoscope.models import create_model
    from pneumoscope.utils.memory import tune_malloc

    tuned = tune_malloc()
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=2, pretrained=False, in_chans=1)
    model.to(memory_format=torch.channels_last)
    cl = torch.channels_last
    if case == "inference":
        model.eval()
        x, bs = torch.randn(64, 1, 224, 224).contiguous(memory_format=cl), 64

        def step() -> None:
            with torch.no_grad():
                model(x)
    else:
        bs = 32
        if case == "tail step":
            model.freeze("last_n", 4)
            k = model.frozen_prefix()
            with torch.no_grad():
                feats = model.forward_until(torch.randn(bs, 1, 224, 224).contiguous(memory_format=cl), k)
            forward = lambda: model.forward_from(k, feats)  # noqa: E731
        else:
            x = torch.randn(bs, 1, 224, 224).contiguous(memory_format=cl)
            forward = lambda: model(x)  # noqa: E731
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        y = torch.randint(0, 2, (bs,))

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(forward(), y).backward()
            opt.step()
    step()  # warm-up
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    user, sys_ = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    return {"case": case, "tuned": tuned, "images_per_s": iters * bs / dt, "faults_per_batch": (r1.ru_minflt - r0.ru_minflt) / iters,
            "kernel_share": sys_ / max(user + sys_, 1e-9), "peak_rss_mb": r1.ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, "malloc")
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.iters)))
        return 0
    machine = machine_info()
    results = []
    for case in CASES:
        for setting in ("default", "tuned"):
            env = {**os.environ, "PNEUMOSCOPE_MALLOC": setting, "PYTHONPATH": str(REPO / "src")}
            out = subprocess.run([sys.executable, __file__, "--child", case, "--iters", str(args.iters)], env=env,
                                 capture_output=True, text=True, check=True).stdout
            results.append({**json.loads(out.strip().splitlines()[-1]), "setting": setting})
    rows = []
    for case in CASES:
        d, t = (next(r for r in results if r["case"] == case and r["setting"] == s) for s in ("default", "tuned"))
        for r in (d, t):
            rows.append([case, "glibc defaults" if r["setting"] == "default" else "tuned (pneumoscope)",
                         fmt(r["images_per_s"]), fmt(r["faults_per_batch"], 0), fmt(100 * r["kernel_share"]),
                         fmt(r["peak_rss_mb"], 0), fmt(r["images_per_s"] / d["images_per_s"], 2)])
    md = ("EfficientNet-Lite0, 1 input channel, channels_last; a fresh process per row; "
          f"{args.iters} timed batches after one warm-up.\n\n"
          + md_table(["case", "malloc", "images/s", "minor page faults / batch", "kernel share of CPU time %",
                      "peak RSS MB", "speed-up"], rows) + "\n")
    publish(args, {"results": results, "iters": args.iters}, md, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
