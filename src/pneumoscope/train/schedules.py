"""Optimisers and learning-rate schedules (per optimisation step, except reduce-on-plateau)."""

from __future__ import annotations

import math
from typing import Iterable

import torch


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float, weight_decay: float,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD (Nesterov) over the trainable parameters."""
    params = [p for p in params if p.requires_grad]
    # PyTorch's default implementation. Not ``fused``: after a resume its CPU kernel drifted by
    # ~2e-5 from the uninterrupted run (the resume-equivalence test caught it); on a quiet CPU the
    # optimiser step is a few ms either way.
    fused: dict = {}
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fused)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


class WarmupCosine:
    """Linear warm-up then cosine decay to ``min_lr_ratio · lr``: a picklable ``LambdaLR`` multiplier."""

    def __init__(self, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> None:
        self.total, self.warmup, self.floor = max(1, total_steps), warmup_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, *, lr: float, steps_per_epoch: int,
                    epochs: int, warmup_epochs: float = 0.0, min_lr_ratio: float = 0.01,
                    plateau_factor: float = 0.2, plateau_patience: int = 2):
    """The schedule named in the config; ``None`` for ``none``.

    ``cosine`` and ``onecycle`` step every optimisation step; ``plateau``
    (``ReduceLROnPlateau``, maximising the validation metric) steps once per epoch with that metric.
    """
    total = max(1, steps_per_epoch * epochs)
    if name == "none":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupCosine(total, int(round(warmup_epochs * steps_per_epoch)), min_lr_ratio))
    if name == "onecycle":
        pct = min(0.5, max(0.05, warmup_epochs / max(1, epochs))) if warmup_epochs else 0.15
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=pct)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=plateau_factor,
                                                          patience=plateau_patience)
    raise ValueError(f"unknown schedule {name!r}")


def steps_per_call(scheduler) -> str:
    """'step' for per-iteration schedules, 'epoch' for reduce-on-plateau, '' for none."""
    if scheduler is None:
        return ""
    return "epoch" if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) else "step"
