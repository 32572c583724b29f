"""``fit``: config → run directory with curves, checkpoints and a validation-chosen operating point.

The run directory (everything needed to reproduce and compare a result)::

    config.yaml          the resolved config            env.json       versions, device, threads
    train.log            the log                        metrics.csv    one row per epoch
    curves.png           loss / AUROC / LR per epoch    summary.json   final validation metrics
    split.csv            which image was train / val (patient-grouped)
    checkpoints/best*    best weights on the validation metric, with threshold + temperature
    checkpoints/last*    resumable state (weights, optimiser, scheduler, history)

The test split is never read here: only official train (+ official val) images are cached,
the validation split is cut from them by patient, and the operating threshold and temperature
are fitted on that validation split.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

import pneumoscope
from pneumoscope.config import RunConfig, config_to_dict, load_config
from pneumoscope.data.cache import ImageCache, default_cache_root
from pneumoscope.data.loader import EpochSampler, epoch_seed
from pneumoscope.data.manifest import Manifest
from pneumoscope.data.preprocess import PreprocessSpec
from pneumoscope.data.presets import AugmentSpec, EvalPreset, TrainPreset
from pneumoscope.data.tasks import task_labels
from pneumoscope.errors import ConfigError, DatasetError
from pneumoscope.train import distributed as ddp
from pneumoscope.train.checkpoint import (load_model_state, load_training_state, resolve_checkpoint,
                                          save_checkpoint)
from pneumoscope.train.engine import (FeatureSource, ImageSource, _FromStage, evaluate, extract_features,
                                      on_device, predict_logits, train_one_epoch)
from pneumoscope.train.dummy import RealClasses, drop_dummy_output
from pneumoscope.train.losses import build_loss, class_weights_from_counts, num_outputs
from pneumoscope.train.schedules import build_optimizer, build_scheduler
from pneumoscope.utils.io import RunLock, atomic_path, atomic_write_json, atomic_write_text, atomic_write_yaml
from pneumoscope.utils.memory import release_memory

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "pneumoscope-checkpoint/1"


# --------------------------------------------------------------------------- data
@dataclass
class PreparedData:
    manifest: Manifest
    class_names: list[str]
    train_rows: pd.DataFrame
    val_rows: pd.DataFrame
    y_train: np.ndarray
    y_val: np.ndarray
    train_images: np.ndarray
    val_images: np.ndarray
    spec: PreprocessSpec


def load_manifest(data_root: str | Path, *, val_fraction: float, seed: int, progress: bool,
                  workers: int = 2, require_split: bool = True, method: str = "random",
                  val_source: str | None = None) -> Manifest:
    """Scan a dataset (or read a saved manifest file) and cut the patient-grouped validation split,
    or, with ``val_source``, take the validation set from that other dataset (external validation).

    With ``require_split=False`` (evaluation of an external or test-only dataset) a dataset whose
    train pool cannot be split is returned as scanned.
    """
    from pneumoscope.data.scan import scan_dataset
    from pneumoscope.data.split import validation_split

    p = Path(data_root)
    if p.is_file() and p.suffix in (".parquet",) or p.name.endswith(".manifest.csv"):
        manifest = Manifest.load(p)
    else:
        manifest = scan_dataset(p, progress=progress, workers=workers)
    try:
        return validation_split(manifest, val_fraction=val_fraction, seed=seed, method=method, val_source=val_source,
                                progress=progress, workers=workers)
    except DatasetError as err:
        if require_split:
            raise
        log.info("%s: no validation split cut (%s)", data_root, err)
        return manifest


def synthetic_rows(source: str | Path, task: str, class_names: list[str], *, per_class: int | None, seed: int,
                   progress: bool = False, workers: int = 2) -> pd.DataFrame:
    """Manifest rows (with task labels ``y``) of a synthetic-image CSV/folder, e.g. from ``pneumoscope gan sample``.

    Every row is marked ``split='train'`` whatever the file says: the caller adds them to the train
    portion only. ``per_class`` keeps a seeded random subset of at most that many per class.
    """
    from pneumoscope.data.scan import scan_dataset

    path = Path(source)
    if path.is_dir() and (path / "samples.csv").is_file():
        path = path / "samples.csv"
    if not path.exists():
        raise DatasetError(f"{source}: data.synthetic: no such CSV or folder")
    df = scan_dataset(path, progress=progress, workers=workers).df.reset_index(drop=True)
    for p, err in zip(df.loc[df["status"] != "ok", "path"], df.loc[df["status"] != "ok", "error"]):
        log.error("%s: %s (synthetic image skipped)", p, err)
    mask, y, names = task_labels(df, task)
    if [c.lower() for c in names] != [c.lower() for c in class_names]:
        raise DatasetError(f"{source}: synthetic classes {names} do not match the task's classes {class_names}")
    rows = df[mask].assign(y=y, split="train")
    if per_class:
        rng = np.random.default_rng(seed)
        rows = pd.concat([g.iloc[np.sort(rng.permutation(len(g))[:per_class])] for _, g in rows.groupby("y")])
    log.info("data.synthetic: adding %s synthetic images (per class) from %s to the train split",
             np.bincount(rows["y"], minlength=len(class_names)).tolist(), source)
    return rows


def prepare_data(cfg: RunConfig, data_root: str | Path, *, cache_root: Path, progress: bool,
                 dist: ddp.DistInfo, manifest: Manifest | None = None) -> PreparedData:
    """Manifest → task labels → train/val rows → cached uint8 images (test rows are never touched)."""
    if manifest is None:
        manifest = load_manifest(data_root, val_fraction=cfg.data.val_fraction, seed=cfg.seed,
                                 progress=progress and dist.is_main, workers=cfg.data.workers, method=cfg.data.split,
                                 val_source=cfg.data.val_source)
    df = manifest.df.reset_index(drop=True)
    mask, y, class_names = task_labels(df, cfg.task)
    rows = df[mask].assign(y=y)
    train = rows[rows["split"] == "train"]
    val = rows[rows["split"] == "val"]
    if cfg.data.limit_per_class:
        rng = np.random.default_rng(cfg.seed)
        def _limit(part: pd.DataFrame, n: int) -> pd.DataFrame:
            keep = [g.iloc[rng.permutation(len(g))[:n]] for _, g in part.groupby("y")]
            return pd.concat(keep).sort_index()
        train = _limit(train, cfg.data.limit_per_class)
        val = _limit(val, max(4, cfg.data.limit_per_class // 3))
    if cfg.data.synthetic:  # synthetic images join TRAIN only, after the patient split (never val/test)
        train = pd.concat([train, synthetic_rows(cfg.data.synthetic, cfg.task, class_names,
                                                 per_class=cfg.data.synthetic_per_class, seed=cfg.seed,
                                                 progress=progress and dist.is_main, workers=cfg.data.workers)])
    for name, part in (("train", train), ("val", val)):
        counts = np.bincount(part["y"], minlength=len(class_names))
        if (counts == 0).any():
            missing = [c for c, k in zip(class_names, counts) if k == 0]
            raise DatasetError(f"{data_root}: the {name} split has no images of class {', '.join(missing)}")
    spec = PreprocessSpec(**cfg.preprocess.model_dump())
    cache = ImageCache(cache_root, spec)
    needed = pd.concat([train, val])
    if dist.is_main:
        report = cache.update(list(needed["path"]), list(needed["content_hash"]), workers=cfg.data.workers,
                              progress=progress)
        for path, reason in report.failed.items():
            log.error("%s: %s", path, reason)
    ddp.barrier(dist)
    if not dist.is_main:
        cache = ImageCache(cache_root, spec)
    ok_hashes = set(h for h in needed["content_hash"] if h in cache)
    train = train[train["content_hash"].isin(ok_hashes)]
    val = val[val["content_hash"].isin(ok_hashes)]
    return PreparedData(
        manifest=manifest, class_names=class_names, train_rows=train, val_rows=val,
        y_train=train["y"].to_numpy(np.int64), y_val=val["y"].to_numpy(np.int64),
        train_images=cache.get(list(train["content_hash"])), val_images=cache.get(list(val["content_hash"])),
        spec=spec,
    )


# --------------------------------------------------------------------------- environment
def environment_info(device: torch.device, dist: ddp.DistInfo) -> dict:
    import torchvision

    info = {
        "pneumoscope": pneumoscope.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
        "world_size": dist.world_size,
    }
    try:
        import timm
        info["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "fp16":
        return torch.float16
    return torch.bfloat16


# --------------------------------------------------------------------------- fit
@dataclass
class _State:
    phase: int = 0
    epoch_in_phase: int = 0
    global_epoch: int = 0
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    scheduler: dict | None = None

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "_State":
        s = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        if s.best is None:
            s.best = -math.inf
        return s


def _metric_value(name: str, ev: dict) -> float:
    key = {"val_auroc": "auroc", "val_macro_auroc": "auroc", "val_accuracy": "accuracy", "val_loss": "loss"}[name]
    v = ev[key]
    return -v if name == "val_loss" else v


def _attach_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("pneumoscope").addHandler(handler)
    return handler


def val_split_meta(cfg: RunConfig) -> dict:
    """How the run's validation set was made, as ``model.json`` records it (read back by
    :func:`pneumoscope.evaluate.run.split_of`)."""
    if cfg.data.val_source:
        from pneumoscope.data.split import EXTERNAL

        return {"method": EXTERNAL, "val_source": str(Path(cfg.data.val_source).resolve())}
    return {"method": cfg.data.split, "val_fraction": cfg.data.val_fraction}


def checkpoint_meta(model: nn.Module, *, cfg: RunConfig, class_names: list[str], spec: PreprocessSpec,
                    input_size: int, extra: dict | None = None) -> dict:
    """The ``model.json`` of a checkpoint: everything inference needs, no code."""
    from pneumoscope.models.checkpoint_io import model_spec

    return {
        "format": CHECKPOINT_FORMAT, "pneumoscope_version": pneumoscope.__version__,
        "model": model_spec(model), "task": cfg.task, "class_names": class_names,
        "output": "sigmoid" if model.num_classes == 1 else "softmax",
        "preprocess": {**spec.to_dict(), "size": input_size}, "run_name": cfg.name, "seed": cfg.seed,
        "val_split": val_split_meta(cfg),
        "pretrained_source": getattr(model, "pretrained_source", None), **(extra or {}),
    }


def fit(cfg: RunConfig, run_dir: str | Path, *, data_root: str | Path, resume: bool = False,
        cache_root: str | Path | None = None, progress: bool = True, manifest: Manifest | None = None) -> dict:
    """Train ``cfg`` into ``run_dir`` (or continue it with ``resume=True``); returns the summary dict."""
    from pneumoscope.utils.memory import tune_malloc

    tune_malloc()  # heap reuse instead of page faults (PNEUMOSCOPE_MALLOC=default: off), see utils/memory
    run_dir = Path(run_dir)
    dist = ddp.init_distributed()
    lock = RunLock(run_dir).acquire() if dist.is_main else None
    handler = _attach_log(run_dir) if dist.is_main else None
    try:
        return _fit(cfg, run_dir, data_root=data_root, resume=resume,
                    cache_root=Path(cache_root or cfg.data.cache_dir or default_cache_root()),
                    progress=progress and dist.is_main, dist=dist, manifest=manifest)
    finally:
        if handler is not None:
            logging.getLogger("pneumoscope").removeHandler(handler)
            handler.close()
        if lock is not None:
            lock.release()


def _fit(cfg: RunConfig, run_dir: Path, *, data_root, resume: bool, cache_root: Path, progress: bool,
         dist: ddp.DistInfo, manifest: Manifest | None) -> dict:
    from pneumoscope.models import create_model

    ckpt_root = run_dir / "checkpoints"
    last = resolve_checkpoint(ckpt_root, "last") if resume else None
    if resume and last is None:
        log.warning("%s: no checkpoint to resume from; starting from scratch", run_dir)
    if not resume and (ckpt_root / "last.json").exists():
        raise ConfigError(f"{run_dir}: already holds a run; use --resume to continue it or choose a new --out")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = dist.device
    channels_last = cfg.train.channels_last if isinstance(cfg.train.channels_last, bool) else True
    amp = _amp_dtype(cfg.train.amp, device)
    if dist.is_main:
        atomic_write_yaml(run_dir / "config.yaml", config_to_dict(cfg))
        atomic_write_json(run_dir / "env.json", environment_info(device, dist))

    t_start = time.perf_counter()
    data = prepare_data(cfg, data_root, cache_root=cache_root, progress=progress, dist=dist, manifest=manifest)
    if dist.is_main:
        split = pd.concat([data.train_rows.assign(split="train"), data.val_rows.assign(split="val")])
        with atomic_path(run_dir / "split.csv") as tmp:
            split[["path", "split", "label", "subtype", "patient_id", "content_hash", "y"]].to_csv(tmp, index=False)
    log.info("task %s: classes %s; train %s, val %s", cfg.task, data.class_names,
             np.bincount(data.y_train).tolist(), np.bincount(data.y_val).tolist())

    n_classes = len(data.class_names)
    real_data, dummy = data, cfg.train.dummy_class
    if dummy:  # an extra "ambiguous" class trained on mixed-class blends; see pneumoscope.train.dummy
        from dataclasses import replace

        from pneumoscope.train.dummy import with_dummy_examples

        if cfg.train.loss.name == "bce":
            raise ConfigError("train.dummy_class needs a softmax loss (ce or focal), not bce")
        imgs, ys = with_dummy_examples(data.train_images, data.y_train, n_classes, cfg.train.dummy_fraction, cfg.seed)
        data = replace(data, train_images=imgs, y_train=ys)
        log.info("dummy class: %d mixed-class examples added to train as class %d", int((ys == n_classes).sum()),
                 n_classes)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.name, num_classes=num_outputs(cfg.train.loss.name, n_classes) + int(dummy),
                         pretrained=cfg.model.pretrained, in_chans=cfg.model.in_chans, head=cfg.model.head,
                         dropout=cfg.model.dropout, **cfg.model.kwargs)
    if cfg.train.sync_bn and dist.enabled:
        from pneumoscope.models import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)  # timm-aware: keeps BatchNormAct2d's activation
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    preset = EvalPreset.from_card(model.card, channels_last=channels_last)
    augment = TrainPreset(AugmentSpec(**cfg.augment.model_dump()))
    train_images, val_images = on_device(data.train_images, device), on_device(data.val_images, device)

    lw = cfg.train.loss
    if lw.class_weights == "auto":
        weights = class_weights_from_counts(np.bincount(data.y_train, minlength=n_classes + int(dummy)))
    elif isinstance(lw.class_weights, list):
        if len(lw.class_weights) != n_classes:
            raise ConfigError(f"train.loss.class_weights: expected {n_classes} values, got {len(lw.class_weights)}")
        weights = np.asarray(lw.class_weights + [1.0] * int(dummy), dtype=np.float64)
    else:
        weights = None
    criterion = build_loss(lw.name, class_weights=weights, focal_gamma=lw.focal_gamma, focal_alpha=lw.focal_alpha,
                           label_smoothing=lw.label_smoothing).to(device)
    eval_criterion = build_loss(lw.name, class_weights=None).to(device)

    state = _State()
    history: list[dict] = []
    if last is not None:
        model.load_state_dict(load_model_state(last))
        st = load_training_state(last, None)
        state = _State.from_dict(st["fit"])
        history = st.get("history", [])
        log.info("resuming %s at phase %d epoch %d (global epoch %d)", run_dir, state.phase, state.epoch_in_phase,
                 state.global_epoch)

    gather = (lambda t: ddp.all_gather_cat(t, dist)) if dist.enabled else None
    es = cfg.train.early_stopping
    metric_name = es.metric if es else "val_auroc"
    bs = cfg.train.batch_size

    stash: _Stash | None = None  # a frozen prefix's clean output kept for the next phase
    for phase_i in range(state.phase, len(cfg.train.phases)):
        phase = cfg.train.phases[phase_i]
        if phase_i != state.phase:
            state.phase, state.epoch_in_phase, state.bad_epochs, state.scheduler = phase_i, 0, 0, None
        if state.epoch_in_phase >= phase.epochs:
            continue
        model.freeze(phase.freeze, phase.trainable_stages)
        k = model.frozen_prefix()
        size = phase.size or cfg.preprocess.size
        if size > cfg.preprocess.size:
            raise ConfigError(f"train.phases.{phase_i}.size: {size} is larger than preprocess.size "
                              f"{cfg.preprocess.size} (the cache resolution)")
        use_features = phase.feature_cache and k > 0
        if use_features:
            fsz = None if size == cfg.preprocess.size else size
            log.info("phase %s: caching the frozen prefix (stages 0..%d) for %d view(s)", phase.name, k - 1,
                     phase.feature_views)
            t0 = time.perf_counter()
            nxt = cfg.train.phases[phase_i + 1] if phase_i + 1 < len(cfg.train.phases) else None
            reuse = stash if stash is not None and (stash.stage_index, stash.size) == (k, size) else None
            keep = _next_prefix(model, nxt, size, cfg.preprocess.size)
            # one hand-over at a time: a phase whose view 0 is reused computes no view 0 to keep
            keep = keep if keep is not None and 0 < keep < k and reuse is None else None
            if reuse is not None:
                log.info("phase %s: view 0 of stages 0..%d reused from phase %s's pass", phase.name, k - 1,
                         reuse.phase)
            common = dict(preset=preset, seed=cfg.seed, size=fsz, device=device, progress=progress, keep_at=keep)
            if dist.enabled:  # each rank runs its share of the batches; the rest arrives by all-reduce
                common.update(shard=(dist.rank, dist.world_size),
                              combine=lambda t: ddp.all_reduce_disjoint(t, dist))
                log.info("phase %s: feature pass sharded over %d ranks", phase.name, dist.world_size)
            train_feats = extract_features(
                model, k, train_images, augment=augment if augment.spec.enabled else None,
                views=phase.feature_views if augment.spec.enabled else 1, desc=f"features {phase.name}",
                view0=reuse.train if reuse else None, **common)
            val_feats = extract_features(model, k, val_images, augment=None, views=1, desc="features val",
                                         view0=reuse.val if reuse else None, **common)
            release_memory()  # the pass's activations, before the epochs' differently shaped ones
            stash = None
            if keep is not None:  # (features, kept view 0 of stages[:keep])
                (train_feats, kept_train), (val_feats, kept_val) = train_feats, val_feats
                stash = _Stash(phase=phase.name, stage_index=keep, size=size, train=kept_train, val=kept_val)
            train_src = FeatureSource(on_device(train_feats, device, "feature cache"), data.y_train, k)
            val_src = FeatureSource(on_device(val_feats, device, "feature cache"), data.y_val, k)
            log.info("phase %s: feature cache %s in %.1f s", phase.name, tuple(train_src.views.shape),
                     time.perf_counter() - t0)
            loop_augment, loop_size = None, None
        else:
            train_src = ImageSource(train_images, data.y_train)
            val_src = ImageSource(val_images, data.y_val)
            loop_augment = augment if augment.spec.enabled else None
            loop_size = None if size == cfg.preprocess.size else size

        trainable: nn.Module = _FromStage(model, k) if (use_features and (dist.enabled or cfg.train.compile)) else model
        if dist.enabled:
            trainable = nn.parallel.DistributedDataParallel(
                trainable, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=False)
        if cfg.train.compile:
            trainable = torch.compile(trainable)
        optimizer = build_optimizer(model.parameters(), cfg.train.optimizer, phase.lr, cfg.train.weight_decay,
                                    cfg.train.momentum)
        # fp16 autocast needs loss scaling (bf16 does not); the scale re-learns itself after a resume
        scaler = torch.amp.GradScaler(device.type) if amp is torch.float16 else None
        sampler = EpochSampler(data.y_train, seed=cfg.seed, balanced=cfg.train.balanced_sampler,
                               rank=dist.rank, world_size=dist.world_size)
        steps_per_epoch = math.ceil(len(sampler) / bs / cfg.train.grad_accum)
        sc = cfg.train.schedule
        scheduler = build_scheduler(optimizer, sc.name, lr=phase.lr, steps_per_epoch=steps_per_epoch,
                                    epochs=phase.epochs, warmup_epochs=sc.warmup_epochs, min_lr_ratio=sc.min_lr_ratio,
                                    plateau_factor=sc.plateau_factor, plateau_patience=sc.plateau_patience)
        if last is not None and state.epoch_in_phase > 0:
            load_training_state(last, optimizer)
            if scheduler is not None and state.scheduler is not None:
                scheduler.load_state_dict(state.scheduler)
        last = None  # only the first resumed phase restores optimiser state

        stopped = False
        for epoch in range(state.epoch_in_phase, phase.epochs):
            ge = state.global_epoch
            sampler.set_epoch(ge)
            torch.manual_seed(epoch_seed(cfg.seed, ge, 2))
            order = np.fromiter(iter(sampler), dtype=np.int64)
            view_rng = np.random.default_rng(epoch_seed(cfg.seed, ge, 3))
            step_model = trainable if (not use_features or dist.enabled or cfg.train.compile) else model
            tr = train_one_epoch(step_model, train_src, order=order,
                                 criterion=criterion, optimizer=optimizer, scheduler=scheduler, preset=preset,
                                 augment=loop_augment, batch_size=bs, grad_accum=cfg.train.grad_accum,
                                 size=loop_size, view_rng=view_rng, device=device, channels_last=channels_last,
                                 amp_dtype=amp, progress=progress, desc=f"{phase.name} {epoch + 1}/{phase.epochs}",
                                 scaler=scaler)
            if dist.enabled:  # every rank trains on as many samples: the mean of the rank means is the epoch mean
                tr["loss"], tr["accuracy"] = ddp.all_reduce_mean([tr["loss"], tr["accuracy"]], dist)
                tr["images_per_s"] *= dist.world_size
            ev_idx = np.arange(dist.rank, len(val_src), dist.world_size) if dist.enabled else None
            ev = evaluate(RealClasses(model, n_classes) if dummy else model, val_src,  # real classes only
                          criterion=eval_criterion, preset=preset, size=loop_size, device=device,
                          channels_last=channels_last, gather=gather, indices=ev_idx)
            value = _metric_value(metric_name, ev)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(value)
            improved = value > state.best + (es.min_delta if es else 0.0)
            row = {"epoch": ge + 1, "phase": phase.name, "lr": optimizer.param_groups[0]["lr"],
                   "train_loss": tr["loss"], "train_accuracy": tr["accuracy"], "val_loss": ev["loss"],
                   "val_accuracy": ev["accuracy"], "val_auroc": ev["auroc"], "images_per_s": tr["images_per_s"],
                   "epoch_seconds": tr["seconds"], "elapsed_seconds": time.perf_counter() - t_start,
                   "trainable_stages": model.num_stages - k, "feature_cache": use_features}
            history.append(row)
            release_memory()
            log.info("epoch %d (%s %d/%d): train loss %.4f acc %.3f | val loss %.4f acc %.3f AUROC %.4f | %.1f img/s",
                     ge + 1, phase.name, epoch + 1, phase.epochs, tr["loss"], tr["accuracy"], ev["loss"],
                     ev["accuracy"], ev["auroc"], tr["images_per_s"])
            state.global_epoch += 1
            state.epoch_in_phase = epoch + 1
            if improved:
                state.best, state.best_epoch, state.bad_epochs = value, ge + 1, 0
            else:
                state.bad_epochs += 1
            if es is not None and state.bad_epochs >= es.patience:
                stopped = True
            if stopped:
                state.epoch_in_phase = phase.epochs  # the phase is over
            state.scheduler = _scheduler_state(scheduler)
            if dist.is_main:
                if improved:
                    best_model = drop_dummy_output(model, n_classes) if dummy else model
                    save_checkpoint(ckpt_root, "best", model=best_model, keep=1, meta=checkpoint_meta(
                        best_model, cfg=cfg, class_names=data.class_names, spec=data.spec, input_size=size,
                        extra={"epoch": ge + 1, "val_metrics": _clean(ev)}))
                save_checkpoint(ckpt_root, "last", model=model, optimizer=optimizer, keep=cfg.train.keep_checkpoints,
                                state={"fit": state.to_dict(), "history": history},
                                meta=checkpoint_meta(model, cfg=cfg, class_names=data.class_names, spec=data.spec,
                                                     input_size=size, extra={"epoch": ge + 1}))
                _write_history(run_dir, history)
            ddp.barrier(dist)
            if stopped:
                log.info("early stopping in phase %s after epoch %d (%s did not improve for %d epochs)",
                         phase.name, ge + 1, metric_name, state.bad_epochs)
                break
        del train_src, val_src

    summary = {}
    if dist.is_main:
        summary = finalize(cfg, run_dir, data=real_data, device=device, channels_last=channels_last)
        summary["train_seconds"] = time.perf_counter() - t_start
        atomic_write_json(run_dir / "summary.json", summary)
    ddp.barrier(dist)
    return summary


@dataclass
class _Stash:
    """View 0 (clean images) of ``stages[:stage_index]``, computed on the way through a longer
    frozen prefix, for the next phase's feature cache."""

    phase: str
    stage_index: int
    size: int
    train: torch.Tensor
    val: torch.Tensor


def _next_prefix(model: nn.Module, nxt, size: int, cache_size: int) -> int | None:  # noqa: ANN001
    """The frozen prefix the next phase will cache, if it caches features at the same resolution."""
    if nxt is None or not nxt.feature_cache or (nxt.size or cache_size) != size:
        return None
    k = model.frozen_stages_for(nxt.freeze, nxt.trainable_stages)
    while k < model.num_stages and not any(True for _ in model.stages[k].parameters()):
        k += 1  # a parameter-free stage (pooling) after the frozen ones is frozen too
    return k


def _scheduler_state(scheduler) -> dict | None:
    if scheduler is None:
        return None
    from pneumoscope.utils.io import _jsonable

    return _jsonable({k: v for k, v in scheduler.state_dict().items() if not callable(v)})


def _clean(ev: dict) -> dict:
    return {k: v for k, v in ev.items() if k not in ("logits", "labels")}


def _write_history(run_dir: Path, history: list[dict]) -> None:
    df = pd.DataFrame(history)
    atomic_write_text(run_dir / "metrics.csv", df.to_csv(index=False))
    try:
        from pneumoscope.evaluate.plots import plot_training_curves

        plot_training_curves(df, run_dir / "curves.png")
    except Exception as err:  # a plotting problem must never kill a training run
        log.warning("could not draw training curves: %s", err)


def finalize(cfg: RunConfig, run_dir: Path, *, data: PreparedData, device: torch.device,
             channels_last: bool) -> dict:
    """Reload the best weights; fit the operating threshold and temperature on validation; save them."""
    from pneumoscope.evaluate.calibration import TemperatureScaler
    from pneumoscope.evaluate.metrics import binary_metrics, multiclass_metrics
    from pneumoscope.evaluate.threshold import ThresholdSelector
    from pneumoscope.models.checkpoint_io import build_from_spec
    from pneumoscope.train.checkpoint import load_meta

    ckpt_root = run_dir / "checkpoints"
    best = resolve_checkpoint(ckpt_root, "best")
    if best is None:
        raise DatasetError(f"{run_dir}: training produced no checkpoint (zero epochs?)")
    meta = load_meta(best)
    model = build_from_spec(meta["model"])
    model.load_state_dict(load_model_state(best))
    model.to(device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    preset = EvalPreset.from_card(model.card, channels_last=channels_last)
    size = meta["preprocess"]["size"]
    logits = predict_logits(model, ImageSource(data.val_images, data.y_val), preset=preset,
                            size=None if size == data.spec.size else size, device=device,
                            channels_last=channels_last)
    # Probabilities everywhere downstream are temperature-calibrated (Guo et al. 2017), and the
    # threshold is chosen on those calibrated validation probabilities, so decision and
    # probability always agree.
    scaler = TemperatureScaler().fit(logits.numpy() if logits.shape[1] > 1 else logits[:, 0].numpy(), data.y_val)
    meta["temperature"] = float(scaler.temperature_)
    from pneumoscope.train.losses import logits_to_probs

    probs = logits_to_probs(logits / meta["temperature"]).numpy()
    if probs.shape[1] == 2:
        ev = cfg.eval
        sel = ThresholdSelector(rule=ev.threshold_rule, target=ev.threshold_target).fit(data.y_val, probs[:, 1])
        meta["threshold"] = sel.to_dict()
        val_metrics = binary_metrics(data.y_val, probs[:, 1], threshold=float(sel.threshold_))
    else:
        meta["threshold"] = None
        val_metrics = multiclass_metrics(data.y_val, probs, data.class_names)
    meta["val_metrics"] = val_metrics
    meta["val_counts"] = np.bincount(data.y_val, minlength=len(data.class_names)).tolist()
    meta["train_counts"] = np.bincount(data.y_train, minlength=len(data.class_names)).tolist()
    # rewrite the best checkpoint with the fitted operating point (same weights)
    save_checkpoint(ckpt_root, "best", model=model.to(memory_format=torch.contiguous_format), meta=meta, keep=1)
    log.info("best epoch %s: val %s; threshold %s", meta.get("epoch"), {k: val_metrics.get(k) for k in
             ("auroc", "accuracy", "sensitivity", "specificity", "macro_auroc") if k in val_metrics},
             meta["threshold"] and round(meta["threshold"].get("threshold", float("nan")), 4))
    return {"run_dir": str(run_dir), "best_epoch": meta.get("epoch"), "val_metrics": val_metrics,
            "threshold": meta["threshold"], "temperature": meta["temperature"], "class_names": data.class_names}


def train_from_files(config: str, overrides: list[str], out: str | Path | None, data_root: str | Path,
                     resume: str | Path | None = None, progress: bool = True) -> dict:
    """CLI glue: resolve the config (or the run's own config when resuming) and call :func:`fit`."""
    if resume:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
        cfg = load_config(run_dir / "config.yaml", overrides)
        return fit(cfg, run_dir, data_root=data_root, resume=True, progress=progress)
    cfg = load_config(config, overrides)
    run_dir = Path(out) if out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return fit(cfg, run_dir, data_root=data_root, resume=False, progress=progress)
