"""Timed pieces of pneumoscope's training path, shared by ``bench_efficiency.py`` and ``bench_scaling.py``.

Each piece runs the project's own code (``ImageCache.update``, ``extract_features``,
``train_one_epoch``) on real train images, and :func:`compute_bound` runs the same network's
forward + backward + optimiser step on one in-memory batch, with nothing else: the rate no input
pipeline can beat.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pneumoscope.config import load_config
from pneumoscope.data.cache import ImageCache
from pneumoscope.data.presets import AugmentSpec, EvalPreset, TrainPreset
from pneumoscope.data.scan import scan_dataset
from pneumoscope.data.preprocess import PreprocessSpec
from pneumoscope.models import create_model
from pneumoscope.train.engine import FeatureSource, ImageSource, extract_features, train_one_epoch
from pneumoscope.train.losses import build_loss, class_weights_from_counts
from pneumoscope.train.schedules import build_optimizer, build_scheduler
from pneumoscope.utils.memory import tune_malloc

# The same process set-up as `pneumoscope train` (fit() tunes glibc's malloc thresholds when
# PNEUMOSCOPE_MALLOC=tuned), so the pieces are timed as the product runs them.
tune_malloc()


@dataclass
class Pool:
    """Train-folder images of the official split (paths, content hashes, labels), in a seeded order."""

    paths: list[str]
    hashes: list[str]
    labels: np.ndarray

    def head(self, n: int) -> "Pool":
        return Pool(self.paths[:n], self.hashes[:n], self.labels[:n])


def train_pool(data_root: str | Path, seed: int = 0) -> Pool:
    """Every image of the official train folder, shuffled by ``seed`` (so any head is class-mixed)."""
    df = scan_dataset(data_root, progress=False).df
    df = df[(df["official_split"] != "test") & (df["status"] == "ok")]
    order = np.random.default_rng(seed).permutation(len(df))
    df = df.iloc[order]
    return Pool(list(df["path"]), list(df["content_hash"]), (df["label"] == "PNEUMONIA").to_numpy(np.int64))


def build_image_cache(pool: Pool, size: int, root: Path, workers: int = 2) -> tuple[np.ndarray, float]:
    """Cold cache build from the JPEGs at ``size`` px (decode, grayscale, resize, uint8): (images, s)."""
    spec = PreprocessSpec(size=size, resize="squash")
    t0 = time.perf_counter()
    cache = ImageCache(root, spec)
    report = cache.update(pool.paths, pool.hashes, workers=workers, progress=False)
    seconds = time.perf_counter() - t0
    if report.failed:
        raise RuntimeError(f"{len(report.failed)} images failed to cache: {next(iter(report.failed.items()))}")
    return np.asarray(cache.get(pool.hashes)), seconds


def default_parts(config: str = "default", overrides: list[str] | None = None):
    """The ``default`` config's model (pretrained, frozen as in its phase), presets, loss and phase."""
    cfg = load_config(config, overrides)
    phase = cfg.train.phases[0]
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.name, num_classes=2, pretrained=cfg.model.pretrained, in_chans=cfg.model.in_chans,
                         head=cfg.model.head, dropout=cfg.model.dropout, **cfg.model.kwargs)
    model.to(memory_format=torch.channels_last)
    preset = EvalPreset.from_card(model.card, channels_last=True)
    augment = TrainPreset(AugmentSpec(**cfg.augment.model_dump()))
    return cfg, phase, model, preset, augment


def _optim(cfg, model, lr: float, steps_per_epoch: int, epochs: int):
    opt = build_optimizer(model.parameters(), cfg.train.optimizer, lr, cfg.train.weight_decay, cfg.train.momentum)
    sc = cfg.train.schedule
    sched = build_scheduler(opt, sc.name, lr=lr, steps_per_epoch=steps_per_epoch, epochs=epochs,
                            warmup_epochs=sc.warmup_epochs, min_lr_ratio=sc.min_lr_ratio,
                            plateau_factor=sc.plateau_factor, plateau_patience=sc.plateau_patience)
    return opt, sched


@dataclass
class Measured:
    images: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else math.nan


def feature_pass(model, k: int, images: np.ndarray | torch.Tensor, preset: EvalPreset, augment: TrainPreset,
                 views: int, seed: int = 0, device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, Measured]:
    """``extract_features`` exactly as ``fit`` calls it (``views`` views, view 0 clean), timed."""
    t0 = time.perf_counter()
    feats = extract_features(model, k, images, preset, augment=augment, views=views, seed=seed, size=None,
                             progress=False, device=device)
    return feats, Measured(len(images) * views, time.perf_counter() - t0)


def pipeline_epochs(cfg, model, source, labels: np.ndarray, preset: EvalPreset, augment: TrainPreset | None,
                    epochs: int, lr: float, device: torch.device = torch.device("cpu"),
                    amp_dtype: torch.dtype | None = None) -> list[Measured]:
    """``train_one_epoch`` as ``fit`` runs it (same loss, optimiser, schedule, batch, view sampling)."""
    bs = cfg.train.batch_size
    crit = build_loss(cfg.train.loss.name, class_weights=class_weights_from_counts(np.bincount(labels, minlength=2)),
                      label_smoothing=cfg.train.loss.label_smoothing).to(device)
    opt, sched = _optim(cfg, model, lr, math.ceil(len(labels) / bs), epochs)
    out = []
    for e in range(epochs):
        order = np.random.default_rng(e).permutation(len(labels))
        r = train_one_epoch(model, source, order=order, criterion=crit, optimizer=opt, scheduler=sched, preset=preset,
                            augment=augment, batch_size=bs, view_rng=np.random.default_rng(100 + e),
                            channels_last=True, progress=False, device=device, amp_dtype=amp_dtype)
        out.append(Measured(len(order), r["seconds"]))
    return out


def compute_bound(cfg, model, batch: torch.Tensor, labels: torch.Tensor, steps: int, lr: float,
                  start_stage: int | None = None, amp_dtype: torch.dtype | None = None) -> Measured:
    """Forward + backward + optimiser step on one in-memory batch, ``steps`` times (after 3 warm-up steps).

    ``start_stage`` = k runs ``model.forward_from(k, batch)`` (the trainable tail on cached features).
    The batch's device is the device; ``amp_dtype`` autocasts the forward as ``train_one_epoch`` does.
    """
    dev = batch.device
    crit = build_loss(cfg.train.loss.name, class_weights=class_weights_from_counts(np.bincount(labels.cpu().numpy(),
                                                                                               minlength=2))).to(dev)
    labels = labels.to(dev)
    opt, _ = _optim(cfg, model, lr, steps, 1)
    model.train()

    def step() -> None:
        with torch.autocast(dev.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model.forward_from(start_stage, batch) if start_stage else model(batch)
        crit(logits.float(), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(3):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return Measured(steps * len(labels), time.perf_counter() - t0)


@dataclass
class Round:
    """One pipeline epoch and, right after it, the compute-only bound over as many steps."""

    pipeline: Measured
    bound: Measured

    @property
    def efficiency(self) -> float:
        return self.pipeline.rate / self.bound.rate


def interleaved_rounds(cfg, model, source, labels: np.ndarray, preset: EvalPreset, augment: TrainPreset | None,
                       bound_batch: torch.Tensor, lr: float, rounds: int, start_stage: int | None = None,
                       amp_dtype: torch.dtype | None = None, epochs_per_round: int = 1,
                       pipeline_window=contextlib.nullcontext) -> list[Round]:
    """``rounds`` × (one pipeline epoch, then the bound over the same number of steps), after one warm-up epoch.

    Why interleaved: on a shared 2-core VM the machine's speed drifts by ±15 % over minutes, so a
    pipeline rate timed in one minute and a bound timed in another give a ratio that is mostly
    drift (a single pair measured 0.80 for a step whose input work is 0.4 ms of ~55 ms per image).
    Each round's ratio compares two measurements taken back to back; the benchmark reports their
    median and range. ``epochs_per_round`` lengthens a round where an epoch is short (a GPU);
    ``pipeline_window()`` is entered around each round's pipeline epochs (e.g. to sample GPU
    utilisation there and not during the bound).
    """
    bs = cfg.train.batch_size
    bound_labels = torch.as_tensor(labels[:bs])
    dev = bound_batch.device
    pipeline_epochs(cfg, model, source, labels, preset, augment, 1, lr, dev, amp_dtype)  # warm-up, not counted
    out = []
    for _ in range(rounds):
        with pipeline_window():
            epochs = pipeline_epochs(cfg, model, source, labels, preset, augment, epochs_per_round, lr, dev, amp_dtype)
        pipe = Measured(sum(m.images for m in epochs), sum(m.seconds for m in epochs))
        bound = compute_bound(cfg, model, bound_batch, bound_labels, steps=epochs_per_round * (len(labels) // bs),
                              lr=lr, start_stage=start_stage, amp_dtype=amp_dtype)
        out.append(Round(pipe, bound))
    return out


def summarize_rounds(rounds: list[Round]) -> dict:
    """Median pipeline rate, bound and efficiency of interleaved rounds, with the efficiency's range."""
    eff = [r.efficiency for r in rounds]
    return {"pipeline_img_s": statistics.median(r.pipeline.rate for r in rounds),
            "bound_img_s": statistics.median(r.bound.rate for r in rounds),
            "efficiency": statistics.median(eff), "efficiency_min": min(eff), "efficiency_max": max(eff),
            "rounds": [{"pipeline_img_s": r.pipeline.rate, "bound_img_s": r.bound.rate, "efficiency": r.efficiency}
                       for r in rounds]}


def temp_cache_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="pneumoscope-bench-cache-")


__all__ = ["Pool", "train_pool", "build_image_cache", "default_parts", "feature_pass", "pipeline_epochs",
           "compute_bound", "interleaved_rounds", "summarize_rounds", "Measured", "Round", "temp_cache_dir", "FeatureSource", "ImageSource"]
