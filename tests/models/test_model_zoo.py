"""Every registered model, tested the same way (timm's idea: parametrise over ``list_models()``).

Each model is built once per module (random init, no network) and reused; every test first resets
it with ``freeze('none')``. Inputs are tiny (batch 2, 64 px; ViT is built with ``image_size=64``)
because these tests run on a shared 2-core CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pneumoscope.errors import ModelError
from pneumoscope.models import (
    PneumoNet,
    build_from_spec,
    convert_sync_batchnorm,
    create_model,
    list_models,
    load_model,
    load_weights,
    model_spec,
    save_model,
    save_weights,
)

from model_inputs import SIZE  # noqa: E402
from model_inputs import random_input as _input  # noqa: E402
from model_inputs import small_kwargs as _kwargs  # noqa: E402


@pytest.fixture(scope="module", params=list_models())
def model(request: pytest.FixtureRequest) -> PneumoNet:
    return create_model(request.param, num_classes=3, pretrained=False, **_kwargs(request.param))


@pytest.fixture()
def fresh(model: PneumoNet) -> PneumoNet:
    """The module's model, unfrozen, grads cleared, in train mode."""
    model.freeze("none")
    model.zero_grad(set_to_none=True)
    return model.train()


def test_card_matches_model(fresh: PneumoNet) -> None:
    card = fresh.card
    assert fresh.name == card.name and fresh.pretrained_source is None
    assert fresh.num_classes == 3
    assert isinstance(fresh.stages, nn.ModuleList) and len(fresh.stages) >= 3
    assert isinstance(fresh.get_submodule(card.cam_layer), nn.Module)
    first = fresh.get_submodule(card.first_conv)
    assert isinstance(first, nn.Conv2d) and first.in_channels == card.in_chans
    assert len(card.mean) == len(card.std) == card.in_chans
    fresh.eval()
    seen: list[torch.Tensor] = []
    hook = fresh.get_submodule(card.cam_layer).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            feats = fresh.forward_features(_input(fresh))
            assert fresh.head.forward_pre_logits(feats).shape == (2, card.num_features)
    finally:
        hook.remove()
    (cam,) = seen
    if card.cam_reshape is None:
        assert feats.ndim == 4, "CNN stages must end with an unpooled feature map"
        assert cam.ndim == 4 and cam.shape[-1] >= feats.shape[-1], "CAM layer must be a spatial map"
    else:  # 'vit': class token + a square grid of patch tokens
        side = SIZE // 16
        assert cam.shape[:2] == (2, 1 + side * side)


def test_forward_backward(fresh: PneumoNet) -> None:
    x = _input(fresh)
    out = fresh(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    missing = [n for n, p in fresh.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


def test_forward_from_equals_forward(fresh: PneumoNet) -> None:
    fresh.eval()
    x = _input(fresh)
    with torch.no_grad():
        expected = fresh(x)
        feats = x
        for k in range(len(fresh.stages) + 1):
            if k > 0:
                feats = fresh.stages[k - 1](feats)
            torch.testing.assert_close(fresh.forward_from(k, feats), expected, rtol=1e-5, atol=1e-6)
            if k in (0, len(fresh.stages)):
                torch.testing.assert_close(fresh.forward_until(x, k), feats, rtol=0, atol=0)
    with pytest.raises(ModelError):
        fresh.forward_from(len(fresh.stages) + 1, x)


def _stage_flags(model: PneumoNet) -> list[bool]:
    return [any(p.requires_grad for p in s.parameters()) for s in model.stages]


def test_freeze_policies(fresh: PneumoNet) -> None:
    n = len(fresh.stages)
    fresh.freeze("backbone")
    assert _stage_flags(fresh) == [False] * n and fresh.frozen_prefix() == n
    assert all(p.requires_grad for p in fresh.head.parameters())
    for k in (0, 1, n):
        fresh.freeze("last_n", trainable_stages=k)
        assert _stage_flags(fresh) == [False] * (n - k) + [True] * k
        assert fresh.frozen_prefix() == n - k
    fresh.freeze("none")
    assert all(p.requires_grad for p in fresh.parameters()) and fresh.frozen_prefix() == 0
    for bad in (("sometimes", 0), ("last_n", n + 1), ("last_n", -1)):
        with pytest.raises(ModelError):
            fresh.freeze(*bad)


def test_frozen_stages_stay_in_eval_mode(fresh: PneumoNet) -> None:
    n = len(fresh.stages)
    fresh.freeze("last_n", trainable_stages=1).train()
    for i, stage in enumerate(fresh.stages):
        expect = i == n - 1
        assert all(m.training == expect for m in stage.modules()), f"stage {i}"
    assert all(m.training for m in fresh.head.modules())

    # A train-mode step must neither move frozen BatchNorm statistics nor give frozen params grads.
    bns = [m for s in fresh.stages[: n - 1] for m in s.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    before = [bn.running_mean.clone() for bn in bns]
    fresh(_input(fresh)).sum().backward()
    for bn, old in zip(bns, before):
        assert torch.equal(bn.running_mean, old)
    for i, stage in enumerate(fresh.stages):
        for p in stage.parameters():
            assert (p.grad is not None) == (i == n - 1)
    fresh.freeze("none")
    assert all(m.training for m in fresh.modules())


def test_checkpoint_round_trip(fresh: PneumoNet, tmp_path: Path) -> None:
    fresh.eval()
    x = _input(fresh, batch=1)
    with torch.no_grad():
        expected = fresh(x)
    save_model(fresh, tmp_path / "ckpt")
    spec = json.loads((tmp_path / "ckpt" / "model.json").read_text())
    assert spec == json.loads(json.dumps(model_spec(fresh)))
    restored = load_model(tmp_path / "ckpt")
    assert restored.card == fresh.card and restored.num_classes == fresh.num_classes
    with torch.no_grad():
        torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)


def test_weights_must_fit(tmp_path: Path) -> None:
    model = create_model("cnn3", num_classes=2)
    path = save_weights(model, tmp_path / "w.safetensors")
    rebuilt = build_from_spec(model_spec(model))
    load_weights(rebuilt, path)
    for name, p in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], p)
    with pytest.raises(ModelError, match="do not fit"):
        load_weights(create_model("cnn3", num_classes=5), path)
    result = load_weights(create_model("cnn3", num_classes=2, head="mlp"), path, strict=False)
    assert "head.classifier.fc1.weight" in result.missing_keys


def test_fp16_weights_load_into_fp32_model(tmp_path: Path) -> None:
    model = create_model("cnn5", num_classes=2).eval()
    x = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    path = save_weights(model, tmp_path / "w16.safetensors", dtype=torch.float16)
    assert path.stat().st_size < 0.6 * save_weights(model, tmp_path / "w32.safetensors").stat().st_size
    restored = create_model("cnn5", num_classes=2).eval()
    load_weights(restored, path)
    assert restored.stages[0].conv1.weight.dtype == torch.float32
    assert restored.stages[0].bn1.num_batches_tracked.dtype == torch.int64
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_convert_sync_batchnorm_keeps_outputs(name: str) -> None:
    """torch's converter drops timm's fused BN activation (ReLU6); ours must not change outputs."""
    model = create_model(name).eval()
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
        converted = convert_sync_batchnorm(model).eval()
        assert converted is model and isinstance(converted, PneumoNet)
        assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
        torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)

