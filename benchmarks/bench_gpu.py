"""GPU training throughput: pneumoscope's pipeline ÷ the GPU's compute-only bound (benchmarks issue, GPU section).

The same measurement as ``bench_efficiency.py``, on a CUDA device, with what ``fit`` does there:
bf16 autocast, channels_last, the image (or feature) cache resident in device memory
(``pneumoscope.train.engine.on_device``), augmentation by the torch backend of ``TrainPreset``
on the device; ``--compile`` adds a ``torch.compile`` variant of the full fine-tune.

* full fine-tune step (every stage trainable): uint8 cache on the GPU → augment → whole network;
  bound = the same network's forward + backward + AdamW step on one in-memory GPU batch.
* ``default`` step (frozen prefix computed once): the feature pass's rate, then the trainable tail
  on the GPU-resident feature cache against the tail's bound.

Each path runs interleaved rounds (after a warm-up: a few pipeline epochs, then the bound over as
many steps; median of the rounds' ratios). GPU utilisation is sampled by ``nvidia-smi`` every
100 ms during the pipeline epochs only. Target: pipeline ÷ bound ≥ 0.8.

    PYTHONPATH=src python benchmarks/bench_gpu.py --data ../shared/data/chest_xray --compile

Only where a GPU is present (the ``device`` tool lends one in some sessions). ``--device cpu
--images 96 --batch 16 --rounds 1`` runs the same code on a CPU as a dry run of the script.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, fmt, machine_info, md_table, publish  # noqa: E402
from training_parts import (FeatureSource, ImageSource, build_image_cache, default_parts, feature_pass,  # noqa: E402
                            interleaved_rounds, summarize_rounds, temp_cache_dir, train_pool)

from pneumoscope.train.engine import on_device  # noqa: E402


class GpuSampler:
    """``nvidia-smi`` utilisation samples (every 100 ms, in a thread); ``window()`` marks the spans to average."""

    def __init__(self, device: torch.device) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (time, utilisation %, memory MiB)
        self.windows: list[tuple[float, float]] = []
        self.proc = None
        if device.type != "cuda":
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", "-lms", "100"], stdout=subprocess.PIPE, text=True)
        except OSError:
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, mem = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.perf_counter(), util, mem))

    @contextlib.contextmanager
    def window(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.windows.append((t0, time.perf_counter()))

    def utilisation(self) -> float | None:
        """Mean utilisation % over the samples inside the windows (None without nvidia-smi)."""
        inside = [u for t, u, _ in self.samples if any(a <= t <= b for a, b in self.windows)]
        return statistics.mean(inside) if inside else None

    def peak_memory_mib(self) -> float | None:
        return max((m for _, _, m in self.samples), default=None)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def _summary(rounds, sampler: GpuSampler) -> dict:
    return {**summarize_rounds(rounds), "gpu_utilisation_pct": sampler.utilisation(),
            "gpu_memory_peak_mib": sampler.peak_memory_mib()}


def _device_line(device: torch.device) -> str:
    if device.type != "cuda":
        return f"{device} (dry run: no GPU)"
    p = torch.cuda.get_device_properties(device)
    return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, "gpu_training")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=0, help="train images (0: the whole train folder)")
    ap.add_argument("--batch", type=int, default=256, help="batch size (per step)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--epochs-per-round", type=int, default=2, help="pipeline epochs per round (short on a GPU)")
    ap.add_argument("--amp", choices=("bf16", "fp16", "off"), default="bf16")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd full fine-tune")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("bench_gpu: no CUDA device here; this benchmark needs a GPU "
                         "(--device cpu runs it as a dry run)\n")
        return 2
    torch.backends.cudnn.benchmark = True
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp]
    machine = machine_info()
    machine["accelerator"] = _device_line(device)
    pool = train_pool(args.data)
    pool = pool.head(args.images) if args.images else pool
    with temp_cache_dir() as tmp:
        images, _ = build_image_cache(pool, 224, Path(tmp))
    overrides = [f"train.batch_size={args.batch}"]
    rounds_kw = dict(amp_dtype=amp, epochs_per_round=args.epochs_per_round)
    results: dict = {}

    # --- full fine-tune: eager, then (optionally) compiled
    resident = on_device(images, device)
    for mode in ("eager", "compile") if args.compile else ("eager",):
        cfg, phase, model, preset, augment = default_parts("default", overrides)
        model.freeze("none")
        model.to(device)
        step_model = torch.compile(model) if mode == "compile" else model
        bs = cfg.train.batch_size
        xb = preset(torch.from_numpy(images[:bs]).unsqueeze(1).to(device))
        sampler = GpuSampler(device)
        try:
            rounds = interleaved_rounds(cfg, step_model, ImageSource(resident, pool.labels), pool.labels, preset,
                                        augment, xb, phase.lr, args.rounds, pipeline_window=sampler.window,
                                        **rounds_kw)
        finally:
            sampler.close()
        results[f"full_{mode}"] = _summary(rounds, sampler)
        del model, step_model

    # --- default: the feature pass, then the tail on the device-resident feature cache
    cfg, phase, model, preset, augment = default_parts("default", overrides)
    model.freeze(phase.freeze, phase.trainable_stages)
    model.to(device)
    k = model.frozen_prefix()
    feats, feat_m = feature_pass(model, k, resident, preset, augment, phase.feature_views, device=device)
    feats = on_device(feats, device, "feature cache")
    fb = feats[0, :bs].float().contiguous(memory_format=torch.channels_last)
    sampler = GpuSampler(device)
    try:
        rounds = interleaved_rounds(cfg, model, FeatureSource(feats, pool.labels, k), pool.labels, preset, None, fb,
                                    phase.lr, args.rounds, start_stage=k, pipeline_window=sampler.window, **rounds_kw)
    finally:
        sampler.close()
    results["tail"] = _summary(rounds, sampler)

    labels = {"full_eager": "full fine-tune step: GPU image cache → GPU augment → whole network",
              "full_compile": "the same, `torch.compile`d",
              "tail": "`default` step: tail (last 4 stages + head) on the GPU feature cache"}

    def util(r: dict) -> str:
        return "n/a" if r["gpu_utilisation_pct"] is None else f"{r['gpu_utilisation_pct']:.0f} %"

    table = md_table(["training step", "pipeline img/s (median)", "compute-only bound img/s (median)",
                      "efficiency, median of rounds (target ≥ 0.8)", "range over rounds", "GPU utilisation"],
                     [[labels[key], fmt(r["pipeline_img_s"]), fmt(r["bound_img_s"]), f"**{r['efficiency']:.2f}**",
                       f"{r['efficiency_min']:.2f}–{r['efficiency_max']:.2f}", util(r)] for key, r in results.items()])
    verdict = "met" if min(r["efficiency"] for r in results.values()) >= 0.8 else "NOT met"
    table_md = (f"Device: {machine['accelerator']}. {len(pool.labels)} train images at 224 px, batch {bs}, "
                f"autocast {args.amp}, channels_last; {args.rounds} rounds of {args.epochs_per_round} pipeline "
                f"epoch(s) + the bound over as many steps, after a warm-up.\n\n{table}\n\n"
                f"Target (pipeline ÷ compute-only bound ≥ 0.8 on every path): **{verdict}**. Feature pass "
                f"({phase.feature_views} views): {fmt(feat_m.rate)} img-views/s.\n")
    payload = {"device": machine["accelerator"], "images": len(pool.labels), "batch": bs, "amp": args.amp,
               "results": results, "feature_pass_img_views_s": feat_m.rate, "verdict": verdict}
    publish(args, payload, table_md, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
