"""The "dummy class" option (``train.dummy_class: true``): an extra output for ambiguous images.

The idea in the seed notebook (issue #5): when fine-tuning a pretrained network, give the softmax
one more class than the task has, a "dummy" class, so that inputs that look like none of the real
classes have somewhere to go instead of being forced onto one of them. The notebook is not part of
this repository and did not define what trains that class, so we chose a definition that can be
built from the training data alone and evaluated honestly:

* **What trains the dummy class**: ``round(dummy_fraction × N_train)`` synthetic *ambiguous*
  images, each a pixel blend ``λ·a + (1-λ)·b`` of two training images ``a``, ``b`` of **different**
  classes with ``λ ~ U(0.35, 0.65)`` (so neither class dominates; the mixup of Zhang et al. 2018,
  but labelled as "ambiguous" instead of with soft labels). They are made once, from the train
  split only, deterministically from the run's seed, and join the training set with label ``K``
  (the task has classes ``0..K-1``). Augmentation, the sampler and the feature cache treat them
  like any other training image.
* **Model**: the head has ``K + 1`` outputs while training; the loss is the configured ``ce`` or
  ``focal`` over ``K + 1`` classes (``bce`` has a single output and is refused).
* **Evaluation on the real classes**: validation metrics (epoch selection, early stopping,
  threshold and temperature) use the first ``K`` logits only, and the saved *best* checkpoint is
  the network with the dummy row of its final Linear removed. ``softmax`` over the remaining ``K``
  logits equals the ``K + 1``-way softmax with the dummy column dropped and renormalised, so every
  downstream tool (evaluate, predict, export, serve) sees an ordinary ``K``-class model and a
  dummy-class run can be compared with a plain run of the same config, both selected on
  validation, both evaluated on test (``pneumoscope compare --paired``). The resumable *last*
  checkpoint keeps all ``K + 1`` outputs.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from pneumoscope.data.loader import epoch_seed
from pneumoscope.errors import ConfigError

MIX_RANGE = (0.35, 0.65)


def make_dummy_examples(images: np.ndarray, labels: np.ndarray, fraction: float, seed: int,
                        mix_range: tuple[float, float] = MIX_RANGE) -> np.ndarray:
    """(M, S, S) uint8 blends of random train-image pairs from different classes (M = round(fraction·N))."""
    labels = np.asarray(labels)
    n = len(labels)
    m = int(round(fraction * n))
    if m == 0:
        return np.zeros((0, *images.shape[1:]), np.uint8)
    if len(np.unique(labels)) < 2:
        raise ConfigError("train.dummy_class needs train images of at least two classes")
    rng = np.random.default_rng(epoch_seed(seed, 0, 41))
    first = rng.integers(0, n, size=m)
    second = np.empty(m, np.int64)
    for i, a in enumerate(first):  # a partner of another class, uniformly among those images
        others = np.flatnonzero(labels != labels[a])
        second[i] = others[rng.integers(0, len(others))]
    lam = rng.uniform(*mix_range, size=m)[:, None, None]
    a = np.asarray(images[first], dtype=np.float32)
    b = np.asarray(images[second], dtype=np.float32)
    return np.clip(np.rint(lam * a + (1 - lam) * b), 0, 255).astype(np.uint8)


def with_dummy_examples(images: np.ndarray, labels: np.ndarray, n_classes: int, fraction: float,
                        seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train images and labels with the dummy examples appended (label ``n_classes``)."""
    extra = make_dummy_examples(images, labels, fraction, seed)
    return (np.concatenate([np.asarray(images), extra]),
            np.concatenate([np.asarray(labels, np.int64), np.full(len(extra), n_classes, np.int64)]))


class RealClasses(nn.Module):
    """Wraps a K+1-output PneumoNet so that ``forward``/``forward_from`` return the first K logits."""

    def __init__(self, net: nn.Module, n_real: int) -> None:
        super().__init__()
        self.net, self.n_real = net, n_real

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, : self.n_real]

    def forward_from(self, k: int, feats: torch.Tensor) -> torch.Tensor:
        return self.net.forward_from(k, feats)[:, : self.n_real]


def drop_dummy_output(model: nn.Module, n_real: int) -> nn.Module:
    """A copy of ``model`` whose final Linear keeps only the first ``n_real`` outputs (no dummy row)."""
    from pneumoscope.models.heads import final_linear

    out = copy.deepcopy(model)
    fc = final_linear(out.head.classifier)
    if fc.out_features == n_real:
        return out
    with torch.no_grad():
        fc.weight = nn.Parameter(fc.weight[:n_real].clone())
        if fc.bias is not None:
            fc.bias = nn.Parameter(fc.bias[:n_real].clone())
    fc.out_features = n_real
    return out
