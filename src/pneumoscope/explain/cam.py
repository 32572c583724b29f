"""Class activation maps for every registered model, through the maintained ``grad-cam`` package.

Why ``pytorch-grad-cam`` (Gildenblat et al., https://github.com/jacobgil/pytorch-grad-cam) rather
than our own hooks: it is the reference implementation of Grad-CAM (Selvaraju et al. 2017),
Grad-CAM++ (Chattopadhay et al. 2018), XGrad-CAM (Fu et al. 2020), Eigen-CAM (Muhammad & Yeasin
2020) and Layer-CAM (Jiang et al. 2021) behind one base class, its hooks are owned by one object
and released by its context manager, and its targets are small callables
(``ClassifierOutputTarget``, ``BinaryClassifierOutputTarget``). What we add is the part that is
specific to this package: the target layer and the reshape come from the model card, so the same
call works for every architecture of the registry.

Target layer per family (``card.cam_layer``, a dotted path inside
:class:`~pneumoscope.models.net.PneumoNet`; always the last spatial feature map, the lowest
resolution with the most class-specific channels):

=====================  =========================  ==========================================
family                 ``cam_layer``              what it is
=====================  =========================  ==========================================
custom (cnn3)          ``stages.2.act``           last ReLU before the final max-pool (/4)
custom (cnn5)          ``stages.4.act2``          last ReLU of block 5, before its pool (/16)
resnet18/50            ``stages.4``               ``layer4`` output (/32)
densenet121            ``stages.4``               denseblock4 + norm5 + ReLU (/32)
efficientnet_b0        ``stages.8``               1x1 conv head, 1280 channels (/32)
efficientnet_lite0-2   ``stages.8``               conv_head + bn2 (+ReLU6), 1280 channels (/32)
mobilenet_v3_*         ``stages.4``               final 1x1 conv stage (/32)
convnext_tiny          ``stages.4``               downsample + stage 4 (/32)
vit_b_16               ``stages.4.block11.ln_1``  tokens entering the last block's attention;
                                                  ``cam_reshape='vit'`` drops the class token and
                                                  reshapes to the 14x14 patch grid
=====================  =========================  ==========================================

(The ViT choice follows pytorch-grad-cam's own ViT tutorial: after the final LayerNorm only the
class token still carries gradient, so the last block's *input* norm is used.)

A CAM is normalised per image to [0, 1] (min-max, after the ReLU) by pytorch-grad-cam and
upsampled bilinearly to the input size; only *relative* attention within one image is meaningful.

>>> import torch
>>> from pneumoscope.models import create_model
>>> model = create_model("cnn3", num_classes=2)
>>> compute_cams(model, torch.randn(2, 1, 64, 64), target_class=1).shape
(2, 64, 64)

Concurrency: computing a CAM registers hooks on the model and temporarily turns off
``requires_grad`` on its parameters (gradients are only needed down to the target layer, so the
input is made to require grad instead: no parameter ``.grad`` is ever written). Do not run two CAMs
on the same model object at the same time (a server must hold a lock); plain predictions under
``torch.no_grad`` may run alongside.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget, ClassifierOutputTarget
from torch import nn

from pneumoscope.errors import ModelError

logger = logging.getLogger(__name__)

__all__ = [
    "CAM_METHODS",
    "compute_cams",
    "ensemble_cam",
    "predicted_classes",
    "reshape_transform_for",
    "target_layer",
    "vit_reshape",
]

#: CAM method name (as on the command line) → pytorch-grad-cam class.
CAM_METHODS: dict[str, type] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "eigencam": EigenCAM,
    "layercam": LayerCAM,
}

TargetClass = int | Sequence[int] | None


def _card(model: nn.Module):  # noqa: ANN202
    card = getattr(model, "card", None)
    if card is None or not getattr(card, "cam_layer", None):
        raise ModelError(f"{type(model).__name__}: no model card with a cam_layer; build models with create_model()")
    return card


def target_layer(model: nn.Module) -> nn.Module:
    """The module Grad-CAM hooks: ``model.get_submodule(model.card.cam_layer)``."""
    card = _card(model)
    try:
        return model.get_submodule(card.cam_layer)
    except AttributeError:
        raise ModelError(f"{card.name}: card cam_layer {card.cam_layer!r} is not a module of the model") from None


def vit_reshape(tokens: torch.Tensor) -> torch.Tensor:
    """ViT tokens ``(N, 1 + h*w, C)`` → feature map ``(N, C, h, w)``, dropping the class token (h = w)."""
    if tokens.ndim != 3:
        raise ModelError(f"vit reshape expects tokens (N, 1 + h*w, C), got shape {tuple(tokens.shape)}")
    n, t, c = tokens.shape
    side = math.isqrt(t - 1)
    if side * side != t - 1:
        raise ModelError(f"vit reshape: {t - 1} patch tokens do not form a square grid")
    return tokens[:, 1:, :].reshape(n, side, side, c).permute(0, 3, 1, 2)


_RESHAPES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"vit": vit_reshape}


def reshape_transform_for(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The reshape transform named by ``model.card.cam_reshape`` (None for CNN feature maps)."""
    kind = getattr(_card(model), "cam_reshape", None)
    if kind is None:
        return None
    try:
        return _RESHAPES[kind]
    except KeyError:
        raise ModelError(f"unknown cam_reshape {kind!r}; known: {sorted(_RESHAPES)}") from None


def _num_outputs(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if not isinstance(n, int):
        raise ModelError(f"{type(model).__name__}: cannot tell the number of outputs (no num_classes)")
    return n


def predicted_classes(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Class index per row from raw logits: argmax, or ``logit > 0`` for a single-logit (sigmoid) model."""
    z = logits.detach().cpu().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
    if z.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {z.shape}")
    if z.shape[1] == 1:
        return (z[:, 0] > 0).astype(np.int64)
    return z.argmax(1).astype(np.int64)


def _resolve_targets(model: nn.Module, x: torch.Tensor, target_class: TargetClass, batch_size: int) -> list[int]:
    n = len(x)
    n_out = _num_outputs(model)
    n_classes = 2 if n_out == 1 else n_out
    if target_class is None:
        with torch.no_grad():
            logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, n, batch_size)])
        classes = predicted_classes(logits).tolist()
    elif isinstance(target_class, (int, np.integer)) and not isinstance(target_class, bool):
        classes = [int(target_class)] * n
    else:
        classes = [int(c) for c in target_class]  # type: ignore[union-attr]
        if len(classes) != n:
            raise ValueError(f"target_class has {len(classes)} entries for {n} images")
    bad = [c for c in classes if not 0 <= c < n_classes]
    if bad:
        raise ValueError(f"target class {bad[0]} out of range for a {n_classes}-class model")
    return classes


def _targets(model: nn.Module, classes: list[int]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    if _num_outputs(model) == 1:
        # One sigmoid logit: class 1 follows +logit, class 0 follows -logit.
        return [BinaryClassifierOutputTarget(c) for c in classes]
    return [ClassifierOutputTarget(c) for c in classes]


@contextlib.contextmanager
def _cam_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration of a CAM; both restored afterwards.

    pytorch-grad-cam calls ``model.eval()``, ``model.zero_grad()`` and ``loss.backward()``. Freezing
    the parameters and differentiating w.r.t. the input instead skips the parameter gradients nobody
    needs; the mode, ``requires_grad`` flags and any existing ``.grad`` are put back afterwards, so a
    CAM can be taken from inside a training loop without disturbing it.
    """
    was_training = model.training
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        for p, _, _ in saved:
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            yield
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)


def compute_cams(
    model: nn.Module,
    x: torch.Tensor,
    target_class: TargetClass = None,
    method: str = "gradcam",
    *,
    batch_size: int = 16,
) -> np.ndarray:
    """CAMs ``(N, H, W)`` float32 in [0, 1] for normalised model inputs ``x`` ``(N, C, H, W)``.

    ``target_class``: one class index for all images, one per image, or None for each image's
    predicted class (argmax; ``logit > 0`` for single-logit models). Multi-logit models are
    explained with ``ClassifierOutputTarget`` (the class logit), single-logit sigmoid models with
    ``BinaryClassifierOutputTarget`` (category 1 = positive class). ``x`` may be channels_last.
    Hooks are released before returning, also on error.
    """
    try:
        cam_cls = CAM_METHODS[method]
    except KeyError:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {sorted(CAM_METHODS)}") from None
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"x must be a (N, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    h, w = x.shape[-2:]
    if len(x) == 0:
        return np.zeros((0, h, w), np.float32)
    layer = target_layer(model)
    reshape = reshape_transform_for(model)
    device = next(model.parameters()).device
    x = x.detach().to(device)
    out: list[np.ndarray] = []
    with _cam_mode(model):
        classes = _resolve_targets(model, x, target_class, batch_size)
        with cam_cls(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
            for i in range(0, len(x), batch_size):
                xi = x[i : i + batch_size].clone().requires_grad_(True)  # clone keeps channels_last
                try:
                    maps = cam(input_tensor=xi, targets=_targets(model, classes[i : i + batch_size]))
                except IndexError as err:
                    # pytorch-grad-cam's __exit__ swallows IndexError (and prints); never let it.
                    raise RuntimeError(f"{getattr(model, 'name', 'model')}: CAM failed: {err}") from err
                out.append(np.asarray(maps, dtype=np.float32).reshape(-1, h, w))
    cams = np.concatenate(out)
    np.clip(cams, 0.0, 1.0, out=cams)
    logger.debug("%s: %s on %d image(s) at layer %s", getattr(model, "name", "model"), method, len(cams),
                 _card(model).cam_layer)
    return cams


def ensemble_cam(
    models: Sequence[nn.Module],
    x: torch.Tensor | Sequence[torch.Tensor],
    target_class: TargetClass = None,
    method: str = "gradcam",
    *,
    batch_size: int = 16,
    out_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Mean of the members' CAMs ``(N, H, W)`` in [0, 1].

    ``x`` is one input tensor shared by all members, or one per member (members with different
    normalisation or input size); every member's CAM is resized to ``out_size`` (default: the first
    member's input size).
    With ``target_class=None`` each member explains its own predicted class; pass the ensemble's
    decision to explain one class. The mean is not re-normalised, so its peak is below 1 where the
    members disagree about where to look.
    """
    if not models:
        raise ValueError("ensemble_cam needs at least one model")
    xs = [x] * len(models) if isinstance(x, torch.Tensor) else list(x)
    if len(xs) != len(models):
        raise ValueError(f"got {len(xs)} inputs for {len(models)} models")
    h, w = out_size or xs[0].shape[-2:]
    total: np.ndarray | None = None
    for model, xi in zip(models, xs):
        cams = compute_cams(model, xi, target_class, method, batch_size=batch_size)
        if cams.shape[-2:] != (h, w):
            cams = _resize_stack(cams, (h, w))
        total = cams if total is None else total + cams
    assert total is not None
    return np.clip(total / len(models), 0.0, 1.0).astype(np.float32)


def _resize_stack(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    h, w = size
    return np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in cams]).astype(np.float32)
