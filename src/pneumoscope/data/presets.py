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

import cv2
import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSpec:
    """Training augmentation. All off (zeros) means no augmentation.

    Defaults follow the seed notebooks: rotation ±10°, small shifts and zooms, brightness/contrast
    ±20 %. Horizontal flips are off by default because they move the heart to the wrong side,
    which a model can learn to exploit; turn them on with ``hflip: 0.5`` to reproduce notebooks.

    ``sharpness`` draws a factor in ``[max(0, 1 - s), 1 + s]`` per image, with the semantics of
    ``torchvision.transforms.v2.functional.adjust_sharpness`` (0: the 3×3-smoothed image, 1: the
    image, 2: twice as far from the smoothed one). Why: in the Kermany train split the normal films
    carry ~35 % more high-frequency energy than the pneumonia films (their originals are larger and
    were shrunk harder); that texture alone separates the classes with AUROC 0.88 on train
    (``benchmarks/shortcut_texture.py``), so a network can learn "sharp = normal". A factor
    range of [0, 2] moves an image's high-frequency energy by ×0.64 … ×1.43, wider than the class
    gap (×0.74), which removes that cue from the labels' reach.
    """

    hflip: float = 0.0
    rotate: float = 10.0
    translate: float = 0.06
    scale_min: float = 0.9
    scale_max: float = 1.1
    brightness: float = 0.2
    contrast: float = 0.2
    sharpness: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def enabled(self) -> bool:
        return any([self.hflip > 0, self.rotate > 0, self.translate > 0, self.scale_min != 1.0,
                    self.scale_max != 1.0, self.brightness > 0, self.contrast > 0, self.sharpness > 0])


_LEVELS = np.arange(256, dtype=np.float64)
# torchvision's adjust_sharpness kernel (PIL's ImageFilter.SMOOTH)
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0


def adjust_sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    """uint8 (H, W) blended with its 3×3-smoothed copy: ``smooth + factor * (img - smooth)``.

    As ``torchvision.transforms.v2.functional.adjust_sharpness`` except that the one-pixel border
    is smoothed with replicated edges instead of being left untouched.
    """
    if factor == 1.0:
        return img
    smooth = cv2.filter2D(img, cv2.CV_32F, _SMOOTH, borderType=cv2.BORDER_REPLICATE)
    out = cv2.addWeighted(img.astype(np.float32), factor, smooth, 1.0 - factor, 0.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _augment_one(img: np.ndarray, mat: np.ndarray | None, bright: float | None,
                 contrast: float | None, sharp: float | None = None) -> np.ndarray:
    """One uint8 (H, W) image: affine warp, sharpness, then brightness and contrast as one lookup table."""
    h, w = img.shape
    if mat is not None:  # bilinear, zero fill, like grid_sample(align_corners=False)
        img = cv2.warpAffine(img, mat, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if sharp is not None:
        img = adjust_sharpness(img, sharp)
    if bright is None and contrast is None:
        return img
    # brightness then contrast (around the mean of the brightened image) as one 256-entry table
    lut = np.clip(_LEVELS * (bright if bright is not None else 1.0), 0, 255)
    if contrast is not None:
        hist = cv2.calcHist([img], [0], None, [256], [0, 256]).reshape(-1).astype(np.float64)
        mean = float(hist @ lut) / img.size
        lut = np.clip(mean + contrast * (lut - mean), 0, 255)
    return cv2.LUT(img, np.rint(lut).astype(np.uint8))


def _augment_torch(x: torch.Tensor, theta: torch.Tensor | None, bright: torch.Tensor | None,
                   contrast: torch.Tensor | None, sharp: torch.Tensor | None) -> torch.Tensor:
    """:func:`_augment_one` for a whole uint8 (N, 1, H, W) batch with torch ops, on the batch's device.

    Why: on a GPU the cv2 path would keep the images on the host and cost a core per ~2,500
    images/s, less than the network consumes; here a batch never leaves the device. The same
    parameters give the same images up to interpolation rounding (cv2's warp uses 1/32-pixel fixed
    point, ``grid_sample`` floats; ``tests/data/test_preprocess.py`` bounds the difference).
    """
    dev = x.device
    y = x.float()
    if theta is not None:  # theta: normalised output coords -> input coords, as in affine_grid
        grid = F.affine_grid(theta.to(dev, torch.float32), list(y.shape), align_corners=False)
        y = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False).round_()
    if sharp is not None:
        k = torch.as_tensor(_SMOOTH, device=dev).view(1, 1, 3, 3)
        smooth = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), k)
        f = sharp.to(dev, torch.float32).view(-1, 1, 1, 1)
        y = (smooth + f * (y - smooth)).round_().clamp_(0, 255)
    if bright is not None:
        y = (y * bright.to(dev, torch.float32).view(-1, 1, 1, 1)).clamp_(0, 255)
    if contrast is not None:
        mean = y.mean(dim=(1, 2, 3), keepdim=True)
        y = (mean + contrast.to(dev, torch.float32).view(-1, 1, 1, 1) * (y - mean)).clamp_(0, 255)
    return y.round_().to(torch.uint8)


class TrainPreset:
    """Random augmentation of uint8 images: (1, H, W) → (1, H, W), or a batch (N, [1,] H, W).

    Why not ``torchvision.transforms.v2``: per image on tensors, v2's ``RandomAffine`` +
    ``ColorJitter`` took ~2x longer than the EfficientNet-Lite0 forward pass it fed (py-spy, in the
    default run), and a batched ``grid_sample`` version was no faster than the notebooks' PIL
    pipeline (benchmarks/results/loader.md). Here every image draws its own parameters from the
    same distributions as ``v2.RandomHorizontalFlip``, ``v2.RandomAffine(degrees, translate,
    scale)`` and ``v2.ColorJitter(brightness, contrast)``, and stays uint8 throughout: one
    ``cv2.warpAffine`` (bilinear, zero fill) and one 256-entry lookup table (brightness, then
    contrast around the image mean) per image. Random numbers come from torch's
        default generator, which the trainer seeds per (seed, epoch), so augmentation is reproducible.
    """

    def __init__(self, spec: AugmentSpec) -> None:
        self.spec = spec

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.batch(img.unsqueeze(0))[0]

    def batch(self, imgs: torch.Tensor, generators: list[torch.Generator] | None = None,
              backend: str = "auto") -> torch.Tensor:
        """Augment each image of a (N, H, W) or (N, 1, H, W) uint8 batch independently.

        ``generators`` (one per image) make each image's parameters a function of its own
        generator only — what test-time augmentation needs so that a prediction does not depend on
        the batch an image arrives in. Without them the default generator is used.

        ``backend``: ``cv2`` (per image on the host), ``torch`` (batched, on the batch's device),
        or ``auto``: cv2 for a CPU batch, torch for a GPU one. Both draw the same parameters.
        """
        if backend not in ("auto", "cv2", "torch"):
            raise ValueError(f"augmentation backend must be auto, cv2 or torch, got {backend!r}")
        if not self.spec.enabled or imgs.shape[0] == 0:
            return imgs
        squeeze = imgs.ndim == 3
        x = imgs.unsqueeze(1) if squeeze else imgs
        n = x.shape[0]
        s = self.spec

        def uniform(lo: float, hi: float) -> torch.Tensor:
            if generators is None:
                r = torch.rand(n)
            else:
                r = torch.cat([torch.rand(1, generator=g) for g in generators])
            return r * (hi - lo) + lo

        geometric = s.hflip > 0 or s.rotate > 0 or s.translate > 0 or (s.scale_min, s.scale_max) != (1.0, 1.0)
        h, w = x.shape[-2:]
        mats = theta = None
        if geometric:
            angle = uniform(-s.rotate, s.rotate) * (math.pi / 180.0)
            scale = uniform(s.scale_min, s.scale_max)
            tx, ty = uniform(-s.translate, s.translate) * 2.0, uniform(-s.translate, s.translate) * 2.0
            flip = torch.where(uniform(0.0, 1.0) < s.hflip, -1.0, 1.0)
            cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
            # In normalised coordinates an output pixel o samples the input at  A (o - t), with
            # A = R(-angle) / scale, then the flip; converted below to one pixel-space matrix per image.
            a = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1).double()  # (n, 2, 2)
            a[:, 0, :] *= flip[:, None].double()
            b = -(a @ torch.stack([tx, ty], 1).double()[:, :, None])[:, :, 0]
            d = torch.tensor([2.0 / w, 2.0 / h], dtype=torch.float64)
            e = torch.tensor([1.0 / w - 1.0, 1.0 / h - 1.0], dtype=torch.float64)
            lin = a * d[None, None, :] / d[None, :, None]  # D^-1 A D
            off = ((a @ e) + b - e) / d  # D^-1 (A e + b - e)
            mats = torch.cat([lin, off[:, :, None]], 2).numpy()
            theta = torch.cat([a, b[:, :, None]], 2)
        bright = uniform(1 - s.brightness, 1 + s.brightness) if s.brightness > 0 else None
        contrast = uniform(1 - s.contrast, 1 + s.contrast) if s.contrast > 0 else None
        sharp = uniform(max(0.0, 1 - s.sharpness), 1 + s.sharpness) if s.sharpness > 0 else None
        if backend == "torch" or (backend == "auto" and x.device.type != "cpu"):
            res = _augment_torch(x, theta, bright, contrast, sharp)
            return res.squeeze(1) if squeeze else res
        bright, contrast, sharp = (None if t is None else t.numpy() for t in (bright, contrast, sharp))
        src = x.numpy()
        out = np.empty_like(src)

        def work(i: int) -> None:
            out[i, 0] = _augment_one(src[i, 0], None if mats is None else mats[i],
                                     None if bright is None else float(bright[i]),
                                     None if contrast is None else float(contrast[i]),
                                     None if sharp is None else float(sharp[i]))

        for i in range(n):  # cv2 parallelises each warp itself (cv2.getNumThreads())
            work(i)
        res = torch.from_numpy(out)
        return res.squeeze(1) if squeeze else res


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
        # One fused pass: (u8 / 255 - mean) / std == u8 * scale + shift, broadcast straight into the
        # channel layout the model wants (NHWC memory for channels_last), no intermediate tensors.
        x = imgs.unsqueeze(1) if imgs.ndim == 3 else imgs
        if x.shape[1] != 1:
            x = x[:, :1]
        scale = (1.0 / (255.0 * self.std)).view(-1)
        shift = (-self.mean / self.std).view(-1)
        if self.in_chans == 1:
            # In place on the fresh float copy: ~10x faster than a broadcasting addcmul. A (N, 1, H, W)
            # tensor is contiguous in both memory formats, so channels_last needs nothing more.
            # On CPU numpy does it single-threaded: torch's OpenMP threads would keep spinning after
            # the op and take the cores from cv2's warp threads in the next augmentation batch
            # (+20-40 % loader throughput measured; identical values).
            s, b = np.float32(scale[0]), np.float32(shift[0])
            if x.device.type == "cpu" and x.dtype == torch.uint8 and not x.requires_grad:
                out = np.multiply(x.numpy(), s, dtype=np.float32)
                out += b
                return torch.from_numpy(out)
            return x.to(torch.float32).mul_(float(s)).add_(float(b))
        scale, shift = scale.to(x.device), shift.to(x.device)  # a batch already on the GPU stays there
        if self.channels_last:
            y = torch.addcmul(shift, x.permute(0, 2, 3, 1).to(torch.float32), scale)  # (N, H, W, C)
            return y.permute(0, 3, 1, 2)
        return torch.addcmul(shift.view(1, -1, 1, 1), x.to(torch.float32), scale.view(1, -1, 1, 1))
