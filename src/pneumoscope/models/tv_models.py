"""torchvision backbones, cut into stages at their resolution changes.

Weights come from torchvision's weight enums (download once into the torch hub cache; torchvision
checks the hash prefix in the file name). The torchvision model is built whole - so its own
state-dict quirks (DenseNet's old key names, ...) are handled by torchvision - and then taken
apart into stages; nothing is re-implemented, so the parameters are torchvision's own.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from pneumoscope.errors import ModelError
from pneumoscope.models.card import ModelCard, WeightSource
from pneumoscope.models.net import BackboneParts, SelectClassToken, global_avg_pool
from pneumoscope.models.registry import register_model
from pneumoscope.models.weights import download

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TV_LICENSE = (
    "BSD-3-Clause (torchvision); weights trained on ImageNet-1k - check the ImageNet terms of access "
    "before commercial use"
)


def _tv(ident: str) -> WeightSource:
    return WeightSource(kind="torchvision", ident=ident, sha256=None, license=_TV_LICENSE)


def _card(
    name: str,
    family: str,
    cam_layer: str,
    first_conv: str,
    num_features: int,
    weights: tuple[str, ...],
    notes: str,
    **kw: Any,
) -> ModelCard:
    """A torchvision card: 3 channels, ImageNet mean/std, 224 px (the weights' crop size)."""
    return ModelCard(
        name=name,
        family=family,
        input_size=224,
        in_chans=3,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        cam_layer=cam_layer,
        first_conv=first_conv,
        num_features=num_features,
        weights=tuple(_tv(w) for w in weights),
        license="BSD-3-Clause",
        notes=notes,
        **kw,
    )


def _tv_model(arch: str, source: WeightSource | None, **tv_kwargs: Any) -> nn.Module:
    """The whole torchvision model, with ``source``'s weights (download or cache) or random init."""
    import torchvision

    if source is None:
        return torchvision.models.get_model(arch, weights=None, **tv_kwargs)
    if source.kind != "torchvision":
        raise ModelError(f"{arch}: weight source {source.tag} is not a torchvision source")
    weights = torchvision.models.get_weight(source.ident)
    return download(source, lambda: torchvision.models.get_model(arch, weights=weights, progress=False, **tv_kwargs))


def _seq(**modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(modules))


def _indexed(features: nn.Sequential, indices: range) -> nn.Sequential:
    """A stage made of ``features[i]`` for ``i`` in ``indices``, keeping torchvision's indices as names."""
    return nn.Sequential(OrderedDict((str(i), features[i]) for i in indices))


# ------------------------------------------------------------------------------------ ResNet
def _resnet(arch: str, source: WeightSource | None) -> BackboneParts:
    m = _tv_model(arch, source)
    stem = _seq(conv1=m.conv1, bn1=m.bn1, relu=m.relu, maxpool=m.maxpool)
    return BackboneParts(
        stages=[stem, m.layer1, m.layer2, m.layer3, m.layer4], pool=global_avg_pool(), imagenet_classifier=m.fc
    )


_RESNET_NOTES = "Stages: stem (conv1+bn+relu+maxpool, /4), layer1 (/4), layer2 (/8), layer3 (/16), layer4 (/32)."


@register_model(
    "resnet18",
    _card("resnet18", "resnet", "stages.4", "stages.0.conv1", 512, ("ResNet18_Weights.IMAGENET1K_V1",), _RESNET_NOTES),
)
def build_resnet18(source: WeightSource | None) -> BackboneParts:
    return _resnet("resnet18", source)


@register_model(
    "resnet50",
    _card(
        "resnet50", "resnet", "stages.4", "stages.0.conv1", 2048,
        ("ResNet50_Weights.IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V1"),
        _RESNET_NOTES + " V2 weights (80.9% top-1, newer recipe) preferred over V1 (76.1%).",
    ),
)
def build_resnet50(source: WeightSource | None) -> BackboneParts:
    return _resnet("resnet50", source)


# ---------------------------------------------------------------------------------- DenseNet
@register_model(
    "densenet121",
    _card(
        "densenet121", "densenet", "stages.4", "stages.0.conv0", 1024, ("DenseNet121_Weights.IMAGENET1K_V1",),
        "Stages: stem (conv0+norm0+relu0+pool0, /4), denseblock1+transition1, denseblock2+transition2, "
        "denseblock3+transition3, denseblock4+norm5+ReLU (/32; the ReLU torchvision applies in forward). "
        "CheXNet (Rajpurkar et al. 2017) used this backbone.",
    ),
)
def build_densenet121(source: WeightSource | None) -> BackboneParts:
    m = _tv_model("densenet121", source)
    f = m.features
    stages = [
        _seq(conv0=f.conv0, norm0=f.norm0, relu0=f.relu0, pool0=f.pool0),
        _seq(denseblock1=f.denseblock1, transition1=f.transition1),
        _seq(denseblock2=f.denseblock2, transition2=f.transition2),
        _seq(denseblock3=f.denseblock3, transition3=f.transition3),
        _seq(denseblock4=f.denseblock4, norm5=f.norm5, relu5=nn.ReLU()),
    ]
    return BackboneParts(stages=stages, pool=global_avg_pool(), imagenet_classifier=m.classifier)


# ------------------------------------------------------------------------------ EfficientNet
@register_model(
    "efficientnet_b0",
    _card(
        "efficientnet_b0", "efficientnet", "stages.8", "stages.0.0", 1280, ("EfficientNet_B0_Weights.IMAGENET1K_V1",),
        "Stages = torchvision features[0] (stem, /2), features[1..7] (MBConv groups; /2,/4,/8,/16,/16,/32,/32), "
        "features[8] (1x1 conv head, 1280 ch). torchvision's Dropout(0.2) before the classifier is the "
        "head's dropout here (pass dropout=0.2 to match).",
    ),
)
def build_efficientnet_b0(source: WeightSource | None) -> BackboneParts:
    m = _tv_model("efficientnet_b0", source)
    return BackboneParts(stages=list(m.features), pool=global_avg_pool(), imagenet_classifier=m.classifier[1])


# --------------------------------------------------------------------------------- MobileNet
def _mobilenet(arch: str, source: WeightSource | None, groups: tuple[range, ...]) -> BackboneParts:
    m = _tv_model(arch, source)
    cls = m.classifier  # Linear(C, hidden) -> Hardswish -> Dropout -> Linear(hidden, 1000)
    pre_logits = _seq(fc=cls[0], act=cls[1])
    return BackboneParts(
        stages=[_indexed(m.features, r) for r in groups],
        pool=global_avg_pool(),
        pre_logits=pre_logits,
        imagenet_classifier=cls[3],
    )


_MBV3_NOTES = (
    "Stages group torchvision features[i] (names kept) by output stride /2, /4, /8, /16, /32; the last "
    "ends with the final 1x1 conv. pre_logits = torchvision's pretrained Linear+Hardswish after pooling, "
    "so num_features is its width."
)


@register_model(
    "mobilenet_v3_large",
    _card(
        "mobilenet_v3_large", "mobilenet", "stages.4", "stages.0.0.0", 1280,
        ("MobileNet_V3_Large_Weights.IMAGENET1K_V2", "MobileNet_V3_Large_Weights.IMAGENET1K_V1"),
        _MBV3_NOTES + " Stages: [0,1], [2,3], [4-6], [7-12], [13-16].",
    ),
)
def build_mobilenet_v3_large(source: WeightSource | None) -> BackboneParts:
    groups = (range(0, 2), range(2, 4), range(4, 7), range(7, 13), range(13, 17))
    return _mobilenet("mobilenet_v3_large", source, groups)


@register_model(
    "mobilenet_v3_small",
    _card(
        "mobilenet_v3_small", "mobilenet", "stages.4", "stages.0.0.0", 1024,
        ("MobileNet_V3_Small_Weights.IMAGENET1K_V1",),
        _MBV3_NOTES + " Stages: [0], [1], [2,3], [4-8], [9-12].",
    ),
)
def build_mobilenet_v3_small(source: WeightSource | None) -> BackboneParts:
    groups = (range(0, 1), range(1, 2), range(2, 4), range(4, 9), range(9, 13))
    return _mobilenet("mobilenet_v3_small", source, groups)


# ---------------------------------------------------------------------------------- ConvNeXt
@register_model(
    "convnext_tiny",
    _card(
        "convnext_tiny", "convnext", "stages.4", "stages.0.0", 768, ("ConvNeXt_Tiny_Weights.IMAGENET1K_V1",),
        "Stages: stem (patchify 4x4 + LayerNorm, /4), stage1, downsample+stage2 (/8), downsample+stage3 (/16), "
        "downsample+stage4 (/32). pre_logits = torchvision's pretrained LayerNorm applied after pooling. "
        "Stochastic depth 0.1 (torchvision default) is active in training.",
    ),
)
def build_convnext_tiny(source: WeightSource | None) -> BackboneParts:
    m = _tv_model("convnext_tiny", source)
    f = m.features
    norm2d = m.classifier[0]  # LayerNorm2d on (N, C, 1, 1) == LayerNorm on (N, C)
    norm = nn.LayerNorm(norm2d.normalized_shape, eps=norm2d.eps)
    norm.load_state_dict(norm2d.state_dict())
    stages = [
        f[0],
        f[1],
        _seq(downsample=f[2], blocks=f[3]),
        _seq(downsample=f[4], blocks=f[5]),
        _seq(downsample=f[6], blocks=f[7]),
    ]
    return BackboneParts(
        stages=stages, pool=global_avg_pool(), pre_logits=_seq(norm=norm), imagenet_classifier=m.classifier[2]
    )


# ------------------------------------------------------------------------------------- ViT
class VitEmbed(nn.Module):
    """torchvision ViT input processing as one stage: patchify, prepend class token, add position
    embedding, dropout. Output: tokens ``(N, 1 + (H/16)*(W/16), hidden)``."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout
        self.image_size = vit.image_size
        self.patch_size = vit.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h != self.image_size or w != self.image_size:
            raise ModelError(
                f"vit: input must be {self.image_size}x{self.image_size} (the position embedding's size), got {h}x{w}; "
                "build with image_size=... to change it"
            )
        x = self.conv_proj(x)  # (N, hidden, h', w')
        x = x.flatten(2).transpose(1, 2)  # (N, h'*w', hidden)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


@register_model(
    "vit_b_16",
    _card(
        "vit_b_16", "vit", "stages.4.block11.ln_1", "stages.0.conv_proj", 768, ("ViT_B_16_Weights.IMAGENET1K_V1",),
        "Stages: embedding (patchify 16x16 + class token + position embedding), then the 12 encoder blocks "
        "in 4 stages of 3 (the last ends with the final LayerNorm). Pooling takes the class token. "
        "Grad-CAM hooks the last block's ln_1 and needs cam_reshape='vit' (drop class token, tokens -> "
        "(h, w) grid with h = w = image_size/16). Fixed input size: build with image_size=N (multiple of 16) "
        "for other sizes; pretrained position embeddings are then bicubically interpolated. "
        "Note: the IMAGENET1K_V1 weights were trained with resize 256 / crop 224, bilinear.",
        fixed_input_size=True,
        cam_reshape="vit",
    ),
)
def build_vit_b_16(source: WeightSource | None, image_size: int = 224) -> BackboneParts:
    from torchvision.models.vision_transformer import interpolate_embeddings

    if image_size < 16 or image_size % 16:
        raise ModelError(f"vit_b_16: image_size must be a positive multiple of 16, got {image_size}")
    if source is None:
        m = _tv_model("vit_b_16", None, image_size=image_size)
    else:
        pre = _tv_model("vit_b_16", source)  # pretrained at 224 (torchvision requires it)
        if image_size == pre.image_size:
            m = pre
        else:
            state = interpolate_embeddings(image_size, pre.patch_size, pre.state_dict())
            m = _tv_model("vit_b_16", None, image_size=image_size)
            m.load_state_dict(state)
    layers = list(m.encoder.layers)
    stages: list[nn.Module] = [VitEmbed(m)]
    for g in range(4):
        blocks = OrderedDict((f"block{i}", layers[i]) for i in range(3 * g, 3 * g + 3))
        if g == 3:
            blocks["ln"] = m.encoder.ln
        stages.append(nn.Sequential(blocks))
    return BackboneParts(
        stages=stages,
        pool=SelectClassToken(),
        imagenet_classifier=m.heads.head,
        card_overrides={"input_size": image_size},
    )
