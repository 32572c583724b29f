"""Pipeline efficiency: pneumoscope's training images/s ÷ the same network's compute-only bound.

"Compute-only bound" = forward + backward + optimiser step of exactly the network a training step
runs, at the same batch size, on one batch already in memory (nothing to load, index, convert or
augment). The pipeline figure is ``train_one_epoch`` as ``fit`` runs it on real train images.

* ``default`` (feature cache): a step runs the trainable tail (last 4 stages + head) on cached
  prefix features; the bound is the tail on an in-memory feature batch.
* full fine-tune (``feature_cache: false``, all stages trainable, per-batch augmentation from the
  uint8 image cache): the bound is the whole network on an in-memory image batch.

It also prices a whole ``default`` training (3-view feature pass + 10 tail epochs) against the
bound of the notebooks' way (10 full fine-tune epochs): the compute pneumoscope does not do.

    PYTHONPATH=src python benchmarks/bench_efficiency.py --data ../shared/data/chest_xray

Run it on a quiet machine (rates).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, fmt, machine_info, md_table, publish  # noqa: E402
from training_parts import (FeatureSource, ImageSource, build_image_cache, compute_bound, default_parts,  # noqa: E402
                            feature_pass, pipeline_epochs, temp_cache_dir, train_pool)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, "efficiency")
    ap.add_argument("--images", type=int, default=2048, help="train images for the feature-cache path")
    ap.add_argument("--full-images", type=int, default=384, help="train images for the full fine-tune path")
    ap.add_argument("--epochs", type=int, default=2, help="pipeline epochs (the last one is reported)")
    args = ap.parse_args()

    machine = machine_info()
    pool = train_pool(args.data).head(max(args.images, args.full_images))
    with temp_cache_dir() as tmp:
        images, _ = build_image_cache(pool, 224, Path(tmp))

    # --- default: feature cache, trainable tail
    cfg, phase, model, preset, augment = default_parts("default")
    model.freeze(phase.freeze, phase.trainable_stages)
    k = model.frozen_prefix()
    n = args.images
    feats, feat_m = feature_pass(model, k, images[:n], preset, augment, phase.feature_views)
    src = FeatureSource(feats, pool.labels[:n], k)
    tail_runs = pipeline_epochs(cfg, model, src, pool.labels[:n], preset, None, args.epochs, phase.lr)
    bs = cfg.train.batch_size
    fb = feats[0, :bs].float().contiguous(memory_format=torch.channels_last)
    tail_bound = compute_bound(cfg, model, fb, torch.as_tensor(pool.labels[:bs]), steps=n // bs, lr=phase.lr,
                               start_stage=k)
    del feats, src

    # --- full fine-tune: images, augmentation per batch, every stage trainable
    cfg, phase, model, preset, augment = default_parts("default")
    model.freeze("none")
    m = args.full_images
    full_runs = pipeline_epochs(cfg, model, ImageSource(images[:m], pool.labels[:m]), pool.labels[:m], preset,
                                augment, args.epochs, phase.lr)
    xb = preset(torch.from_numpy(images[:bs]).unsqueeze(1))
    full_bound = compute_bound(cfg, model, xb, torch.as_tensor(pool.labels[:bs]), steps=m // bs, lr=phase.lr)

    tail, full = tail_runs[-1], full_runs[-1]
    epochs = 10
    # A whole default training on N images: one feature pass (V views) + 10 tail epochs, against the
    # compute-only bound of 10 full fine-tune epochs on the same N images (the notebooks' way).
    per_img_default = feat_m.seconds / n + epochs * tail.seconds / tail.images
    per_img_full_bound = epochs / full_bound.rate
    rows = [
        ["`default` step: tail (last 4 stages + head) on cached features", f"{fmt(tail.rate)}",
         f"{fmt(tail_bound.rate)}", f"**{tail.rate / tail_bound.rate:.2f}**", n],
        ["full fine-tune step: image cache → augment → whole network", f"{fmt(full.rate)}",
         f"{fmt(full_bound.rate)}", f"**{full.rate / full_bound.rate:.2f}**", m],
    ]
    table = md_table(["training step", "pipeline img/s", "compute-only bound img/s", "efficiency (target ≥ 0.9)",
                      "images"], rows)
    verdict = ("met" if min(tail.rate / tail_bound.rate, full.rate / full_bound.rate) >= 0.9 else "NOT met")
    extra = md_table(["whole training on N images, 10 epochs", "seconds per image", "relative"], [
        [f"`default`: feature pass ({phase.feature_views} views, {fmt(feat_m.rate)} img-views/s) + 10 tail epochs",
         f"{per_img_default:.4f}", "1.00"],
        ["compute-only bound of 10 full fine-tune epochs (the notebooks' way, same network)",
         f"{per_img_full_bound:.4f}", f"{per_img_full_bound / per_img_default:.2f}× the time"],
    ])
    table_md = (f"{table}\n\nTarget (pipeline ÷ compute-only bound ≥ 0.9 on both paths): **{verdict}**. "
                f"Batch {bs}, channels_last, {torch.get_num_threads()} torch threads, the last of {args.epochs} "
                f"epochs on real train images; bound = forward + backward + AdamW step on one in-memory batch.\n\n"
                f"{extra}\n\nThe speed of `default` comes from computing less (the frozen prefix once per view "
                f"instead of every epoch), not from the loader.\n")
    payload = {
        "tail": {"pipeline_img_s": tail.rate, "bound_img_s": tail_bound.rate, "efficiency": tail.rate / tail_bound.rate,
                 "images": n, "epoch_rates": [r.rate for r in tail_runs]},
        "full": {"pipeline_img_s": full.rate, "bound_img_s": full_bound.rate, "efficiency": full.rate / full_bound.rate,
                 "images": m, "epoch_rates": [r.rate for r in full_runs]},
        "feature_pass_img_views_s": feat_m.rate, "feature_views": phase.feature_views,
        "default_seconds_per_image_10ep": per_img_default, "full_bound_seconds_per_image_10ep": per_img_full_bound,
        "verdict": verdict,
    }
    publish(args, payload, table_md, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
