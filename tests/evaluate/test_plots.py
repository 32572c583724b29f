"""Every plot writes a non-empty PNG of the expected size atomically, and refuses bad input."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pneumoscope.evaluate.calibration import reliability_curve
from pneumoscope.evaluate.metrics import multiclass_metrics
from pneumoscope.evaluate.plots import (
    plot_confusion,
    plot_coverage,
    plot_pr,
    plot_reliability,
    plot_roc,
    plot_training_curves,
    training_phase_starts,
)
from pneumoscope.evaluate.uncertainty import predictive_entropy, selective_prediction_curve


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def _check(path: Path, out: Path, size: tuple[int, int] | None = (600, 480)) -> None:
    assert out == path and path.stat().st_size > 5000
    w, h = _png_size(path)
    if size is not None:
        assert (w, h) == size
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


@pytest.fixture()
def scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = 1 / (1 + np.exp(-(rng.normal(size=200) + 2 * (2 * y - 1))))
    return y, p


def test_roc_and_pr(tmp_path, scores):
    y, p = scores
    curves = {"test": (y, p), "validation": (y[:100], p[:100])}
    _check(tmp_path / "roc" / "roc.png", plot_roc(curves, tmp_path / "roc" / "roc.png", {"test": 0.5}))
    _check(tmp_path / "pr" / "pr.png", plot_pr(curves, tmp_path / "pr" / "pr.png", {"validation": 0.3}))
    with pytest.raises(ValueError, match="not among the curves"):
        plot_roc(curves, tmp_path / "x.png", {"train": 0.5})
    with pytest.raises(ValueError, match="both classes"):
        plot_roc({"bad": (np.ones(5, int), np.linspace(0, 1, 5))}, tmp_path / "x.png")


def test_confusion(tmp_path, scores):
    y, p = scores
    cm = multiclass_metrics(y, np.c_[1 - p, p], ["NORMAL", "PNEUMONIA"])["confusion"]
    _check(tmp_path / "cm.png", plot_confusion(np.array(cm), ["NORMAL", "PNEUMONIA"], tmp_path / "cm.png", "Test"))
    with pytest.raises(ValueError, match="square"):
        plot_confusion(np.zeros((2, 3)), ["a", "b"], tmp_path / "bad.png")


def test_reliability_before_and_after(tmp_path, scores):
    y, p = scores
    before = reliability_curve(y, p)
    after = reliability_curve(y, np.clip(0.5 + 0.6 * (p - 0.5), 0, 1))
    _check(tmp_path / "a" / "rel.png", plot_reliability(before, after, tmp_path / "a" / "rel.png"))
    _check(tmp_path / "b" / "rel.png", plot_reliability(before, None, tmp_path / "b" / "rel.png"))
    with pytest.raises(ValueError, match="reliability_curve"):
        plot_reliability({"accuracy": []}, None, tmp_path / "c.png")


def test_coverage(tmp_path, scores):
    y, p = scores
    curve = selective_prediction_curve(y, p, predictive_entropy(p))
    _check(tmp_path / "cov.png", plot_coverage(curve, tmp_path / "cov.png"))


def test_training_curves_with_and_without_optional_columns(tmp_path):
    epochs = np.arange(1, 11)
    full = pd.DataFrame(
        {
            "epoch": epochs,
            "train_loss": 1 / epochs,
            "val_loss": 1.2 / epochs,
            "train_auroc": 1 - 0.5 / epochs,
            "val_auroc": [np.nan if e % 2 else 1 - 0.6 / e for e in epochs],
            "lr": 1e-3 * 0.8**epochs,
        }
    )
    _check(tmp_path / "a" / "hist.png", plot_training_curves(full, tmp_path / "a" / "hist.png"), size=None)
    only_loss = full[["epoch", "train_loss"]]
    _check(tmp_path / "b" / "hist.png", plot_training_curves(only_loss, tmp_path / "b" / "hist.png"))
    three = _png_size(tmp_path / "a" / "hist.png")
    assert three[0] == 600 and three[1] > 480  # three stacked panels are taller
    with pytest.raises(ValueError, match="no loss"):
        plot_training_curves(full[["epoch"]], tmp_path / "c.png")


def test_training_curves_mark_where_each_later_phase_starts(tmp_path):
    hist = pd.DataFrame({"epoch": np.arange(1, 8), "phase": ["probe"] * 3 + ["finetune"] * 4,
                         "train_loss": np.linspace(1, 0.2, 7), "lr": [3e-3] * 3 + [3e-4] * 4})
    assert training_phase_starts(hist, hist["epoch"].to_numpy()) == [(3.5, "finetune")]
    assert training_phase_starts(hist.drop(columns="phase"), hist["epoch"].to_numpy()) == []
    _check(tmp_path / "p.png", plot_training_curves(hist, tmp_path / "p.png"), size=None)
