"""ACGAN training: checkpoints, deterministic resume, sample grids, refusal to overwrite."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pneumoscope.errors import ConfigError
from pneumoscope.gan.acgan import ACGAN
from pneumoscope.gan.train import load_gan, train_gan

from .conftest import TINY


def _ckpt(gan_dir):
    pointer = json.loads((gan_dir / "checkpoints" / "last.json").read_text())
    return gan_dir / "checkpoints" / pointer["dir"]


def test_tiny_gan_writes_checkpoint_grids_history_and_split(tiny_gan):
    ckpt = _ckpt(tiny_gan)
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.json", "model.safetensors", "optim_d.safetensors",
                                                      "optim_g.safetensors", "rng.safetensors", "state.json"]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["epoch"] == 2 and len(state["history"]) == 2
    weights = load_file(str(ckpt / "model.safetensors"))
    assert any(k.startswith("generator.") for k in weights) and any(k.startswith("discriminator.cls") for k in weights)
    for epoch in (1, 2):
        grid = Image.open(tiny_gan / "samples" / f"epoch_{epoch:03d}.png")
        # 16 px tiles upscaled x4 for viewing, 8 columns, one row per class, a label margin and a title line
        assert grid.size == (72 + 8 * 64, 16 + 3 * 64)
    split = __import__("pandas").read_csv(tiny_gan / "split.csv")
    assert set(split["split"]) == {"train", "val"}  # the official test split is never used for training
    assert not split["path"].str.contains("/test/").any()
    assert split.groupby("patient_id")["split"].nunique().max() == 1  # patients kept whole
    hist = __import__("pandas").read_csv(tiny_gan / "history.csv")
    assert list(hist["epoch"]) == [1, 2] and hist["loss_d"].notna().all()


def test_resumed_run_equals_uninterrupted_run(tmp_path, tiny_data, tiny_gan):
    out = tmp_path / "gan"
    train_gan(tiny_data, out, config={**TINY, "epochs": 1}, cache_root=tmp_path / "cache", progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train_gan(tiny_data, out, config=TINY, cache_root=tmp_path / "cache", progress=False)
    train_gan(tiny_data, out, config={"epochs": 2}, resume=True, cache_root=tmp_path / "cache", progress=False)
    a, b = _ckpt(tiny_gan), _ckpt(out)
    for name in ("model.safetensors", "optim_g.safetensors", "optim_d.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}:{k} differs after resume"
    ha = json.loads((a / "state.json").read_text())["history"]
    hb = json.loads((b / "state.json").read_text())["history"]
    assert [r["loss_d"] for r in ha] == [r["loss_d"] for r in hb]


def test_generator_is_conditioned_on_the_class(tiny_gan):
    gan, meta, _ = load_gan(tiny_gan)
    assert meta["class_names"] == ["normal", "bacterial", "viral"]
    z = torch.randn(4, gan.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = gan.generator(z, torch.zeros(4, dtype=torch.long))
        b = gan.generator(z, torch.full((4,), 2, dtype=torch.long))
    assert a.shape == (4, 1, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_model_shapes(size):
    gan = ACGAN(size=size, n_classes=3, z_dim=8, width=4)
    x = gan.generator(torch.randn(2, 8), torch.tensor([0, 2]))
    assert x.shape == (2, 1, size, size)
    adv, cls = gan.discriminator(x)
    assert adv.shape == (2,) and cls.shape == (2, 3)


def test_bad_size_is_a_config_error():
    with pytest.raises(ConfigError, match="power of two"):
        ACGAN(size=48)


def test_cli_train_and_sample(tmp_path, tiny_data, monkeypatch):
    from pneumoscope.cli import main

    monkeypatch.setenv("PNEUMOSCOPE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "g"
    assert main(["gan", "train", "--data", str(tiny_data), "--out", str(out), "--epochs", "1", "--size", "16",
                 "--width", "8", "--batch-size", "8", "--no-progress"]) == 0
    assert main(["gan", "train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert json.loads((_ckpt(out) / "state.json").read_text())["epoch"] == 2
    # every GanConfig field is reachable from the CLI; unknown keys are refused
    bce = tmp_path / "bce"
    assert main(["gan", "train", "--data", str(tiny_data), "--out", str(bce), "--epochs", "1", "--size", "16",
                 "--width", "8", "--batch-size", "8", "--set", "loss=bce", "--set", "minibatch_std=false",
                 "--set", "mode_seeking=0", "--no-progress"]) == 0
    saved = json.loads((bce / "config.json").read_text())["config"]
    assert (saved["loss"], saved["minibatch_std"], saved["mode_seeking"]) == ("bce", False, 0)
    assert main(["gan", "train", "--data", str(tiny_data), "--out", str(tmp_path / "x"), "--set", "lossy=1"]) == 2
    assert main(["gan", "sample", str(out), "--class", "bacterial", "-n", "3", "--out", str(tmp_path / "s")]) == 0
    assert len(list((tmp_path / "s" / "PNEUMONIA").glob("synthetic_bacteria_*.png"))) == 3
    assert main(["gan", "sample", str(out), "--class", "covid", "-n", "3", "--out", str(tmp_path / "s")]) == 2
    assert main(["gan", "sample", str(tmp_path / "nothing"), "--class", "viral", "--out", str(tmp_path / "s")]) == 2
    assert np.array(Image.open(next((tmp_path / "s" / "PNEUMONIA").glob("*.png")))).shape == (16, 16)
