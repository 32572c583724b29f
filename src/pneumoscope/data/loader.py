"""PyTorch ``Dataset``/``DataLoader`` factory over the preprocessed-image cache.

Items are uint8 tensors (1, S, S) and integer labels. Normalisation to the model's mean/std is done
per *batch* by :class:`pneumoscope.data.presets.EvalPreset` in the training/eval loop, which is
cheaper than per item. Data order is a pure function of (seed, epoch): the sampler draws from its
own ``torch.Generator``, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pneumoscope.data.cache import ImageCache
from pneumoscope.data.presets import TrainPreset


class CachedImageDataset(Dataset):
    """Images from an :class:`ImageCache`, selected by content hash, with labels and optional augmentation."""

    def __init__(self, cache: ImageCache, content_hashes: list[str], labels: np.ndarray,
                 augment: TrainPreset | None = None) -> None:
        self.cache = cache
        self.slots = cache.slots_for(content_hashes)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(np.array(self.cache.array()[self.slots[i]])).unsqueeze(0)
        if self.augment is not None:
            img = self.augment(img)
        return img, int(self.labels[i])


def epoch_seed(seed: int, epoch: int, salt: int = 0, *more: int) -> int:
    """A deterministic 63-bit seed for (seed, epoch, salt, *more) — used for sampling and augmentation."""
    ss = np.random.SeedSequence([seed, epoch, salt, *more])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class EpochSampler(Sampler[int]):
    """Shuffled (optionally class-balanced) indices, a pure function of (seed, epoch), sharded by rank.

    With ``world_size`` > 1 each rank takes every ``world_size``-th index of the same permutation
    (padded by wrap-around so every rank has the same number of steps), like
    ``DistributedSampler``; all ranks together see every sample once per epoch.
    """

    def __init__(self, labels: np.ndarray, *, seed: int, shuffle: bool = True, balanced: bool = False,
                 rank: int = 0, world_size: int = 1) -> None:
        self.labels = np.asarray(labels)
        self.seed, self.shuffle, self.balanced = seed, shuffle, balanced
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_order(self) -> np.ndarray:
        n = len(self.labels)
        rng = np.random.default_rng(epoch_seed(self.seed, self.epoch, 1))
        if self.balanced:
            counts = np.bincount(self.labels)
            w = 1.0 / counts[self.labels]
            order = rng.choice(n, size=n, replace=True, p=w / w.sum())
        elif self.shuffle:
            order = rng.permutation(n)
        else:
            order = np.arange(n)
        if self.world_size > 1:
            pad = (-len(order)) % self.world_size
            if pad:
                order = np.concatenate([order, order[:pad]])
        return order

    def __iter__(self):
        order = self.global_order()
        return iter(order[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        n = len(self.labels)
        return -(-n // self.world_size)


def make_loader(dataset: CachedImageDataset, *, batch_size: int, sampler: Sampler | None = None,
                num_workers: int = 0, drop_last: bool = False) -> DataLoader:
    """A DataLoader over ``dataset``; ``num_workers=0`` is right on a 2-core CPU (compute-bound)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=num_workers, drop_last=drop_last,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
