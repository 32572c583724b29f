"""Losses for imbalanced classification: weighted cross-entropy / BCE, focal loss, label smoothing.

Models emit ``C`` logits (softmax, loss ``ce``/``focal``) or a single logit for binary tasks
(sigmoid, loss ``bce``); :func:`logits_to_probs` turns either into (N, C) probabilities so every
consumer sees the same shape.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss


def class_weights_from_counts(counts: np.ndarray | list[int]) -> np.ndarray:
    """``N / (C · n_c)`` — scikit-learn's "balanced" weights.

    On the Kermany train split (1,341 normal / 3,875 pneumonia) this gives 1.94 / 0.67, the values
    the seed notebooks hard-coded.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if (counts <= 0).any():
        raise ValueError(f"every class needs at least one training image, got counts {counts.tolist()}")
    return counts.sum() / (len(counts) * counts)


def num_outputs(loss_name: str, num_classes: int) -> int:
    """One logit for binary BCE (the notebooks' sigmoid output), else one per class."""
    return 1 if (loss_name == "bce" and num_classes == 2) else num_classes


def logits_to_probs(logits: torch.Tensor) -> torch.Tensor:
    """(N, 1) sigmoid logits or (N, C) softmax logits → (N, C) probabilities."""
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0].float())
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits.float(), dim=1)


class FocalLoss(nn.Module):
    """Softmax focal loss, Lin et al. 2017 ("Focal Loss for Dense Object Detection").

    ``FL = -w_y · (1 - p_y)^γ · log p_y`` averaged over the batch, with per-class weights ``w``
    (class weights and/or ``alpha``: for binary problems ``alpha`` weights the positive class and
    ``1-alpha`` the negative, as in the paper). ``γ = 0`` and no weights reduces to cross-entropy.
    For a single sigmoid logit it delegates to :func:`torchvision.ops.sigmoid_focal_loss`.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = None, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha
        self.register_buffer("weight", weight if weight is not None else None, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if logits.shape[1] == 1:
            t = target.float()
            loss = sigmoid_focal_loss(logits[:, 0], t, alpha=self.alpha if self.alpha is not None else -1,
                                      gamma=self.gamma, reduction="none")
            if self.weight is not None:
                loss = loss * self.weight[target]
            return loss.mean()
        logp = F.log_softmax(logits, dim=1)
        logp_y = logp.gather(1, target[:, None])[:, 0]
        p_y = logp_y.exp()
        loss = -((1 - p_y) ** self.gamma) * logp_y
        w = torch.ones_like(loss)
        if self.weight is not None:
            w = w * self.weight[target]
        if self.alpha is not None:
            if logits.shape[1] != 2:
                raise ValueError("focal alpha is defined for binary tasks; use class weights for more classes")
            w = w * torch.where(target == 1, self.alpha, 1 - self.alpha)
        return (w * loss).mean()


class BCELoss(nn.Module):
    """BCE on a single logit with per-class weights and label smoothing (targets ε/2, 1-ε/2)."""

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight if weight is not None else None, persistent=False)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = target.float()
        if self.label_smoothing:
            t = t * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        loss = F.binary_cross_entropy_with_logits(logits[:, 0].float(), t, reduction="none")
        if self.weight is not None:
            loss = loss * self.weight[target]
        return loss.mean()


def build_loss(name: str, *, class_weights: np.ndarray | None = None, focal_gamma: float = 2.0,
               focal_alpha: float | None = None, label_smoothing: float = 0.0) -> nn.Module:
    """The loss named in the config (``ce``, ``bce`` or ``focal``)."""
    w = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
    if name == "ce":
        return nn.CrossEntropyLoss(weight=w, label_smoothing=label_smoothing)
    if name == "bce":
        return BCELoss(weight=w, label_smoothing=label_smoothing)
    if name == "focal":
        return FocalLoss(gamma=focal_gamma, alpha=focal_alpha, weight=w)
    raise ValueError(f"unknown loss {name!r}")
