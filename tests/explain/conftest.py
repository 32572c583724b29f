"""Fixtures for the explain tests: a few real radiographs and a tiny untrained predictor."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch


def _first(folder: Path, n: int, contains: str = "") -> list[Path]:
    return sorted(p for p in folder.iterdir() if contains in p.name)[:n]


@pytest.fixture(scope="session")
def xray_files(data_root: Path, fullres_root: Path) -> list[Path]:
    """12 real chest X-rays: 4 normal, 3 bacterial, 3 viral (224 px copies) and 2 full-resolution originals."""
    train = data_root / "train"
    files = (
        _first(train / "NORMAL", 4)
        + _first(train / "PNEUMONIA", 3, "bacteria")
        + _first(train / "PNEUMONIA", 3, "virus")
        + _first(fullres_root / "train" / "NORMAL", 1, "NORMAL2")
        + _first(fullres_root / "train" / "PNEUMONIA", 1, "bacteria")
    )
    assert len(files) == 12
    return files


def predictor_meta(name: str, size: int = 64, class_names: tuple[str, ...] = ("NORMAL", "PNEUMONIA")) -> dict:
    """The ``model.json`` content a trained run would have, for an untrained model."""
    return {
        "class_names": list(class_names),
        "preprocess": {"size": size, "resize": "squash", "clahe": False, "clahe_clip": 2.0, "clahe_grid": 8,
                       "blur_sigma": 0.0},
        "task": "binary" if len(class_names) == 2 else "multiclass",
        "threshold": {"threshold": 0.5} if len(class_names) == 2 else None,
        "temperature": 1.0,
        "model": {"name": name},
    }


@pytest.fixture(name="predictor_meta")
def predictor_meta_fixture() -> Callable[..., dict]:
    """:func:`predictor_meta` as a fixture (test modules do not import conftest)."""
    return predictor_meta


@pytest.fixture()
def make_predictor() -> Callable[..., object]:
    """``make_predictor(name='cnn3', size=64, class_names=...)``: a random-init Predictor (seeded)."""
    from pneumoscope.inference import Predictor
    from pneumoscope.models import create_model

    def make(name: str = "cnn3", size: int = 64, class_names: tuple[str, ...] = ("NORMAL", "PNEUMONIA")):
        with torch.random.fork_rng():  # deterministic init without touching the global RNG
            torch.manual_seed(0)
            model = create_model(name, num_classes=len(class_names), pretrained=False)
        return Predictor(model, predictor_meta(name, size, class_names))

    return make
