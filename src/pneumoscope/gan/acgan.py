"""An auxiliary-classifier GAN (ACGAN, Odena, Olah & Shlens 2017) for grayscale chest X-rays.

Why this shape: the seed notebook used an ACGAN both to synthesise extra images of the rare class
and to read its discriminator's class head as a classifier. Here:

* :class:`Generator` is DCGAN-style (Radford et al. 2016): noise ``z`` concatenated with a learned
  class embedding, projected to a 4×4 map, then stride-2 transposed convolutions with BatchNorm and
  ReLU that double the size until ``size`` (a power of two, 16..256), ``tanh`` output in [-1, 1].
* :class:`Discriminator` mirrors it with stride-2 convolutions, LeakyReLU(0.2) and **spectral
  normalisation** on every layer (Miyato et al. 2018) instead of BatchNorm, which keeps the
  adversarial game stable enough to train on a CPU with a fixed learning rate, and has two heads on
  the shared features: one real/fake logit and ``n_classes`` class logits (the "auxiliary
  classifier"). Its penultimate vector (:meth:`Discriminator.features`) is also exposed.

Channel widths scale with ``width`` (``ngf``/``ndf`` in DCGAN terms): the default 32 at 64×64 is
about 1.0 M generator and 0.7 M discriminator parameters, a size that trains at tens of images
per second on one CPU core.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from pneumoscope.errors import ConfigError


def _check_size(size: int) -> int:
    steps = int(round(math.log2(size))) - 2 if size > 0 else -1
    if size < 16 or size > 256 or 2 ** (steps + 2) != size:
        raise ConfigError(f"gan size must be a power of two between 16 and 256, got {size}")
    return steps


def _widths(size: int, width: int) -> list[int]:
    """Channels at 4×4, 8×8, ... up to size/2 (the generator's order): wide at low resolution."""
    steps = _check_size(size)
    return [width * 2 ** min(steps - 1 - i, 3) for i in range(steps)]


class Generator(nn.Module):
    """``(z, y) -> image``: (N, z_dim) noise and (N,) class indices → (N, 1, size, size) in [-1, 1]."""

    def __init__(self, size: int = 64, n_classes: int = 3, z_dim: int = 100, width: int = 32,
                 embed_dim: int = 32) -> None:
        super().__init__()
        self.size, self.n_classes, self.z_dim = size, n_classes, z_dim
        chans = _widths(size, width)
        self.embed = nn.Embedding(n_classes, embed_dim)
        self.project = nn.Sequential(
            nn.ConvTranspose2d(z_dim + embed_dim, chans[0], 4, 1, 0, bias=False),  # 1x1 -> 4x4
            nn.BatchNorm2d(chans[0]), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            blocks += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
        blocks += [nn.ConvTranspose2d(chans[-1], 1, 4, 2, 1, bias=False), nn.Tanh()]
        self.blocks = nn.Sequential(*blocks)
        self.apply(_dcgan_init)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, self.embed(y)], dim=1)[:, :, None, None]
        return self.blocks(self.project(h))


class Discriminator(nn.Module):
    """``image -> (real/fake logit (N,), class logits (N, n_classes))``, spectral-normalised.

    ``minibatch_std`` (ProGAN, Karras et al. 2018) gives the real/fake head one extra input: the
    mean over features of the standard deviation over the batch. A collapsed generator (every
    sample of a class alike) then looks fake at once, which is what stops the intra-class mode
    collapse that plain ACGAN is known for (Shu 2017). Only the real/fake head reads it: the class
    head sees each image alone, so the discriminator used as a classifier does not depend on the
    batch an image arrives in.
    """

    def __init__(self, size: int = 64, n_classes: int = 3, width: int = 32, minibatch_std: bool = True) -> None:
        super().__init__()
        self.size, self.n_classes, self.minibatch_std = size, n_classes, minibatch_std
        chans = list(reversed(_widths(size, width)))  # size/2 ... 4x4
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in chans:
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 4, 2, 1)), nn.LeakyReLU(0.2, inplace=True)]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.num_features = c_in * 16
        self.adv = spectral_norm(nn.Linear(self.num_features + int(minibatch_std), 1))
        self.cls = spectral_norm(nn.Linear(self.num_features, n_classes))
        self.apply(_dcgan_init)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened last feature map, (N, num_features): what both heads read."""
        return self.body(x).flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        if self.minibatch_std:
            s = f.std(0, unbiased=False).mean() if f.shape[0] > 1 else f.new_zeros(())
            adv = self.adv(torch.cat([f, s.expand(f.shape[0], 1)], 1))
        else:
            adv = self.adv(f)
        return adv[:, 0], self.cls(f)


def _dcgan_init(m: nn.Module) -> None:
    """DCGAN initialisation: N(0, 0.02) for convolutions, N(1, 0.02) for BatchNorm scales."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        w = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
        nn.init.normal_(w, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, 0.0, 1.0)


class ACGAN(nn.Module):
    """Generator + discriminator in one module, so one state dict (safetensors) holds both."""

    def __init__(self, size: int = 64, n_classes: int = 3, z_dim: int = 100, width: int = 32,
                 minibatch_std: bool = True) -> None:
        super().__init__()
        self.generator = Generator(size, n_classes, z_dim, width)
        self.discriminator = Discriminator(size, n_classes, width, minibatch_std)
        self.size, self.n_classes, self.z_dim, self.width = size, n_classes, z_dim, width
        self.minibatch_std = minibatch_std

    def spec(self) -> dict:
        return {"size": self.size, "n_classes": self.n_classes, "z_dim": self.z_dim, "width": self.width,
                "minibatch_std": self.minibatch_std}


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] → uint8 [0, 255], same shape."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(u8: torch.Tensor) -> torch.Tensor:
    """uint8 images → float in [-1, 1] (the generator's range)."""
    return u8.float() / 127.5 - 1.0
