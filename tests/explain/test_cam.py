"""Grad-CAM for every registered architecture (random init, tiny inputs), targets, hooks and state.

Like tests/models, inputs are 64 px and ViT is built with ``image_size=64`` (a 4x4 token grid), so
the whole zoo runs in seconds on a shared 2-core CPU; the ViT reshape itself is also tested at the
real 14x14 grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from pneumoscope.errors import ModelError
from pneumoscope.explain.cam import (
    CAM_METHODS,
    compute_cams,
    ensemble_cam,
    predicted_classes,
    reshape_transform_for,
    target_layer,
    vit_reshape,
)
from pneumoscope.models import PneumoNet, create_model, list_models

from model_inputs import SIZE  # noqa: E402
from model_inputs import random_input as _input  # noqa: E402
from model_inputs import small_kwargs as _kwargs  # noqa: E402


def _create(name: str, **kwargs: Any) -> PneumoNet:
    """A random-init model, seeded without touching the global RNG (tests stay deterministic)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return create_model(name, pretrained=False, **kwargs)


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


def _check_cams(cams: np.ndarray, n: int) -> None:
    assert isinstance(cams, np.ndarray) and cams.dtype == np.float32
    assert cams.shape == (n, SIZE, SIZE)
    assert np.isfinite(cams).all()
    assert cams.min() >= 0.0 and cams.max() <= 1.0


@pytest.fixture(scope="module", params=list_models())
def model(request: pytest.FixtureRequest) -> PneumoNet:
    return _create(request.param, num_classes=2, **_kwargs(request.param))


def test_gradcam_every_model(model: PneumoNet) -> None:
    model.train()  # CAM must switch to eval and back
    flags = [p.requires_grad for p in model.parameters()]
    cams = compute_cams(model, _input(model), target_class=1, method="gradcam")
    _check_cams(cams, 2)
    assert _hooks(model) == 0, "CAM hooks left on the model"
    assert model.training, "training mode not restored"
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters()), "CAM wrote parameter gradients"


def test_gradcam_channels_last_matches(model: PneumoNet) -> None:
    """The Predictor runs CPU models in channels_last: the maps must not change."""
    x = _input(model)
    ref = compute_cams(model, x, [0, 1])
    model.to(memory_format=torch.channels_last)
    try:
        got = compute_cams(model, x.contiguous(memory_format=torch.channels_last), [0, 1])
    finally:
        model.to(memory_format=torch.contiguous_format)
    _check_cams(got, 2)
    np.testing.assert_allclose(got, ref, atol=2e-3)
    assert _hooks(model) == 0


@pytest.mark.parametrize("name", ["cnn3", "resnet18", "efficientnet_lite0"])
def test_gradcam_plusplus(name: str) -> None:
    m = _create(name, num_classes=2)
    cams = compute_cams(m, _input(m), target_class=None, method="gradcam++")
    _check_cams(cams, 2)
    assert _hooks(m) == 0


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_every_method_on_cnn3(method: str) -> None:
    m = _create("cnn3", num_classes=3)
    cams = compute_cams(m, _input(m, batch=3), target_class=[0, 1, 2], method=method)
    _check_cams(cams, 3)
    assert _hooks(m) == 0


def test_single_logit_model_uses_binary_target() -> None:
    """num_classes=1 (sigmoid): class 1 explains +logit, class 0 explains -logit."""
    m = _create("cnn3", num_classes=1)
    x = _input(m, batch=2)
    pos = compute_cams(m, x, target_class=1)
    neg = compute_cams(m, x, target_class=0)
    _check_cams(pos, 2)
    _check_cams(neg, 2)
    assert not np.allclose(pos, neg)
    with torch.no_grad():
        z = m.eval()(x)
    auto = compute_cams(m, x, target_class=None)
    expected = np.stack([(pos if c == 1 else neg)[i] for i, c in enumerate((z[:, 0] > 0).long().tolist())])
    np.testing.assert_allclose(auto, expected, atol=1e-5)


def test_existing_gradients_survive() -> None:
    """A CAM taken between ``backward()`` and ``optimizer.step()`` must not touch the gradients."""
    m = _create("cnn3", num_classes=2).train()
    m(_input(m)).sum().backward()
    before = {n: p.grad.clone() for n, p in m.named_parameters()}
    compute_cams(m, _input(m, seed=1), 0)
    assert all(torch.equal(p.grad, before[n]) for n, p in m.named_parameters())
    assert m.training


def test_predicted_class_default_and_batching() -> None:
    m = _create("cnn3", num_classes=2).eval()
    x = _input(m, batch=5)
    with torch.no_grad():
        pred = m(x).argmax(1).tolist()
    auto = compute_cams(m, x, None, batch_size=2)
    explicit = compute_cams(m, x, pred, batch_size=5)
    np.testing.assert_allclose(auto, explicit, atol=1e-5)
    assert predicted_classes(np.array([[0.3], [-0.1]])).tolist() == [1, 0]


def test_works_under_no_grad_and_with_frozen_model() -> None:
    m = _create("resnet18", num_classes=2)
    x = _input(m)
    ref = compute_cams(m, x, [0, 1])
    m.freeze("backbone")
    with torch.no_grad():
        cams = compute_cams(m, x, [0, 1])
    _check_cams(cams, 2)
    np.testing.assert_allclose(cams, ref, atol=1e-5)  # gradients did flow through the frozen stages
    assert cams.max() > 0.5
    assert m.frozen_prefix() == m.num_stages  # freezing restored


def test_bad_arguments() -> None:
    m = _create("cnn3", num_classes=2)
    x = _input(m)
    with pytest.raises(ValueError, match="unknown CAM method"):
        compute_cams(m, x, 1, method="scorecam++")
    with pytest.raises(ValueError, match="out of range"):
        compute_cams(m, x, 2)
    with pytest.raises(ValueError, match="2 images"):
        compute_cams(m, x, [0, 1, 1])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        compute_cams(m, x[0], 1)
    assert _hooks(m) == 0
    assert compute_cams(m, x[:0], 1).shape == (0, SIZE, SIZE)
    with pytest.raises(ModelError, match="card"):
        target_layer(nn.Conv2d(1, 1, 3))


def test_target_layer_and_reshape_from_card() -> None:
    m = _create("resnet18", num_classes=2)
    assert target_layer(m) is m.stages[4]
    assert reshape_transform_for(m) is None
    assert reshape_transform_for(_create("vit_b_16", num_classes=2, image_size=32)) is vit_reshape


def test_vit_reshape_drops_class_token() -> None:
    tokens = torch.arange(2 * (1 + 14 * 14) * 3, dtype=torch.float32).reshape(2, 1 + 14 * 14, 3)
    fmap = vit_reshape(tokens)
    assert fmap.shape == (2, 3, 14, 14)
    # patch token k (after the class token) is grid cell (k // 14, k % 14)
    assert torch.equal(fmap[1, :, 2, 5], tokens[1, 1 + 2 * 14 + 5])
    with pytest.raises(ModelError, match="square"):
        vit_reshape(torch.zeros(1, 1 + 10, 3))


def test_ensemble_cam_is_member_mean() -> None:
    a = _create("cnn3", num_classes=2)
    b = _create("resnet18", num_classes=2)
    xa = _input(a)
    xb = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(ensemble_cam([a, a], xa, 1), compute_cams(a, xa, 1), atol=1e-6)
    mixed = ensemble_cam([a, b], [xa, xb], [1, 0])
    _check_cams(mixed, 2)  # resized to the first member's input size
    assert _hooks(a) == 0 and _hooks(b) == 0
    with pytest.raises(ValueError):
        ensemble_cam([], xa)
