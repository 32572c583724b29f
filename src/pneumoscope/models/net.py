"""``PneumoNet``: every registered backbone cut into ordered stages plus one classifier head.

Why stages: transfer learning on ~5k radiographs mostly trains only the top of a pretrained net.
With the backbone cut into stages (stem first, then one stage per resolution, the last one ending
in the final feature map), a freeze policy is a single number, the trainer can run the frozen
prefix once per image and cache its output (:meth:`PneumoNet.forward_until` /
:meth:`PneumoNet.forward_from`), and Grad-CAM can name its layer as a dotted path
(``card.cam_layer``) that is the same for every family.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from pneumoscope.errors import ModelError
from pneumoscope.models.card import ModelCard
from pneumoscope.models.heads import final_linear

logger = logging.getLogger(__name__)

FREEZE_POLICIES = ("none", "backbone", "last_n")


class SelectClassToken(nn.Module):
    """ViT "pooling": take the class token ``x[:, 0]`` from ``(N, tokens, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def global_avg_pool() -> nn.Module:
    """Adaptive average pool to 1×1 then flatten: ``(N, C, H, W) -> (N, C)`` for any input size."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


class ClassifierHead(nn.Module):
    """pool → pre_logits → classifier.

    ``pool`` turns the last feature map into a vector (global average pool; class token for ViT).
    ``pre_logits`` holds layers that belong to the *architecture* between pooling and the
    classifier and carry pretrained weights (ConvNeXt's LayerNorm, MobileNetV3's 960→1280
    Linear+Hardswish, the dense layers of the custom CNNs); it is ``Identity`` for most nets.
    ``classifier`` is the swappable part built by :func:`~pneumoscope.models.heads.build_head`.
    """

    def __init__(self, pool: nn.Module, pre_logits: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.pool = pool
        self.pre_logits = pre_logits
        self.classifier = classifier

    def forward_pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features entering the classifier, ``(N, card.num_features)`` (embeddings, t-SNE)."""
        return self.pre_logits(self.pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_pre_logits(x))


@dataclass
class BackboneParts:
    """What a registered builder returns; :func:`~pneumoscope.models.registry.create_model` adds the head.

    ``imagenet_classifier`` is the pretrained ImageNet Linear (or None): it is copied into a
    ``'linear'`` head when the requested ``num_classes`` matches, which is what lets the parity
    test compare our ImageNet logits with the reference implementation.
    ``card_overrides`` are card fields a builder argument changed (e.g. ViT ``image_size``).
    """

    stages: Sequence[nn.Module]
    pool: nn.Module
    pre_logits: nn.Module = field(default_factory=nn.Identity)
    imagenet_classifier: nn.Linear | None = None
    card_overrides: dict[str, Any] = field(default_factory=dict)


class PneumoNet(nn.Module):
    """A backbone as ``stages`` (an ``nn.ModuleList``) followed by ``head`` (a :class:`ClassifierHead`).

    ``forward(x) == head(forward_features(x))`` and, for every ``k``,
    ``forward_from(k, forward_until(x, k)) == forward(x)``.

    Attributes set by :func:`~pneumoscope.models.registry.create_model` and read by
    :func:`~pneumoscope.models.checkpoint_io.model_spec`: ``name``, ``card`` (the effective card:
    in_chans/mean/std already adapted), ``head_kind``, ``dropout``, ``build_kwargs`` and
    ``pretrained_source`` (``'kind:ident'`` of the loaded weights, or None for random init).
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        head: ClassifierHead,
        card: ModelCard,
        *,
        head_kind: str,
        dropout: float | None,
        build_kwargs: dict[str, Any] | None = None,
        pretrained_source: str | None = None,
    ) -> None:
        super().__init__()
        if len(stages) < 1:
            raise ModelError(f"{card.name}: a model needs at least one stage")
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.card = card
        self.name = card.name
        self.head_kind = head_kind
        self.dropout = dropout
        self.build_kwargs: dict[str, Any] = dict(build_kwargs or {})
        self.pretrained_source = pretrained_source

    # ------------------------------------------------------------------ forward passes
    @property
    def num_classes(self) -> int:
        return final_linear(self.head.classifier).out_features

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final (unpooled) feature map: all stages."""
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_until(self, x: torch.Tensor, stage_index: int) -> torch.Tensor:
        """Run ``stages[:stage_index]`` (the input itself for 0): what a trainer caches for a frozen prefix."""
        self._check_stage_index(stage_index)
        for stage in self.stages[:stage_index]:
            x = stage(x)
        return x

    def forward_from(self, stage_index: int, feats: torch.Tensor) -> torch.Tensor:
        """Run ``stages[stage_index:]`` and the head on ``feats`` (the output of stage ``stage_index - 1``).

        ``stage_index == num_stages`` runs the head alone on the final feature map.
        """
        self._check_stage_index(stage_index)
        for stage in self.stages[stage_index:]:
            feats = stage(feats)
        return self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def _check_stage_index(self, stage_index: int) -> None:
        if not isinstance(stage_index, int) or not 0 <= stage_index <= len(self.stages):
            raise ModelError(f"{self.name}: stage_index must be an int in [0, {len(self.stages)}], got {stage_index!r}")

    # ------------------------------------------------------------------ freezing
    def freeze(self, policy: str, trainable_stages: int = 0) -> "PneumoNet":
        """Set ``requires_grad`` by policy and put frozen stages in eval mode.

        * ``'none'``: everything trainable (fine-tune all).
        * ``'backbone'``: only the head trains (linear probe / feature extraction).
        * ``'last_n'``: the last ``trainable_stages`` stages and the head train.

        The head (including ``pre_logits``) is always trainable. Returns ``self``.
        """
        n = len(self.stages)
        n_frozen = self.frozen_stages_for(policy, trainable_stages)
        for i, stage in enumerate(self.stages):
            stage.requires_grad_(i >= n_frozen)
        self.head.requires_grad_(True)
        self.train(self.training)  # re-apply so newly frozen stages drop to eval mode now
        logger.debug("%s: freeze policy %r -> %d of %d stages frozen", self.name, policy, n_frozen, n)
        return self

    def frozen_stages_for(self, policy: str, trainable_stages: int = 0) -> int:
        """How many leading stages ``freeze(policy, trainable_stages)`` freezes (nothing is changed)."""
        n = len(self.stages)
        if policy == "none":
            return 0
        if policy == "backbone":
            return n
        if policy == "last_n":
            valid = isinstance(trainable_stages, int) and not isinstance(trainable_stages, bool)
            if not valid or not 0 <= trainable_stages <= n:
                raise ModelError(
                    f"{self.name}: freeze 'last_n' needs trainable_stages in [0, {n}], got {trainable_stages!r}"
                )
            return n - trainable_stages
        raise ModelError(f"{self.name}: unknown freeze policy {policy!r}; choose one of {FREEZE_POLICIES}")

    def stage_frozen(self, stage_index: int) -> bool:
        """True when no parameter of the stage requires a gradient."""
        return not any(p.requires_grad for p in self.stages[stage_index].parameters())

    def frozen_prefix(self) -> int:
        """How many leading stages are fully frozen (their output can be cached once per image)."""
        k = 0
        while k < len(self.stages) and self.stage_frozen(k):
            k += 1
        return k

    def train(self, mode: bool = True) -> "PneumoNet":
        """Like ``nn.Module.train`` but fully frozen stages stay in eval mode.

        A frozen stage must behave as a fixed function: its BatchNorm running statistics must not
        drift towards the X-ray batch statistics, and its dropout/stochastic depth must be off so
        a cached prefix output equals what the live stage would compute.
        """
        super().train(mode)
        if mode:
            for i, stage in enumerate(self.stages):
                if self.stage_frozen(i):
                    stage.train(False)
        return self

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_classes={self.num_classes}, pretrained_source={self.pretrained_source!r}"


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """DDP SyncBatchNorm conversion that keeps timm's fused BatchNorm+activation layers intact.

    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` turns timm's ``BatchNormAct2d`` (a
    ``BatchNorm2d`` subclass carrying the ReLU6 of the EfficientNet-Lite models) into a plain
    ``SyncBatchNorm`` and silently drops the activation - the converted model computes garbage.
    timm's converter maps it to ``SyncBatchNormAct`` and handles plain BatchNorms the same way as
    torch's, so it is safe for every registered model. The root module (and its card) is kept.
    """
    from timm.layers import convert_sync_batchnorm as _timm_convert

    return _timm_convert(model)

