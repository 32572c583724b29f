"""``pneumoscope gan train``: train the ACGAN on the patient-grouped train split, resumably.

The GAN directory::

    config.json          GanConfig + dataset + class names (what ``sample``/``evaluate`` rebuild from)
    split.csv            the images used: train (fitted on) and val (held out), patient-grouped
    history.csv          one row per epoch: losses, D(x), D(G(z)), class-head accuracy on train and val
    train.log            the log
    samples/epoch_NNN.png  fixed-noise grid after every epoch, one row per class
    checkpoints/last*    generator + discriminator weights, both optimisers, RNG state, epoch

Data: the same scan and patient split (``val_fraction``, ``seed``) as ``pneumoscope train``, task
``three_class`` (normal / bacterial / viral from the file names); only the ``train`` rows are
fitted on, the ``val`` rows are used to watch the discriminator's class head, the official test
split is never read. Images come from the shared uint8 cache at ``size`` px (squash resize), scaled
to [-1, 1]. No augmentation (flips would move the heart).

Losses (standard ACGAN, Odena et al. 2017): the discriminator minimises
``hinge(real, fake) + CE(class | real) + d_fake_class_weight · CE(class | fake)`` (``loss: bce`` gives
the original ACGAN), the generator ``-D(G(z)) + CE(class | fake) + mode_seeking / ratio`` where ratio
is MSGAN's |G(z1,y)-G(z2,y)| / |z1-z2| (Mao et al. 2019; without it the generator collapsed to one
image per class, see docs/gan.md); fake classes are drawn uniformly. Adam with TTUR (D 4e-4,
G 1e-4, β=(0, 0.9)).

Determinism and resuming: weights are initialised from ``seed``; epoch ``e`` draws its data order
and all of its noise and fake labels from generators seeded by ``(seed, e)``, so a run resumed
from the checkpoint written after epoch ``e`` computes exactly what the uninterrupted run computes
(tested). A checkpoint is written atomically after every epoch (directory + checksummed pointer,
see :mod:`pneumoscope.train.checkpoint`); a killed run loses at most the epoch in progress.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pneumoscope.data.loader import epoch_seed
from pneumoscope.errors import ConfigError, DatasetError, ModelError
from pneumoscope.gan.acgan import ACGAN, from_uint8, to_uint8
from pneumoscope.utils.io import RunLock, atomic_path, atomic_write_json, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

GAN_FORMAT = "pneumoscope-acgan/1"
TASK = "three_class"


class GanConfig(BaseModel):
    """Hyper-parameters of one ACGAN run (validated like the run config: unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(64, ge=16, le=256, description="image size (power of two)")
    epochs: int = Field(20, ge=0, le=10000)
    batch_size: int = Field(64, ge=2, le=4096)
    z_dim: int = Field(100, ge=1, le=1024)
    width: int = Field(32, ge=4, le=512, description="base channel width (ngf = ndf)")
    lr_g: float = Field(1e-4, gt=0, le=1)
    lr_d: float = Field(4e-4, gt=0, le=1)
    beta1: float = Field(0.0, ge=0, lt=1)
    beta2: float = Field(0.9, ge=0, lt=1)
    d_fake_class_weight: float = Field(1.0, ge=0, description="weight of the class loss on fakes in D's loss")
    loss: Literal["bce", "hinge"] = Field("hinge", description="adversarial loss")
    minibatch_std: bool = Field(True, description="minibatch-std input to the real/fake head (against mode collapse)")
    mode_seeking: float = Field(1.0, ge=0, description="weight of the mode-seeking term (Mao et al. 2019)")
    seed: int = 0
    val_fraction: float = Field(0.15, gt=0, lt=0.9)
    limit_per_class: int | None = Field(None, ge=1, description="at most N train images per class (tests)")
    grid_per_class: int = Field(8, ge=1, le=64, description="columns of the per-epoch sample grid")
    threads: int | None = Field(None, ge=1, le=512)


def _validated(cfg: GanConfig | dict) -> GanConfig:
    if isinstance(cfg, GanConfig):
        return cfg
    try:
        return GanConfig.model_validate(cfg)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(f"gan config: {loc}: {msg}") from None


# --------------------------------------------------------------------------- data
def gan_split(data_root: str | Path, *, val_fraction: float, seed: int, progress: bool = True,
              limit_per_class: int | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Train and val rows (three-class labels in ``y``) of the patient-grouped split; test rows dropped.

    The same function of (dataset, val_fraction, seed) as the classifier trainer's split, so a
    classifier and a GAN trained with the same seed hold out the same validation patients.
    """
    from pneumoscope.data.tasks import task_labels
    from pneumoscope.train.fit import load_manifest

    manifest = load_manifest(data_root, val_fraction=val_fraction, seed=seed, progress=progress)
    df = manifest.df.reset_index(drop=True)
    mask, y, names = task_labels(df, TASK)
    rows = df[mask].assign(y=y)
    rows = rows[rows["split"].isin(["train", "val"])]
    if limit_per_class:
        rng = np.random.default_rng(seed)
        parts = []
        for split in ("train", "val"):
            n = limit_per_class if split == "train" else max(2, limit_per_class // 3)
            for _, g in rows[rows["split"] == split].groupby("y"):
                parts.append(g.iloc[np.sort(rng.permutation(len(g))[:n])])
        rows = pd.concat(parts).sort_index()
    for split in ("train", "val"):
        counts = np.bincount(rows.loc[rows["split"] == split, "y"], minlength=len(names))
        if (counts == 0).any():
            missing = [c for c, k in zip(names, counts) if k == 0]
            raise DatasetError(f"{data_root}: the {split} split has no {', '.join(missing)} images; "
                               "the ACGAN needs normal, bacterial and viral images (from the file names)")
    return rows.reset_index(drop=True), names


def cached_images(rows: pd.DataFrame, size: int, cache_root: Path, progress: bool = True,
                  workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, size, size), keep mask) from the shared preprocessed-image cache (squash resize)."""
    from pneumoscope.data.cache import ImageCache
    from pneumoscope.data.preprocess import PreprocessSpec

    cache = ImageCache(cache_root, PreprocessSpec(size=size))
    report = cache.update(list(rows["path"]), list(rows["content_hash"]), workers=workers, progress=progress)
    for path, reason in report.failed.items():
        log.error("%s: %s", path, reason)
    keep = rows["content_hash"].isin([h for h in rows["content_hash"] if h in cache]).to_numpy()
    return cache.get(list(rows.loc[keep, "content_hash"])), keep


# --------------------------------------------------------------------------- checkpoints
def _flatten_opt(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    from pneumoscope.train.checkpoint import _flatten_optimizer

    return _flatten_optimizer(opt.state_dict())


def save_gan_checkpoint(root: Path, *, gan: ACGAN, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                        meta: dict, state: dict, keep: int = 2) -> Path:
    """Write ``root/last-<serial>/`` (weights, both optimisers, RNG) then point ``root/last.json`` at it.

    Same protocol as :func:`pneumoscope.train.checkpoint.save_checkpoint`: a new directory per
    save, fsynced files, then an atomic pointer carrying each file's SHA-256; a kill at any moment
    leaves the previous checkpoint in force.
    """
    from pneumoscope.train.checkpoint import _prune

    root.mkdir(parents=True, exist_ok=True)
    pointer = root / "last.json"
    serial = json.loads(pointer.read_text())["serial"] + 1 if pointer.exists() else 0
    d = root / f"last-{serial:06d}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()

    def write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        with atomic_path(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))

    write(d / "model.safetensors", gan.state_dict())
    tg, mg = _flatten_opt(opt_g)
    td, md = _flatten_opt(opt_d)
    write(d / "optim_g.safetensors", tg)
    write(d / "optim_d.safetensors", td)
    write(d / "rng.safetensors", {"torch": torch.get_rng_state()})
    atomic_write_json(d / "model.json", meta)
    atomic_write_json(d / "state.json", {**state, "optimizer_g": mg, "optimizer_d": md})
    files = {p.name: sha256_file(p) for p in sorted(d.iterdir())}
    atomic_write_json(pointer, {"serial": serial, "dir": d.name, "files": files})
    _prune(root, "last", keep)
    return d


def load_gan(gan_dir: str | Path) -> tuple[ACGAN, dict, Path]:
    """The trained ACGAN of a GAN directory (latest checkpoint, checksums verified), its meta and checkpoint dir."""
    from pneumoscope.train.checkpoint import resolve_checkpoint

    gan_dir = Path(gan_dir)
    ckpt = resolve_checkpoint(gan_dir / "checkpoints", "last") if (gan_dir / "checkpoints").is_dir() else None
    if ckpt is None:
        raise ModelError(f"{gan_dir}: not a GAN directory (no checkpoints/last.json); run `pneumoscope gan train`")
    meta = json.loads((ckpt / "model.json").read_text())
    if meta.get("format") != GAN_FORMAT:
        raise ModelError(f"{ckpt / 'model.json'}: not an ACGAN checkpoint (format {meta.get('format')!r})")
    gan = ACGAN(**meta["model"])
    try:
        gan.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    except Exception as err:  # safetensors/shape errors → one line
        raise ModelError(f"{ckpt / 'model.safetensors'}: cannot load ACGAN weights ({err})") from None
    return gan.eval(), meta, ckpt


# --------------------------------------------------------------------------- pictures
def sample_grid(gan: ACGAN, class_names: list[str], per_class: int, seed: int) -> np.ndarray:
    """(rows=classes, cols=per_class) uint8 mosaic from fixed noise (seeded by ``seed`` only)."""
    g = torch.Generator().manual_seed(epoch_seed(seed, 0, 99))
    z = torch.randn(per_class, gan.z_dim, generator=g)
    was = gan.generator.training
    gan.generator.eval()
    rows = []
    with torch.no_grad():
        for k in range(len(class_names)):
            imgs = to_uint8(gan.generator(z, torch.full((per_class,), k, dtype=torch.long)))[:, 0].numpy()
            rows.append(np.concatenate(list(imgs), axis=1))
    gan.generator.train(was)
    return np.concatenate(rows, axis=0)


def write_grid_png(mosaic: np.ndarray, class_names: list[str], path: Path, title: str = "") -> Path:
    """Save a mosaic with the class name left of each row (PIL, atomic)."""
    from PIL import Image, ImageDraw

    n_rows = len(class_names)
    tile = mosaic.shape[0] // n_rows
    scale = max(1, 64 // tile)
    big = np.kron(mosaic, np.ones((scale, scale), np.uint8)) if scale > 1 else mosaic
    margin, top = 72, 16 if title else 0
    canvas = Image.new("L", (big.shape[1] + margin, big.shape[0] + top), 255)
    canvas.paste(Image.fromarray(big), (margin, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=0)
    for i, name in enumerate(class_names):
        draw.text((4, top + i * tile * scale + tile * scale // 2 - 5), name, fill=0)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


# --------------------------------------------------------------------------- training
@torch.no_grad()
def discriminator_logits(gan: ACGAN, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The discriminator's class logits (N, n_classes) for uint8 images at the GAN size."""
    was = gan.discriminator.training
    gan.discriminator.eval()
    out = [gan.discriminator(from_uint8(torch.from_numpy(np.asarray(images[i : i + batch_size])))[:, None])[1]
           for i in range(0, len(images), batch_size)]
    gan.discriminator.train(was)
    return torch.cat(out).numpy() if out else np.zeros((0, gan.n_classes), np.float32)


def _pixel_std(x: torch.Tensor) -> float:
    return float(x.float().std(0).mean()) if len(x) > 1 else 0.0


@torch.no_grad()
def sample_diversity(gan: ACGAN, n_classes: int, seed: int, n: int = 64) -> float:
    """Mean per-pixel standard deviation (in [-1, 1] units) across ``n`` fixed-noise samples of each class.

    A cheap mode-collapse alarm logged every epoch beside the same number for real train images:
    a generator that ignores its noise produces near-identical images per class and a value near 0.
    """
    g = torch.Generator().manual_seed(epoch_seed(seed, 0, 98))
    z = torch.randn(n, gan.z_dim, generator=g)
    was = gan.generator.training
    gan.generator.eval()
    out = float(np.mean([_pixel_std(gan.generator(z, torch.full((n,), k, dtype=torch.long))) for k in range(n_classes)]))
    gan.generator.train(was)
    return out


def _class_summary(y: np.ndarray, logits: np.ndarray) -> dict:
    from pneumoscope.train.engine import classification_summary

    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    return classification_summary(y, probs)


def train_gan(data_root: str | Path | None, out: str | Path, *, config: GanConfig | dict | None = None,
              resume: bool = False, cache_root: str | Path | None = None, progress: bool = True) -> dict:
    """Train (or, with ``resume``, continue) an ACGAN into ``out``; returns the last epoch's history row."""
    from pneumoscope.data.cache import default_cache_root

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        handler = logging.FileHandler(out / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("pneumoscope").addHandler(handler)
        try:
            return _train(Path(data_root) if data_root else None, out, config, resume, Path(cache_root) if cache_root else default_cache_root(),
                          progress)
        finally:
            logging.getLogger("pneumoscope").removeHandler(handler)
            handler.close()


def _train(data_root: Path | None, out: Path, config, resume: bool, cache_root: Path, progress: bool) -> dict:
    from pneumoscope.train.checkpoint import _unflatten_optimizer, resolve_checkpoint

    ckpt_root = out / "checkpoints"
    last = resolve_checkpoint(ckpt_root, "last") if (ckpt_root / "last.json").exists() else None
    if last is not None and not resume:
        raise ConfigError(f"{out}: already holds a GAN run; pass --resume to continue it or choose a new --out")
    if resume and last is not None:
        saved = json.loads((out / "config.json").read_text())
        cfg = _validated({**saved["config"], **({} if config is None else
                                                  _validated(config).model_dump(exclude_unset=True))})
        data_root = data_root or Path(saved["data"])
    else:
        if resume:
            log.warning("%s: no checkpoint to resume from; starting from scratch", out)
        cfg = _validated(config or {})
    if data_root is None:
        raise DatasetError("no dataset given: pass --data (the dataset folder or CSV)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)

    rows, names = gan_split(data_root, val_fraction=cfg.val_fraction, seed=cfg.seed, progress=progress,
                            limit_per_class=cfg.limit_per_class)
    images, keep = cached_images(rows, cfg.size, cache_root, progress=progress)
    rows = rows[keep].reset_index(drop=True)
    is_train = (rows["split"] == "train").to_numpy()
    train_u8, y_train = images[is_train], rows.loc[is_train, "y"].to_numpy(np.int64)
    val_u8, y_val = images[~is_train], rows.loc[~is_train, "y"].to_numpy(np.int64)
    with atomic_path(out / "split.csv") as tmp:
        rows[["path", "split", "label", "subtype", "patient_id", "content_hash", "y"]].to_csv(tmp, index=False)
    atomic_write_json(out / "config.json", {"format": GAN_FORMAT, "config": cfg.model_dump(), "data": str(data_root),
                                            "task": TASK, "class_names": names,
                                            "train_counts": np.bincount(y_train, minlength=3).tolist(),
                                            "val_counts": np.bincount(y_val, minlength=3).tolist()})
    log.info("ACGAN %d px on %s: train %s, val %s (%s)", cfg.size, data_root, np.bincount(y_train).tolist(),
             np.bincount(y_val).tolist(), ", ".join(names))

    torch.manual_seed(cfg.seed)
    gan = ACGAN(size=cfg.size, n_classes=len(names), z_dim=cfg.z_dim, width=cfg.width,
                minibatch_std=cfg.minibatch_std)
    opt_g = torch.optim.Adam(gan.generator.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
    start_epoch, history = 0, []
    if resume and last is not None:
        gan.load_state_dict(load_file(str(last / "model.safetensors")))
        st = json.loads((last / "state.json").read_text())
        opt_g.load_state_dict(_unflatten_optimizer(load_file(str(last / "optim_g.safetensors")), st["optimizer_g"]))
        opt_d.load_state_dict(_unflatten_optimizer(load_file(str(last / "optim_d.safetensors")), st["optimizer_d"]))
        torch.set_rng_state(load_file(str(last / "rng.safetensors"))["torch"])
        start_epoch, history = int(st["epoch"]), list(st.get("history", []))
        log.info("resuming %s after epoch %d", out, start_epoch)
    meta = {"format": GAN_FORMAT, "model": gan.spec(), "class_names": names, "task": TASK,
            "preprocess": {"size": cfg.size, "resize": "squash"}, "seed": cfg.seed, "config": cfg.model_dump()}

    diversity_real = float(np.mean([_pixel_std(from_uint8(torch.from_numpy(train_u8[y_train == k][:64])))
                                    for k in range(len(names))]))
    n = len(y_train)
    bs = min(cfg.batch_size, n)
    steps = n // bs  # drop_last: BatchNorm on a batch of one is undefined
    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        row = _train_epoch(gan, opt_g, opt_d, train_u8, y_train, cfg=cfg, epoch=epoch, steps=steps, bs=bs,
                           progress=progress)
        val = _class_summary(y_val, discriminator_logits(gan, val_u8))
        row.update({"epoch": epoch + 1, "val_class_accuracy": val["accuracy"], "val_class_macro_auroc": val["auroc"],
                    "diversity_fake": sample_diversity(gan, len(names), cfg.seed), "diversity_real": diversity_real,
                    "elapsed_seconds": time.perf_counter() - t0})
        history.append(row)
        log.info("epoch %d/%d: loss D %.3f G %.3f | D(x) %.3f D(G(z)) %.3f | class acc train %.3f val %.3f "
                 "(macro AUROC %.3f) | diversity fake %.3f real %.3f | %.1f img/s", epoch + 1, cfg.epochs,
                 row["loss_d"], row["loss_g"], row["d_real"], row["d_fake"], row["train_class_accuracy"],
                 row["val_class_accuracy"], row["val_class_macro_auroc"], row["diversity_fake"], row["diversity_real"],
                 row["images_per_s"])
        write_grid_png(sample_grid(gan, names, cfg.grid_per_class, cfg.seed), names,
                       out / "samples" / f"epoch_{epoch + 1:03d}.png", title=f"epoch {epoch + 1}")
        save_gan_checkpoint(ckpt_root, gan=gan, opt_g=opt_g, opt_d=opt_d, meta={**meta, "epoch": epoch + 1},
                            state={"epoch": epoch + 1, "history": history})
        atomic_write_text(out / "history.csv", pd.DataFrame(history).to_csv(index=False))
    if last is None and cfg.epochs == 0:
        save_gan_checkpoint(ckpt_root, gan=gan, opt_g=opt_g, opt_d=opt_d, meta={**meta, "epoch": 0},
                            state={"epoch": 0, "history": []})
    return history[-1] if history else {}


def _train_epoch(gan: ACGAN, opt_g, opt_d, images: np.ndarray, labels: np.ndarray, *, cfg: GanConfig, epoch: int,
                 steps: int, bs: int, progress: bool) -> dict:
    """One pass; everything random in it comes from generators seeded by (seed, epoch)."""
    order = np.random.default_rng(epoch_seed(cfg.seed, epoch, 1)).permutation(len(labels))
    noise = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, 21))
    gan.train()
    G, D = gan.generator, gan.discriminator
    k = gan.n_classes
    sums = {"loss_d": 0.0, "loss_g": 0.0, "d_real": 0.0, "d_fake": 0.0, "train_class_accuracy": 0.0}
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=f"gan epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress,
               leave=False)
    for step in bar:
        idx = order[step * bs : (step + 1) * bs]
        real = from_uint8(torch.from_numpy(np.asarray(images[idx])))[:, None]
        y_real = torch.from_numpy(labels[idx])
        z = torch.randn(bs, gan.z_dim, generator=noise)
        y_fake = torch.randint(0, k, (bs,), generator=noise)
        if cfg.mode_seeking > 0:  # pairs (i, i + bs/2) share a class so their difference is the noise's doing
            half = bs // 2
            y_fake[half : 2 * half] = y_fake[:half]
        fake = G(z, y_fake)

        adv_r, cls_r = D(real)
        adv_f, cls_f = D(fake.detach())
        if cfg.loss == "hinge":
            adv_d = F.relu(1 - adv_r).mean() + F.relu(1 + adv_f).mean()
        else:
            adv_d = (F.binary_cross_entropy_with_logits(adv_r, torch.ones_like(adv_r))
                     + F.binary_cross_entropy_with_logits(adv_f, torch.zeros_like(adv_f)))
        loss_d = adv_d + F.cross_entropy(cls_r, y_real) + cfg.d_fake_class_weight * F.cross_entropy(cls_f, y_fake)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        adv_g, cls_g = D(fake)
        adv_g_loss = (-adv_g.mean() if cfg.loss == "hinge"
                      else F.binary_cross_entropy_with_logits(adv_g, torch.ones_like(adv_g)))
        loss_g = adv_g_loss + F.cross_entropy(cls_g, y_fake)
        if cfg.mode_seeking > 0:
            # Mode seeking (MSGAN): maximise |G(z1,y) - G(z2,y)| / |z1 - z2|, i.e. minimise its inverse.
            half = bs // 2
            ratio = ((fake[:half] - fake[half : 2 * half]).abs().mean()
                     / (z[:half] - z[half : 2 * half]).abs().mean())
            loss_g = loss_g + cfg.mode_seeking / (ratio + 1e-5)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

        sums["loss_d"] += float(loss_d.detach())
        sums["loss_g"] += float(loss_g.detach())
        sums["d_real"] += float(torch.sigmoid(adv_r.detach()).mean())
        sums["d_fake"] += float(torch.sigmoid(adv_f.detach()).mean())
        sums["train_class_accuracy"] += float((cls_r.argmax(1) == y_real).float().mean())
        bar.set_postfix(d=f"{float(loss_d.detach()):.3f}", g=f"{float(loss_g.detach()):.3f}")
    dt = time.perf_counter() - t0
    row = {k_: (v / steps if steps else math.nan) for k_, v in sums.items()}
    row.update({"steps": steps, "seconds": dt, "images_per_s": steps * bs / dt if dt > 0 else math.nan})
    return row
