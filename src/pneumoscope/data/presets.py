"""Train/eval presets: augmentation on uint8 tensors and the model's own normalisation.

Two small classes in the shape of torchvision's ``references/classification/presets.py``.
:class:`EvalPreset` is the single place where a cached uint8 image becomes a model input; training,
evaluation, prediction, the server and the ONNX parity check all use it with the model card's
``mean``/``std``/``in_chans``, so preprocessing cannot drift between them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import math

import torch
import torch.nn.functional as F


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
    """Random augmentation of uint8 images: (1, H, W) → (1, H, W), or a batch (N, [1,] H, W).

    Why not ``torchvision.transforms.v2`` per image: on this CPU, v2's per-image ``RandomAffine`` +
    ``ColorJitter`` took ~2x longer than the EfficientNet-Lite0 forward pass it fed (py-spy,
    measured in the default run). Here every image of a batch draws its own parameters — the same
    distributions as ``v2.RandomHorizontalFlip``, ``v2.RandomAffine(degrees, translate, scale)`` and
    ``v2.ColorJitter(brightness, contrast)`` — and the whole batch is warped with one
    ``affine_grid``/``grid_sample`` call (bilinear, zero fill). Random numbers come from torch's
    default generator, which the trainer seeds per (seed, epoch), so augmentation is reproducible.
    """

    def __init__(self, spec: AugmentSpec) -> None:
        self.spec = spec

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.batch(img.unsqueeze(0))[0]

    def batch(self, imgs: torch.Tensor) -> torch.Tensor:
        """Augment each image of a (N, H, W) or (N, 1, H, W) uint8 batch independently."""
        if not self.spec.enabled or imgs.shape[0] == 0:
            return imgs
        squeeze = imgs.ndim == 3
        x = (imgs.unsqueeze(1) if squeeze else imgs).float()
        n = x.shape[0]
        s = self.spec

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(n) * (hi - lo) + lo

        geometric = s.hflip > 0 or s.rotate > 0 or s.translate > 0 or (s.scale_min, s.scale_max) != (1.0, 1.0)
        if geometric:
            angle = uniform(-s.rotate, s.rotate) * (math.pi / 180.0)
            scale = uniform(s.scale_min, s.scale_max)
            tx, ty = uniform(-s.translate, s.translate) * 2.0, uniform(-s.translate, s.translate) * 2.0
            flip = torch.where(torch.rand(n) < s.hflip, -1.0, 1.0)
            cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
            # output pixel o samples input  i = A (o - t) with A = R(-angle) / scale, then the flip
            a = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # (n, 2, 2)
            a[:, 0, :] *= flip[:, None]
            b = -(a @ torch.stack([tx, ty], 1)[:, :, None])[:, :, 0]
            theta = torch.cat([a, b[:, :, None]], 2)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if s.brightness > 0:
            x = x * uniform(1 - s.brightness, 1 + s.brightness)[:, None, None, None]
        if s.contrast > 0:
            mean = x.clamp(0, 255).mean(dim=(1, 2, 3), keepdim=True)
            c = uniform(1 - s.contrast, 1 + s.contrast)[:, None, None, None]
            x = mean + c * (x - mean)
        out = x.round_().clamp_(0, 255).to(torch.uint8)
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
