"""Classifier heads that sit after global pooling.

Three kinds, each reproducing a head used by the seed notebooks so their results can be compared
like for like:

* ``'linear'``: Dropout → Linear, the torchvision/timm default (and the only head whose weights
  can be taken from an ImageNet classifier).
* ``'mlp'``: the ResNet-50 notebook head, in → 512 → BatchNorm1d → ReLU → Dropout(0.4) → 128 →
  ReLU → classes.
* ``'bn512'``: the EfficientNet notebook head, BatchNorm1d(in) → 512 → ReLU → Dropout(0.3) → classes.

``dropout=None`` means "the kind's default" (0.0 / 0.4 / 0.3). Heads with BatchNorm1d need a
batch of at least 2 in training mode, as any BatchNorm does.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from pneumoscope.errors import ModelError

HEAD_KINDS = ("linear", "mlp", "bn512")
DEFAULT_DROPOUT = {"linear": 0.0, "mlp": 0.4, "bn512": 0.3}


def build_head(kind: str, in_features: int, num_classes: int, dropout: float | None) -> nn.Module:
    """Build a classifier head mapping pooled features ``(N, in_features)`` to logits ``(N, num_classes)``.

    Modules are named (``fc``, ``fc1``, ``bn``, ...) so state-dict keys stay readable and stable.
    """
    if kind not in HEAD_KINDS:
        raise ModelError(f"unknown head {kind!r}; choose one of {HEAD_KINDS}")
    if in_features < 1 or num_classes < 1:
        raise ModelError(f"head needs positive sizes, got in_features={in_features}, num_classes={num_classes}")
    p = DEFAULT_DROPOUT[kind] if dropout is None else float(dropout)
    if not 0.0 <= p < 1.0:
        raise ModelError(f"head dropout must be in [0, 1), got {dropout}")

    if kind == "linear":
        layers = [("drop", nn.Dropout(p)), ("fc", nn.Linear(in_features, num_classes))]
    elif kind == "mlp":
        layers = [
            ("fc1", nn.Linear(in_features, 512)),
            ("bn", nn.BatchNorm1d(512)),
            ("act1", nn.ReLU()),
            ("drop", nn.Dropout(p)),
            ("fc2", nn.Linear(512, 128)),
            ("act2", nn.ReLU()),
            ("fc", nn.Linear(128, num_classes)),
        ]
    else:  # bn512
        layers = [
            ("bn", nn.BatchNorm1d(in_features)),
            ("fc1", nn.Linear(in_features, 512)),
            ("act", nn.ReLU()),
            ("drop", nn.Dropout(p)),
            ("fc", nn.Linear(512, num_classes)),
        ]
    return nn.Sequential(OrderedDict(layers))


def final_linear(head: nn.Module) -> nn.Linear:
    """The Linear that produces the logits (``head.fc`` for every kind built here)."""
    fc = getattr(head, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise ModelError("classifier head has no final Linear named 'fc'")
    return fc
