"""``train.dummy_class``: an extra output trained on mixed-class images, dropped for evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pneumoscope.config import load_config
from pneumoscope.errors import ConfigError
from pneumoscope.evaluate.run import evaluate_model
from pneumoscope.train.dummy import drop_dummy_output, make_dummy_examples, with_dummy_examples
from pneumoscope.train.fit import fit


def test_dummy_examples_blend_two_different_classes():
    images = np.stack([np.zeros((8, 8), np.uint8)] * 10 + [np.full((8, 8), 200, np.uint8)] * 10)
    labels = np.array([0] * 10 + [1] * 10)
    extra = make_dummy_examples(images, labels, 0.5, seed=0)
    assert extra.shape == (10, 8, 8)
    # 0 blended with 200 at lambda in [0.35, 0.65]: never a pure image of either class
    assert extra.min() >= 70 and extra.max() <= 130
    assert len(np.unique(extra)) > 1  # lambda varies
    assert np.array_equal(extra, make_dummy_examples(images, labels, 0.5, seed=0))
    imgs, ys = with_dummy_examples(images, labels, 2, 0.5, seed=0)
    assert imgs.shape == (30, 8, 8) and np.bincount(ys).tolist() == [10, 10, 10]


def test_drop_dummy_output_equals_renormalised_softmax():
    from pneumoscope.models import create_model

    torch.manual_seed(0)
    model = create_model("cnn3", num_classes=3, pretrained=False).eval()
    real = drop_dummy_output(model, 2).eval()
    x = torch.randn(4, model.card.in_chans, 64, 64)
    with torch.no_grad():
        full = torch.softmax(model(x), 1)[:, :2]
        sliced = torch.softmax(real(x), 1)
    assert real.num_classes == 2 and model.num_classes == 3
    assert torch.allclose(sliced, full / full.sum(1, keepdim=True), atol=1e-6)


def test_dummy_class_run_trains_and_evaluates_on_the_real_classes(tmp_path, small_kermany):
    cfg = load_config("smoke", ["preprocess.size=32", "train.batch_size=16", "train.dummy_class=true",
                                "train.dummy_fraction=0.25"])
    run = tmp_path / "run"
    summary = fit(cfg, run, data_root=small_kermany, cache_root=tmp_path / "cache", progress=False)
    assert summary["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert np.isfinite(summary["val_metrics"]["auroc"])
    best = json.loads((run / "checkpoints" / "best.json").read_text())["dir"]
    meta = json.loads((run / "checkpoints" / best / "model.json").read_text())
    n_train = int((__import__("pandas").read_csv(run / "split.csv")["split"] == "train").sum())
    assert meta["model"]["num_classes"] == 2 and sum(meta["train_counts"]) == n_train  # real images only
    assert len(meta["train_counts"]) == 2
    last = json.loads((run / "checkpoints" / "last.json").read_text())["dir"]
    w = load_file(str(run / "checkpoints" / last / "model.safetensors"))
    assert w["head.classifier.fc.weight"].shape[0] == 3  # the resumable checkpoint keeps the dummy output
    ev = evaluate_model(run, small_kermany, split="test", bootstrap=20, tta=0, cache_root=tmp_path / "cache",
                        progress=False)
    assert ev["class_names"] == ["NORMAL", "PNEUMONIA"] and ev["n_images"] == 12
    assert 0.0 <= ev["metrics"]["auroc"] <= 1.0


def test_dummy_class_with_bce_is_refused(tmp_path, small_kermany):
    cfg = load_config("smoke", ["preprocess.size=32", "train.dummy_class=true", "train.loss.name=bce"])
    with pytest.raises(ConfigError, match="dummy_class needs a softmax loss"):
        fit(cfg, tmp_path / "run", data_root=small_kermany, cache_root=tmp_path / "cache", progress=False)
