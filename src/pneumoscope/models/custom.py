"""The two small CNNs of the seed notebooks, trained from scratch on 1-channel 150×150 inputs.

Both use 'same' padding (the Keras notebooks used 'valid' for cnn3) and pool to a fixed size
before the dense layers instead of flattening the raw map, so any input size works (64 px in
tests, 150 px by default, larger for CAM). Grad-CAM hooks the last ReLU before the final
max-pool: the same activations as the stage output at twice the resolution.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from pneumoscope.models.card import ModelCard, WeightSource
from pneumoscope.models.net import BackboneParts, global_avg_pool
from pneumoscope.models.registry import register_model

# Round numbers close to the Kermany train set's pixel statistics on [0, 1] (a 307-image sample:
# mean 0.488, std 0.233); exactness does not matter for nets trained from scratch with BatchNorm.
_GRAY_MEAN = (0.5,)
_GRAY_STD = (0.25,)

CNN3_CARD = ModelCard(
    name="cnn3",
    family="custom",
    input_size=150,
    in_chans=1,
    mean=_GRAY_MEAN,
    std=_GRAY_STD,
    cam_layer="stages.2.act",
    first_conv="stages.0.conv",
    num_features=128,
    weights=(),
    license="Apache-2.0",
    notes=(
        "Notebook baseline CNN: 3 blocks conv3x3 (32, 64, 128) -> ReLU -> MaxPool2. The notebook "
        "flattened the 150 px map; here it is adaptive-average-pooled to 4x4 first so any input size "
        "works, then Linear(2048, 128) -> ReLU -> Dropout(0.5) (pre_logits) -> classifier head."
    ),
)

CNN5_CARD = ModelCard(
    name="cnn5",
    family="custom",
    input_size=150,
    in_chans=1,
    mean=_GRAY_MEAN,
    std=_GRAY_STD,
    cam_layer="stages.4.act2",
    first_conv="stages.0.conv1",
    num_features=64,
    weights=(),
    license="Apache-2.0",
    notes=(
        "Notebook 5-block CNN: each block is 2 x (conv3x3 -> BatchNorm -> ReLU) -> MaxPool2 -> "
        "Dropout(block_dropout=0.2), widths 32, 64, 128, 256, 512; global average pool -> "
        "Linear 512->128 -> ReLU -> Dropout(0.5) -> Linear 128->64 -> ReLU -> Dropout(0.3) "
        "(pre_logits) -> classifier head."
    ),
)


def _cnn3_block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            [
                ("conv", nn.Conv2d(in_ch, out_ch, 3, padding=1)),
                ("act", nn.ReLU()),
                ("pool", nn.MaxPool2d(2)),
            ]
        )
    )


def _cnn5_block(in_ch: int, out_ch: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)),
                ("bn1", nn.BatchNorm2d(out_ch)),
                ("act1", nn.ReLU()),
                ("conv2", nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)),
                ("bn2", nn.BatchNorm2d(out_ch)),
                ("act2", nn.ReLU()),
                ("pool", nn.MaxPool2d(2)),
                ("drop", nn.Dropout(dropout)),
            ]
        )
    )


def _scaled(widths: tuple[int, ...], width: float) -> list[int]:
    if not 0.0 < width <= 8.0:
        raise ValueError(f"width must be in (0, 8], got {width}")
    return [max(4, round(c * width)) for c in widths]


@register_model("cnn3", CNN3_CARD)
def build_cnn3(source: WeightSource | None, dense_dropout: float = 0.5, width: float = 1.0) -> BackboneParts:
    """Notebook baseline: three conv blocks; stages = the three blocks. ``dense_dropout`` is the notebook's 0.5;
    ``width`` multiplies the conv channels (the width axis of the experiment roadmap; 1.0 = the notebook)."""
    widths = (1, *_scaled((32, 64, 128), width))
    stages = [_cnn3_block(widths[i], widths[i + 1]) for i in range(3)]
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(1))
    pre_logits = nn.Sequential(
        OrderedDict([("fc", nn.Linear(widths[-1] * 16, 128)), ("act", nn.ReLU()), ("drop", nn.Dropout(dense_dropout))])
    )
    return BackboneParts(stages=stages, pool=pool, pre_logits=pre_logits)


@register_model("cnn5", CNN5_CARD)
def build_cnn5(source: WeightSource | None, block_dropout: float = 0.2, width: float = 1.0) -> BackboneParts:
    """Notebook 5-block CNN; stages = the five blocks (each halves the resolution); ``width`` multiplies the channels."""
    widths = (1, *_scaled((32, 64, 128, 256, 512), width))
    stages = [_cnn5_block(widths[i], widths[i + 1], block_dropout) for i in range(5)]
    pre_logits = nn.Sequential(
        OrderedDict(
            [
                ("fc1", nn.Linear(widths[-1], 128)),
                ("act1", nn.ReLU()),
                ("drop1", nn.Dropout(0.5)),
                ("fc2", nn.Linear(128, 64)),
                ("act2", nn.ReLU()),
                ("drop2", nn.Dropout(0.3)),
            ]
        )
    )
    return BackboneParts(stages=stages, pool=global_avg_pool(), pre_logits=pre_logits)
