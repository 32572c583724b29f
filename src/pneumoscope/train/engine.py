"""The training engine: ``train_one_epoch``, ``evaluate`` and ``fit``, in the torchvision shape.

What makes it fast on a CPU without hurting accuracy (measured in ``benchmarks/``):

* **The frozen prefix is computed once.** When a phase freezes the first ``k`` stages of a
  pretrained network, their output does not change during the phase. :func:`extract_features`
  runs them once per image for a few augmented *views* (view 0 un-augmented) and training
  samples one view per image per epoch, so each step runs only the trainable tail.
  This turns a full fine-tune (~15 img/s on 2 cores for EfficientNet-Lite0 at 224 px) into
  a tail fine-tune at ~100 img/s after a one-off feature pass.
* **Images are decoded once** (``pneumoscope.data.cache``) and augmented as uint8 tensors.
* ``channels_last`` memory format (a 5× faster depthwise convolution path on CPU here).

Determinism: model init is seeded by ``seed``; the sampler and the augmentation/dropout RNG of
epoch ``e`` are seeded by ``(seed, e)`` at the start of the epoch, so a run resumed from the
checkpoint written at the end of epoch ``e`` replays epochs ``e+1...`` exactly as an uninterrupted
run would (``deterministic: true`` also asks PyTorch for deterministic kernels).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from pneumoscope.data.loader import epoch_seed
from pneumoscope.data.presets import EvalPreset, TrainPreset
from pneumoscope.train.losses import logits_to_probs
from pneumoscope.utils.faults import fault_point

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- batch sources
@dataclass
class ImageSource:
    """Preprocessed uint8 images (N, S, S) in memory, memory-mapped or on the device, with labels."""

    images: np.ndarray | torch.Tensor
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def on_device(x: np.ndarray | torch.Tensor, device: torch.device,
              what: str = "image cache") -> np.ndarray | torch.Tensor:
    """A training cache (uint8 images, or fp16 prefix features) where its batches will be made.

    On a GPU the whole cache is copied to device memory once (4,470 images at 224 px: 224 MB; the
    `default` recipe's 3-view feature cache: ~420 MB) when it takes at most a quarter of the free
    memory: indexing, augmentation (the torch backend of :class:`TrainPreset`) and normalisation
    then run on the device, and a host core feeding it batch by batch is no longer the limit. On
    CPU, or when it does not fit, the cache stays where it is (a host array may be memory-mapped).
    """
    if device.type != "cuda":
        return x
    nbytes = x.nbytes if isinstance(x, np.ndarray) else x.numel() * x.element_size()
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > free // 4:
        log.info("%s (%.0f MB) stays on the host: more than a quarter of the GPU's free %.0f MB", what,
                 nbytes / 2**20, free / 2**20)
        return x
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    return t.to(device)


def _u8_rows(images: np.ndarray | torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """Rows ``idx`` of a host array or a device tensor as a uint8 (n, 1, H, W) batch, where they are."""
    if isinstance(images, torch.Tensor):
        return images[torch.as_tensor(idx, device=images.device)].unsqueeze(1)
    return torch.from_numpy(np.asarray(images[idx])).unsqueeze(1)


@dataclass
class FeatureSource:
    """Cached outputs of a frozen prefix: ``views`` (V, N, C, h, w) fp16, labels (N,)."""

    views: torch.Tensor
    labels: np.ndarray
    stage_index: int

    def __len__(self) -> int:
        return len(self.labels)


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Anti-aliased resize of a uint8/float (N, C, H, W) batch for progressive-resolution phases."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(x.dtype) if x.dtype == torch.uint8 else y


def _to_input(u8: torch.Tensor, preset: EvalPreset, size: int | None, device: torch.device) -> torch.Tensor:
    x = u8.unsqueeze(1) if u8.ndim == 3 else u8
    if size is not None:
        x = resize_batch(x, size)
    return preset(x).to(device, non_blocking=True)


def iter_batches(order: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


# --------------------------------------------------------------------------- feature cache
@torch.no_grad()
def extract_features(model: nn.Module, stage_index: int, images: np.ndarray, preset: EvalPreset, *,
                     augment: TrainPreset | None, views: int, seed: int, size: int | None,
                     batch_size: int = 64, device: torch.device = torch.device("cpu"),
                     progress: bool = True, desc: str = "features", keep_at: int | None = None,
                     view0: torch.Tensor | None = None,
                     shard: tuple[int, int] = (0, 1),
                     combine: Callable[[torch.Tensor], None] | None = None,
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen prefix ``stages[:stage_index]`` once per image and view → (V, N, C, h, w) fp16.

    View 0 is the un-augmented image; views 1.. are augmented, each batch of ``batch_size`` images
    with the generator seeded by ``(seed, view, batch number)``, so the cache is a pure function of
    its inputs, whichever process computes which batch.

    ``shard=(rank, world_size)`` computes only the batches ``rank, rank + world_size, ...`` and
    leaves the other rows zero; ``combine`` (under DDP:
    :func:`pneumoscope.train.distributed.all_reduce_disjoint`) then fills in, in place, the rows the
    other ranks computed, so each rank does 1/world_size of the pass instead of all of it.

    Two ways to compute a frozen stage only once across phases (linear probe → fine-tune):
    ``keep_at=j`` (< ``stage_index``) also returns the view-0 output of ``stages[:j]``, taken on
    the way (→ ``(features, kept)``, ``kept`` of shape (1, N, ...)); ``view0`` passes such a kept
    tensor back in as this call's view 0, which is then not recomputed. Both are bit-identical to
    computing the prefix again: the same batches go through the same frozen stages.
    """
    if keep_at is not None and not 0 < keep_at < stage_index:
        raise ValueError(f"keep_at must be in (0, {stage_index}), got {keep_at}")
    if keep_at is not None and view0 is not None:
        raise ValueError("keep_at and view0 cannot be combined (view 0 is not computed when it is given)")
    if view0 is not None and view0.shape[1] != len(images):
        raise ValueError(f"view0 holds {view0.shape[1]} images, expected {len(images)}")
    n = len(images)
    if n == 0:
        raise ValueError("extract_features: no images")
    was_training = model.training
    model.eval()
    rank, world = shard
    # Shapes from one image, so that a rank with no batch of its own still holds full-size tensors.
    probe = _to_input(_u8_rows(images, np.arange(1)), preset, size, device)
    mid_shape = model.forward_until(probe, keep_at).shape[1:] if keep_at is not None else None
    out_shape = model.forward_until(probe, stage_index).shape[1:]
    alloc = torch.zeros if world > 1 else torch.empty  # zeros: the rows other ranks fill in
    out = alloc((views, n, *out_shape), dtype=torch.float16)
    kept = alloc((1, n, *mid_shape), dtype=torch.float16) if mid_shape is not None else None
    first = 0
    if view0 is not None:
        out[0] = view0[0]
        first = 1
    mine = list(iter_batches(np.arange(n), batch_size))[rank::world]
    bar = tqdm(total=sum(map(len, mine)) * (views - first), desc=desc, unit="img", disable=not progress, leave=False)
    for v in range(first, views):
        for idx in mine:
            torch.manual_seed(epoch_seed(seed, v, 7, idx[0] // batch_size))
            u8 = _u8_rows(images, idx)
            if v > 0 and augment is not None:
                u8 = augment.batch(u8)
            x = _to_input(u8, preset, size, device)
            rows = slice(idx[0], idx[-1] + 1)
            if kept is not None and v == 0:
                f = model.forward_until(x, keep_at)
                kept[0, rows] = f.to("cpu", torch.float16)
                for stage in model.stages[keep_at:stage_index]:
                    f = stage(f)
            else:
                f = model.forward_until(x, stage_index)
            out[v, rows] = f.to("cpu", torch.float16)
            bar.update(len(idx))
    bar.close()
    model.train(was_training)
    if combine is not None and world > 1:
        combine(out[first:])
        if kept is not None:
            combine(kept)
    return (out, kept) if keep_at is not None else out


# --------------------------------------------------------------------------- steps
def _forward(model: nn.Module, source, idx: np.ndarray, *, view_idx: np.ndarray | None,
             preset: EvalPreset, augment: TrainPreset | None, size: int | None,
             device: torch.device, channels_last: bool) -> torch.Tensor:
    if isinstance(source, FeatureSource):
        v = torch.as_tensor(view_idx if view_idx is not None else np.zeros(len(idx), np.int64))
        f = source.views[v, torch.as_tensor(idx)].to(device).float()
        if channels_last and f.ndim == 4:
            f = f.contiguous(memory_format=torch.channels_last)
        return _call_from(model, source.stage_index, f)
    u8 = _u8_rows(source.images, idx)
    if augment is not None:
        u8 = augment.batch(u8)
    return model(_to_input(u8, preset, size, device))


class _FromStage(nn.Module):
    """Wraps a PneumoNet so that ``forward(feats)`` runs ``forward_from(k, feats)`` (for DDP)."""

    def __init__(self, net: nn.Module, k: int) -> None:
        super().__init__()
        self.net, self.k = net, k

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net.forward_from(self.k, feats)


def _call_from(model: nn.Module, k: int, feats: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "forward_from"):
        return model.forward_from(k, feats)
    return model(feats)  # a DDP-wrapped _FromStage


def train_one_epoch(model: nn.Module, source, *, order: np.ndarray, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, preset: EvalPreset,
                    augment: TrainPreset | None, batch_size: int, grad_accum: int = 1,
                    size: int | None = None, view_rng: np.random.Generator | None = None,
                    device: torch.device = torch.device("cpu"), channels_last: bool = False,
                    amp_dtype: torch.dtype | None = None, progress: bool = True,
                    desc: str = "train", scaler: torch.amp.GradScaler | None = None) -> dict:
    """One pass over ``order`` (indices into ``source``); returns loss, accuracy and images/s.

    ``scaler`` (needed with fp16 autocast: fp16 gradients underflow without loss scaling; bf16 has
    fp32's range and needs none) scales the loss, unscales before the step and skips steps whose
    gradients overflowed, as ``torch.amp.GradScaler`` does.
    """
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    n_views = source.views.shape[0] if isinstance(source, FeatureSource) else 1
    t0 = time.perf_counter()
    batches = list(iter_batches(order, batch_size))
    bar = tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False)
    optimizer.zero_grad(set_to_none=True)
    for i, idx in enumerate(bar):
        views = view_rng.integers(0, n_views, size=len(idx)) if n_views > 1 and view_rng is not None else None
        y = torch.as_tensor(source.labels[idx], device=device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = _forward(model, source, idx, view_idx=views, preset=preset, augment=augment, size=size,
                              device=device, channels_last=channels_last)
        loss = criterion(logits.float(), y)
        scaled = loss / grad_accum
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if (i + 1) % grad_accum == 0 or i + 1 == len(batches):
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            fault_point("train_step")  # tests: a kill in the middle of an epoch
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step()
        with torch.no_grad():
            pred = logits_to_probs(logits).argmax(1)
        total_loss += float(loss.detach()) * len(idx)
        correct += int((pred == y).sum())
        seen += len(idx)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}")
    dt = time.perf_counter() - t0
    return {"loss": total_loss / max(1, seen), "accuracy": correct / max(1, seen),
            "images_per_s": seen / dt if dt > 0 else math.nan, "seconds": dt}


@torch.no_grad()
def predict_logits(model: nn.Module, source, *, preset: EvalPreset, batch_size: int = 64,
                   size: int | None = None, device: torch.device = torch.device("cpu"),
                   channels_last: bool = False, indices: np.ndarray | None = None,
                   progress: bool = False, desc: str = "eval") -> torch.Tensor:
    """Logits for ``source`` (all rows, or ``indices``), in order, eval mode, no augmentation."""
    was_training = model.training
    model.eval()
    order = np.arange(len(source)) if indices is None else np.asarray(indices)
    outs = []
    for idx in tqdm(list(iter_batches(order, batch_size)), desc=desc, unit="batch", disable=not progress,
                    leave=False):
        outs.append(_forward(model, source, idx, view_idx=None, preset=preset, augment=None, size=size,
                             device=device, channels_last=channels_last).float().cpu())
    model.train(was_training)
    if not outs:
        return torch.empty(0)
    return torch.cat(outs)


def classification_summary(y: np.ndarray, probs: np.ndarray) -> dict:
    """Loss-free epoch metrics: accuracy (argmax) and AUROC (binary) / macro one-vs-rest AUROC."""
    y = np.asarray(y)
    acc = float((probs.argmax(1) == y).mean()) if len(y) else math.nan
    auroc = math.nan
    try:
        if probs.shape[1] == 2:
            auroc = float(roc_auc_score(y, probs[:, 1]))
        elif len(np.unique(y)) == probs.shape[1]:
            auroc = float(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    except ValueError:
        pass
    return {"accuracy": acc, "auroc": auroc}


def evaluate(model: nn.Module, source, *, criterion: nn.Module, preset: EvalPreset, batch_size: int = 64,
             size: int | None = None, device: torch.device = torch.device("cpu"),
             channels_last: bool = False, gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
             indices: np.ndarray | None = None) -> dict:
    """Loss, accuracy and AUROC on ``source``; ``gather`` collects logits from all DDP ranks first."""
    idx = np.arange(len(source)) if indices is None else np.asarray(indices)
    logits = predict_logits(model, source, preset=preset, batch_size=batch_size, size=size, device=device,
                            channels_last=channels_last, indices=idx)
    y = torch.as_tensor(source.labels[idx])
    if gather is not None:
        pair = gather(torch.cat([logits, y[:, None].float()], dim=1))
        logits, y = pair[:, :-1], pair[:, -1].long()
    loss = float(criterion(logits, y)) if len(y) else math.nan
    probs = logits_to_probs(logits).numpy()
    return {"loss": loss, **classification_summary(y.numpy(), probs), "logits": logits, "labels": y.numpy()}
