"""Train/eval presets: augmentation on uint8 tensors and the model's own normalisation.

Two small classes in the shape of torchvision's ``references/classification/presets.py``.
:class:`EvalPreset` is the single place where a cached uint8 image becomes a model input; training,
evaluation, prediction, the server and the ONNX parity check all use it with the model card's
``mean``/``std``/``in_chans``, so preprocessing cannot drift between them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torchvision.transforms import v2


@dataclass(frozen=True)
class AugmentSpec:
    """Training augmentation. All off (zeros) means no augmentation.

    Defaults follow the seed notebooks: rotation ±10°, small shifts and zooms, brightness/contrast
    ±20 %. Horizontal flips are off by default because they move the heart to the wrong side,
    which a model can learn to exploit; turn them on with ``hflip: 0.5`` to reproduce notebooks.
    """

    hflip: float = 0.0
    rotate: float = 10.0
    translate: float = 0.06
    scale_min: float = 0.9
    scale_max: float = 1.1
    brightness: float = 0.2
    contrast: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def enabled(self) -> bool:
        return any([self.hflip > 0, self.rotate > 0, self.translate > 0, self.scale_min != 1.0,
                    self.scale_max != 1.0, self.brightness > 0, self.contrast > 0])


class TrainPreset:
    """Random augmentation of a uint8 image tensor (1, H, W) → uint8 tensor (1, H, W)."""

    def __init__(self, spec: AugmentSpec) -> None:
        self.spec = spec
        ops: list[torch.nn.Module] = []
        if spec.hflip > 0:
            ops.append(v2.RandomHorizontalFlip(p=spec.hflip))
        if spec.rotate > 0 or spec.translate > 0 or (spec.scale_min, spec.scale_max) != (1.0, 1.0):
            ops.append(v2.RandomAffine(degrees=spec.rotate, translate=(spec.translate, spec.translate),
                                       scale=(spec.scale_min, spec.scale_max),
                                       interpolation=v2.InterpolationMode.BILINEAR))
        if spec.brightness > 0 or spec.contrast > 0:
            ops.append(v2.ColorJitter(brightness=spec.brightness or None, contrast=spec.contrast or None))
        self.transform = v2.Compose(ops) if ops else None

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return img if self.transform is None else self.transform(img)

    def batch(self, imgs: torch.Tensor) -> torch.Tensor:
        """Augment each image of a (N, H, W) or (N, 1, H, W) uint8 batch independently."""
        if self.transform is None:
            return imgs
        squeeze = imgs.ndim == 3
        x = imgs.unsqueeze(1) if squeeze else imgs
        out = torch.stack([self.transform(xi) for xi in x])
        return out.squeeze(1) if squeeze else out


class EvalPreset:
    """uint8 grayscale (N, H, W) or (N, 1, H, W) → normalised float (N, in_chans, H, W).

    ``mean``/``std`` are per input channel on the [0, 1] scale, as in the model card. A grayscale
    image is replicated to the model's channels (exactly equivalent to summing the first conv's
    weights over channels, which :func:`pneumoscope.models.create_model` does for ``in_chans=1``).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], in_chans: int,
                 channels_last: bool = False) -> None:
        if len(mean) != in_chans or len(std) != in_chans:
            mean = [sum(mean) / len(mean)] * in_chans
            std = [sum(std) / len(std)] * in_chans
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, in_chans, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, in_chans, 1, 1)
        self.in_chans = in_chans
        self.channels_last = channels_last

    @classmethod
    def from_card(cls, card, in_chans: int | None = None, channels_last: bool = False) -> "EvalPreset":
        c = in_chans or card.in_chans
        return cls(card.mean, card.std, c, channels_last=channels_last)

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        x = imgs.unsqueeze(1) if imgs.ndim == 3 else imgs
        x = x.to(torch.float32).div_(255.0)
        if self.in_chans > 1:
            x = x.expand(-1, self.in_chans, -1, -1)
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
