"""How training cost grows with the number of images and with the resolution (`default` recipe).

For each point, on real images of the official train folder (a seeded, class-mixed head of it):

* **image cache build**: cold, from the JPEGs, into a fresh temporary cache (decode, grayscale,
  resize to the point's size, uint8) — what `pneumoscope` does once per dataset and size;
* **feature pass**: the frozen prefix of `default` (EfficientNet-Lite0 stages 0-4) for its 3 views;
* **one tail epoch**: `train_one_epoch` on the cached features (last 4 stages + head);
* **training (10 epochs)** = feature pass + 10 × epoch, the `default` schedule.

Images: 1,000 / 2,500 / 5,216 at 224 px; resolution: 128 / 224 / 320 px at 2,500 images. The
shared copy of the dataset is 224 px, so 320 px is an upsampled input: the cost is real, the
pixels carry no more detail. Fitted slopes of log(time) on log(images) and on log(side length)
(cost ∝ pixels would be a slope of 2 against the side length).

    PYTHONPATH=src python benchmarks/bench_scaling.py --data ../shared/data/chest_xray

Run it on a quiet machine (wall times).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_RESULTS_DIR, add_common_args, fmt, machine_info, md_table, publish, save_figure  # noqa: E402
from training_parts import (FeatureSource, build_image_cache, default_parts, feature_pass, pipeline_epochs,  # noqa: E402
                            temp_cache_dir, train_pool)

EPOCHS = 10


def measure(pool, size: int) -> dict:
    with temp_cache_dir() as tmp:
        images, cache_s = build_image_cache(pool, size, Path(tmp))
    cfg, phase, model, preset, augment = default_parts("default")
    model.freeze(phase.freeze, phase.trainable_stages)
    k = model.frozen_prefix()
    feats, feat = feature_pass(model, k, images, preset, augment, phase.feature_views)
    epoch = pipeline_epochs(cfg, model, FeatureSource(feats, pool.labels, k), pool.labels, preset, None, 1,
                            phase.lr)[0]
    return {"images": len(pool.paths), "size": size, "cache_build_s": cache_s, "feature_pass_s": feat.seconds,
            "epoch_s": epoch.seconds, "train_10ep_s": feat.seconds + EPOCHS * epoch.seconds,
            "feature_cache_mb": feats.numel() * feats.element_size() / 2**20}


def slope(xs, ys) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def plot(by_n: list[dict], by_size: list[dict], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, pts, key, label in ((axes[0], by_n, "images", "train images"), (axes[1], by_size, "size", "side (px)")):
        xs = [p[key] for p in pts]
        for metric, name in (("train_10ep_s", "training, 10 epochs"), ("feature_pass_s", "feature pass (3 views)"),
                             ("epoch_s", "one tail epoch"), ("cache_build_s", "image cache build")):
            ys = [p[metric] for p in pts]
            ax.loglog(xs, ys, "o-", label=f"{name} (slope {slope(xs, ys):.2f})")
        ax.set_xlabel(f"{label} (log)")
        ax.set_ylabel("seconds (log)")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("cost vs images (224 px)")
    axes[1].set_title(f"cost vs resolution ({by_size[0]['images']} images)")
    save_figure(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, "scaling")
    ap.add_argument("--images", type=int, nargs="+", default=[1000, 2500, 5216])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 224, 320])
    ap.add_argument("--size-images", type=int, default=2500, help="images for the resolution series")
    args = ap.parse_args()

    machine = machine_info()
    pool = train_pool(args.data)
    args.images = [min(n, len(pool.paths)) for n in args.images]
    measure(pool.head(64), 224)  # warm-up: weight loading, first-call kernel selection
    done: dict[tuple[int, int], dict] = {}
    for n in args.images:
        done[(n, 224)] = measure(pool.head(n), 224)
        print(done[(n, 224)], flush=True)
    for s in args.sizes:
        if (args.size_images, s) not in done:
            done[(args.size_images, s)] = measure(pool.head(args.size_images), s)
            print(done[(args.size_images, s)], flush=True)
    by_n = [done[(n, 224)] for n in args.images]
    by_size = [done[(args.size_images, s)] for s in args.sizes]

    def rows(pts):
        return [[p["images"], p["size"], fmt(p["cache_build_s"]), fmt(p["feature_pass_s"]), fmt(p["epoch_s"]),
                 fmt(p["train_10ep_s"]), fmt(p["feature_cache_mb"], 0),
                 fmt(p["images"] / p["train_10ep_s"] * EPOCHS)] for p in pts]

    header = ["images", "px", "image cache build s", "feature pass s (3 views)", "tail epoch s",
              "training s (10 epochs)", "feature cache MB", "img·epochs/s"]
    metrics = ("cache_build_s", "feature_pass_s", "epoch_s", "train_10ep_s")
    slopes = {"images": {m: slope([p["images"] for p in by_n], [p[m] for p in by_n]) for m in metrics},
              "size": {m: slope([p["size"] for p in by_size], [p[m] for p in by_size]) for m in metrics}}
    slope_rows = [[m, f"{slopes['images'][m]:.2f}", f"{slopes['size'][m]:.2f}"] for m in metrics]
    results_dir = Path(args.results_dir) if args.results_dir else DEFAULT_RESULTS_DIR
    png = results_dir / f"{args.out_name}.png"
    plot(by_n, by_size, png)
    table_md = (f"## vs number of images (224 px)\n\n{md_table(header, rows(by_n))}\n\n"
                f"## vs resolution ({args.size_images} images)\n\n{md_table(header, rows(by_size))}\n\n"
                f"## Fitted log-log slopes\n\n"
                f"{md_table(['cost', 'vs images (1 = linear)', 'vs side length (2 = ∝ pixels)'], slope_rows)}\n\n"
                f"![log-log plot]({png.name})\n\nTraining = the 3-view feature pass + 10 × the measured tail epoch "
                f"(the `default` schedule). The image cache is built once per dataset and size and reused by "
                f"every later run. 320 px is upsampled from the shared 224-px copy.\n")
    payload = {"points": list(done.values()), "slopes": slopes, "epochs": EPOCHS, "plot": png.name}
    publish(args, payload, table_md, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
