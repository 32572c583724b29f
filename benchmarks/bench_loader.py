"""Loader benchmark: images/s delivered to the model, notebook pipeline vs pneumoscope's cache.

"Delivered" means a normalised float batch ready for EfficientNet-Lite0 as each pipeline's model
takes it: (32, 3, 224, 224) for the notebooks' (grayscale replicated to RGB), (32, 1, 224, 224) for
pneumoscope's ``default`` config (``model.in_chans: 1``: the pretrained first conv's RGB weights
summed, the same function with a third of the input floats to write),
*including* the training augmentation (rotation ±10°, shift ±6 %, zoom 0.9-1.1,
brightness/contrast ±20 %: :class:`pneumoscope.data.presets.AugmentSpec`'s defaults, which the
``default`` config uses). All pipelines read the same images in the same run:

(a) the seed notebooks' pipeline: a torchvision ``ImageFolder`` file list, PIL decode and
    ``torchvision.transforms`` (Resize 224, Grayscale→3 ch, RandomRotation, RandomAffine
    translate+scale, ColorJitter, ToTensor, Normalize) every epoch, through a ``DataLoader``
    with ``num_workers`` 0 and 2 (workers restarted every epoch, as in the notebooks);
(b) pneumoscope's training path, exactly as :func:`pneumoscope.train.fit.fit` runs it: the
    cache's uint8 images in memory (``ImageCache.get``), :class:`EpochSampler` order, the
    engine's own ``_forward`` with the model replaced by ``nn.Identity`` (cache slice →
    ``TrainPreset.batch`` → ``EvalPreset``, channels_last);
(b2) for reference, the ``Dataset`` route of :mod:`pneumoscope.data.loader`
    (``CachedImageDataset`` with per-image ``TrainPreset`` + ``make_loader`` + ``EvalPreset``);
(c) the model's own rate: EfficientNet-Lite0 forward+backward on in-memory tensors, batch 32,
    channels_last, all stages trainable (a full fine-tune, the case where the loader matters
    most), so "loader ÷ model" shows whether the loader can ever be the bottleneck.

Each in-process pipeline gets one untimed warm-up batch (first-use costs of PIL, torchvision
and torch kernels); the ``num_workers=2`` loader restarts its workers every epoch, as in the
notebooks, and that start-up is timed. One-off costs are reported too: the scan (manifest:
read, hash and decode every file), the cold cache build from JPEG (no pneumoscope cache yet;
the JPEGs are in the OS page cache because the scan just read them) and the warm re-open a
later run pays (open, CRC-verify, ``update`` finding every image, ``get`` into memory).

The shared ``chest_xray`` copy was shrunk to 224×224 JPEGs, which makes decoding (what the
cache saves) unusually cheap; ``--data ../shared/data/chest_xray_fullres_sample`` (22 original
462-1820 px files, same layout) measures the same pipelines on original-size radiographs.

Target (foundation issue): (b) ≥ 5× (a).

    PYTHONPATH=src python benchmarks/bench_loader.py                 # all 5,216 train images, 2 epochs
    PYTHONPATH=src python benchmarks/bench_loader.py --images 64 --epochs 1 --results-dir /tmp/r  # smoke
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

# benchmarks/ is on sys.path (it is this script's folder); common also puts the working tree's src/ there.
from common import DEFAULT_DATA, Timer, command_line, fmt, machine_info, md_table, peak_rss_mb, rate, write_results

import torch  # noqa: E402  (after common, which puts the working tree's src/ on sys.path)
from torch import nn  # noqa: E402

log = logging.getLogger("bench_loader")
BATCH = 32
SIZE = 224
MODEL = "efficientnet_lite0"
TARGET_RATIO = 5.0


# ----------------------------------------------------------------------------------- data
def select_images(data: Path, n: int | None) -> list[tuple[str, Path]]:
    """``(class, path)`` of ``n`` train images spread evenly over the sorted list (all when None)."""
    from pneumoscope.data.imageio import is_image_name

    train = data / "train"
    if not train.is_dir():
        raise SystemExit(f"{train}: not found; pass --data with the Kermany chest_xray folder (train/<CLASS>/*)")
    items = [(c.name, p) for c in sorted(train.iterdir()) if c.is_dir() and not c.name.startswith(".")
             for p in sorted(c.iterdir()) if is_image_name(p) and not p.name.startswith(".")]
    if not items:
        raise SystemExit(f"{train}: no images")
    if n is not None and n < len(items):
        items = [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]
    return items


def link_tree(items: list[tuple[str, Path]], root: Path) -> Path:
    """A Kermany-layout tree ``root/train/<CLASS>/`` of symlinks to the chosen images (no copies)."""
    for cls, path in items:
        dst = root / "train" / cls
        dst.mkdir(parents=True, exist_ok=True)
        (dst / path.name).symlink_to(path.resolve())
    return root


# ----------------------------------------------------------------------------------- (a) plain
def plain_transform(aug, mean, std):
    """The notebooks' per-image torchvision pipeline with ``aug``'s strengths."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize((SIZE, SIZE)),
        T.Grayscale(num_output_channels=3),
        T.RandomRotation(aug.rotate),
        T.RandomAffine(degrees=0, translate=(aug.translate, aug.translate), scale=(aug.scale_min, aug.scale_max)),
        T.ColorJitter(brightness=aug.brightness, contrast=aug.contrast),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def run_plain(root: Path, transform, *, num_workers: int, epochs: int, seed: int) -> dict:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root / "train"), transform=transform)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=num_workers, generator=g)
    next(iter(DataLoader(ds, batch_size=BATCH)))  # untimed warm-up: first-use costs of PIL/torchvision
    torch.manual_seed(seed)
    per_epoch, images, shape = [], 0, None
    for _ in range(epochs):
        n = 0
        with Timer() as t:
            for x, y in loader:
                n += len(y)
                shape = tuple(x.shape)
        per_epoch.append(t.seconds)
        images += n
    return {"images": images, "seconds": sum(per_epoch), "epoch_seconds": per_epoch,
            "images_per_s": rate(images, sum(per_epoch)), "batch_shape": shape, "num_workers": num_workers}


# ----------------------------------------------------------------------------------- (b) cached
def run_cached_training_path(images: np.ndarray, labels: np.ndarray, augment, preset, *, epochs: int,
                             seed: int) -> dict:
    """fit()'s per-epoch data path with the model replaced by ``nn.Identity``."""
    from pneumoscope.data.loader import EpochSampler, epoch_seed
    from pneumoscope.train.engine import ImageSource, _forward, iter_batches

    source = ImageSource(images, labels)
    sampler = EpochSampler(labels, seed=seed)
    identity, device = nn.Identity(), torch.device("cpu")
    _forward(identity, source, np.arange(min(BATCH, len(source))), view_idx=None, preset=preset,  # warm-up
             augment=augment, size=None, device=device, channels_last=True)
    per_epoch, seen, shape, channels_last = [], 0, None, None
    for epoch in range(epochs):
        n = 0
        with Timer() as t:
            sampler.set_epoch(epoch)
            torch.manual_seed(epoch_seed(seed, epoch, 2))  # as fit() does at the start of an epoch
            order = np.fromiter(iter(sampler), dtype=np.int64)
            for idx in iter_batches(order, BATCH):
                y = torch.as_tensor(source.labels[idx], device=device)
                x = _forward(identity, source, idx, view_idx=None, preset=preset, augment=augment, size=None,
                             device=device, channels_last=True)
                n += len(y)
                shape, channels_last = tuple(x.shape), x.is_contiguous(memory_format=torch.channels_last)
        per_epoch.append(t.seconds)
        seen += n
    return {"images": seen, "seconds": sum(per_epoch), "epoch_seconds": per_epoch,
            "images_per_s": rate(seen, sum(per_epoch)), "batch_shape": shape, "channels_last": channels_last}


def run_cached_dataset(cache, hashes: list[str], labels: np.ndarray, augment, preset, *, epochs: int,
                       seed: int) -> dict:
    """``CachedImageDataset`` (per-image augmentation) + ``make_loader`` + ``EvalPreset`` per batch."""
    from pneumoscope.data.loader import CachedImageDataset, EpochSampler, epoch_seed, make_loader

    ds = CachedImageDataset(cache, hashes, labels, augment=augment)
    sampler = EpochSampler(labels, seed=seed)
    loader = make_loader(ds, batch_size=BATCH, sampler=sampler, num_workers=0)
    preset(next(iter(loader))[0])  # untimed warm-up
    per_epoch, seen, shape = [], 0, None
    for epoch in range(epochs):
        n = 0
        with Timer() as t:
            sampler.set_epoch(epoch)
            torch.manual_seed(epoch_seed(seed, epoch, 2))
            for u8, y in loader:
                x = preset(u8)
                n += len(y)
                shape = tuple(x.shape)
        per_epoch.append(t.seconds)
        seen += n
    return {"images": seen, "seconds": sum(per_epoch), "epoch_seconds": per_epoch,
            "images_per_s": rate(seen, sum(per_epoch)), "batch_shape": shape}


# ----------------------------------------------------------------------------------- (c) model
def default_in_chans() -> int:
    """Input channels of the ``default`` config's model: what (b) must deliver and (c) consumes."""
    from pneumoscope.config import load_config
    from pneumoscope.models import get_card

    cfg = load_config("default")
    return int(cfg.model.in_chans or get_card(cfg.model.name).in_chans)


def run_model(*, batches: int, warmup: int, seed: int, in_chans: int) -> dict:
    """EfficientNet-Lite0 forward + backward (cross-entropy) on a fixed in-memory batch."""
    from pneumoscope.models import create_model

    torch.manual_seed(seed)
    model = create_model(MODEL, num_classes=2, pretrained=False, in_chans=in_chans).train()
    model.to(memory_format=torch.channels_last)
    x = torch.randn(BATCH, model.card.in_chans, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (BATCH,))
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(batches):
        with Timer() as t:
            step()
        times.append(t.seconds)
    return {"model": MODEL, "batch_size": BATCH, "batches": batches, "warmup": warmup, "seconds": sum(times),
            "batch_seconds": times, "images_per_s": rate(BATCH * batches, sum(times)), "channels_last": True,
            "trainable": "all stages"}


# ----------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Kermany chest_xray folder (default: %(default)s)")
    p.add_argument("--images", type=int, default=None, help="train images to use (default: all)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per loader pipeline (default: %(default)s)")
    p.add_argument("--model-batches", type=int, default=None,
                   help="timed fwd+bwd batches for (c) (default: min(20, images/32), at least 1)")
    p.add_argument("--model-warmup", type=int, default=1, help="untimed fwd+bwd batches first (default: 1)")
    p.add_argument("--workers", type=int, default=2, help="threads of the scan and cache build (default: 2, "
                   "the configs' data.workers)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-name", default="loader", help="results file name (default: %(default)s)")
    p.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results")
    args = p.parse_args(argv)
    if args.images is not None and args.images < 1 or args.epochs < 1:
        p.error("--images and --epochs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("pneumoscope").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    command = command_line([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])

    from pneumoscope.data.cache import ImageCache, build_cache
    from pneumoscope.data.preprocess import PreprocessSpec
    from pneumoscope.data.presets import AugmentSpec, EvalPreset, TrainPreset
    from pneumoscope.data.scan import scan_dataset
    from pneumoscope.models import get_card

    items = select_images(args.data, args.images)
    n = len(items)
    model_batches = args.model_batches or max(1, min(20, n // BATCH))
    card = get_card(MODEL)
    in_chans = default_in_chans()
    aug_spec = AugmentSpec()  # the default config's augmentation
    spec = PreprocessSpec(size=SIZE, resize="squash")  # the default config's preprocessing
    log.info("%d train images from %s, %d epoch(s), torch threads %d", n, args.data, args.epochs,
             torch.get_num_threads())

    with tempfile.TemporaryDirectory(prefix="pneumoscope-bench-loader-") as tmp:
        root = link_tree(items, Path(tmp) / "data")
        cache_root = Path(tmp) / "cache"

        log.info("scan (manifest) ...")
        with Timer() as t_scan:
            manifest = scan_dataset(root, progress=False, workers=args.workers)
        df = manifest.df[manifest.df["status"] == "ok"].sort_values("path").reset_index(drop=True)
        class_names = sorted(df["label"].unique())
        labels = df["label"].map({c: i for i, c in enumerate(class_names)}).to_numpy(np.int64)
        hashes = list(df["content_hash"])

        log.info("cold cache build from JPEG ...")
        with Timer() as t_build:
            cache, report = build_cache(df, cache_root, spec, workers=args.workers, progress=False)
        if report.failed:  # every pipeline must see the same images
            raise SystemExit(f"{len(report.failed)} images failed to decode ({list(report.failed.items())[:3]}); "
                             "choose other images")

        log.info("warm re-open ...")
        with Timer() as t_open:
            cache = ImageCache(cache_root, spec)
            cache.update(list(df["path"]), hashes, workers=args.workers, progress=False)  # verifies CRCs, reuses
        with Timer() as t_get:
            images = cache.get(hashes)  # what prepare_data() holds in memory for training

        preset = EvalPreset.from_card(card, in_chans=in_chans, channels_last=True)
        augment = TrainPreset(aug_spec)
        transform = plain_transform(aug_spec, list(card.mean), list(card.std))

        results: dict[str, dict] = {}
        for nw in (0, 2):
            log.info("(a) plain pipeline, num_workers=%d ...", nw)
            results[f"plain_nw{nw}"] = run_plain(root, transform, num_workers=nw, epochs=args.epochs, seed=args.seed)
        log.info("(b) cached training path ...")
        results["cached_training_path"] = run_cached_training_path(images, labels, augment, preset,
                                                                   epochs=args.epochs, seed=args.seed)
        log.info("(b2) CachedImageDataset + make_loader ...")
        results["cached_dataset_loader"] = run_cached_dataset(cache, hashes, labels, augment, preset,
                                                              epochs=args.epochs, seed=args.seed)
        del images
    log.info("(c) %s forward+backward, %d batch(es) ...", MODEL, model_batches)
    model = run_model(batches=model_batches, warmup=args.model_warmup, seed=args.seed, in_chans=in_chans)

    plain0 = results["plain_nw0"]["images_per_s"]
    best_plain = max(results["plain_nw0"]["images_per_s"], results["plain_nw2"]["images_per_s"])
    train_ips = model["images_per_s"]
    cached = results["cached_training_path"]["images_per_s"]
    ratio_best = cached / best_plain if best_plain > 0 else math.nan
    for r in results.values():
        r["ratio_vs_plain_nw0"] = r["images_per_s"] / plain0 if plain0 > 0 else math.nan
        r["loader_over_model"] = r["images_per_s"] / train_ips if train_ips > 0 else math.nan
        # With an in-process loader (num_workers 0) its time adds to every step:
        r["share_of_step_if_serial"] = (1 / r["images_per_s"]) / (1 / r["images_per_s"] + 1 / train_ips)

    labels_ = {
        "plain_nw0": "(a) plain: ImageFolder + PIL + torchvision.transforms, num_workers=0",
        "plain_nw2": "(a) plain: same, num_workers=2",
        "cached_training_path": "(b) pneumoscope cache → TrainPreset.batch → EvalPreset (the training path)",
        "cached_dataset_loader": "(b2) CachedImageDataset (per-image TrainPreset) + make_loader → EvalPreset",
    }
    rows = [[labels_[k], fmt(r["images_per_s"]), f"{fmt(r['ratio_vs_plain_nw0'], 2)}×",
             f"{fmt(r['loader_over_model'], 1)}×", f"{fmt(100 * r['share_of_step_if_serial'], 1)} %"]
            for k, r in results.items()]
    rows.append([f"(c) {MODEL} forward+backward (model compute, batch {BATCH}, channels_last)", fmt(train_ips),
                 "–", "1.0×", "–"])
    verdict = "met" if ratio_best >= TARGET_RATIO else "NOT met"
    table = "\n\n".join([
        f"{n} train images × {args.epochs} epoch(s), batch {BATCH}, {SIZE} px, augmentation {aug_spec.to_dict()}, "
        f"torch threads {torch.get_num_threads()}.",
        md_table(["pipeline", "images/s", "× plain (nw=0)", "loader ÷ model fwd+bwd",
                  "loading share of a step if serial"], rows),
        f"**Target: (b) ≥ {TARGET_RATIO:g}× (a).** (b) is {fmt(cached / plain0 if plain0 else math.nan, 1)}× "
        f"plain nw=0 and {fmt(ratio_best, 1)}× the faster plain variant → target {verdict}.",
        md_table(["one-off cost", "seconds", "images/s"], [
            ["scan (manifest: read + sha256 + decode every file)", fmt(t_scan.seconds, 2), fmt(rate(n, t_scan.seconds))],
            ["cache build, cold (decode JPEG + preprocess + write)", fmt(t_build.seconds, 2),
             fmt(rate(report.added, t_build.seconds))],
            ["cache re-open, warm (open + CRC verify + update finds all)", fmt(t_open.seconds, 2),
             fmt(rate(n, t_open.seconds))],
            ["cache get → memory (ImageCache.get, as fit() does)", fmt(t_get.seconds, 3), fmt(rate(n, t_get.seconds))],
        ]),
        f"Peak RSS of the benchmark process: {fmt(peak_rss_mb(), 0)} MiB.",
    ])
    payload = {
        "images": n, "epochs": args.epochs, "batch_size": BATCH, "size": SIZE, "seed": args.seed,
        "data": str(args.data), "classes": class_names, "augment": aug_spec.to_dict(), "preprocess": spec.to_dict(),
        "torch_threads": torch.get_num_threads(), "pipelines": results, "model_compute": model,
        "target": {"ratio": TARGET_RATIO, "cached_over_best_plain": ratio_best, "met": ratio_best >= TARGET_RATIO},
        "one_off": {"scan_seconds": t_scan.seconds, "cache_build_cold_seconds": t_build.seconds,
                    "cache_build_added": report.added, "cache_build_failed": len(report.failed),
                    "cache_reopen_warm_seconds": t_open.seconds, "cache_get_seconds": t_get.seconds},
        "peak_rss_mb": peak_rss_mb(), "load_avg_end": [round(x, 2) for x in os.getloadavg()],
    }
    json_path, md_path = write_results(args.out_name, payload, table, command, results_dir=args.results_dir,
                                       machine=machine)
    sys.stdout.write(table + f"\n\nwrote {json_path} and {md_path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
