"""Deterministic preprocessing and the train/eval presets."""

from __future__ import annotations

import numpy as np
import torch

from pneumoscope.data.imageio import decode_image
from pneumoscope.data.preprocess import PreprocessSpec, preprocess, resize_gray
from pneumoscope.data.presets import AugmentSpec, EvalPreset, TrainPreset


def test_squash_and_pad_on_a_full_resolution_image(fullres_root):
    f = sorted(fullres_root.rglob("*.jp*g"))[0]
    img = decode_image(f)
    sq = preprocess(img, PreprocessSpec(size=128))
    pad = preprocess(img, PreprocessSpec(size=128, resize="pad"))
    assert sq.shape == pad.shape == (128, 128) and sq.dtype == np.uint8
    h, w = img.shape
    if h != w:  # padding keeps the aspect ratio: a uniform band on the short side
        band = pad[:, :2] if h > w else pad[:2, :]
        assert band.std() < 1.0


def test_preprocessing_is_deterministic_and_spec_key_changes(data_root):
    f = sorted((data_root / "train" / "NORMAL").iterdir())[0]
    img = decode_image(f)
    s1 = PreprocessSpec(size=96, clahe=True, blur_sigma=0.8)
    a, b = preprocess(img, s1), preprocess(img, s1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, preprocess(img, PreprocessSpec(size=96)))
    assert s1.key() != PreprocessSpec(size=96).key() and s1.key() == PreprocessSpec(size=96, clahe=True, blur_sigma=0.8).key()


def test_resize_pad_centres_a_wide_image():
    img = np.full((50, 100), 200, np.uint8)
    out = resize_gray(img, 40, "pad")
    assert out.shape == (40, 40) and (out[10:30] == 200).all()


def test_train_preset_changes_images_and_respects_seed():
    x = torch.arange(64 * 64, dtype=torch.int64).reshape(1, 64, 64).remainder(255).to(torch.uint8)
    aug = TrainPreset(AugmentSpec())
    torch.manual_seed(0)
    a = aug(x)
    torch.manual_seed(0)
    b = aug(x)
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, x)
    off = TrainPreset(AugmentSpec(hflip=0, rotate=0, translate=0, scale_min=1, scale_max=1, brightness=0, contrast=0))
    assert torch.equal(off(x), x) and not off.spec.enabled


def test_eval_preset_normalises_with_card_statistics():
    u8 = torch.full((2, 8, 8), 255, dtype=torch.uint8)
    x = EvalPreset(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), in_chans=3)(u8)
    assert x.shape == (2, 3, 8, 8) and torch.allclose(x, torch.ones_like(x))
    x1 = EvalPreset(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), in_chans=1)(u8)
    assert x1.shape == (2, 1, 8, 8)
    assert torch.allclose(x1, torch.full_like(x1, (1 - 0.449) / 0.226), atol=1e-3)


def test_one_channel_eval_preset_equals_the_three_channel_path(pick, data_root):
    """The in-place 1-channel fast path gives exactly the values of the broadcast 3-channel path."""
    u8 = torch.from_numpy(np.stack([preprocess(decode_image(p), PreprocessSpec(size=64)) for p in pick(data_root, "train", "NORMAL", 2)]))
    three = EvalPreset(mean=(0.5,) * 3, std=(0.5,) * 3, in_chans=3, channels_last=True)(u8)
    one = EvalPreset(mean=(0.5,), std=(0.5,), in_chans=1, channels_last=True)(u8)
    assert one.shape == (2, 1, *u8.shape[1:]) and one.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(one[:, 0], three[:, 0], atol=1e-6) and torch.allclose(three[:, 0], three[:, 2])


def test_contrast_is_taken_around_the_brightened_mean():
    """Brightness then contrast about the image's own mean: a flat image is unchanged by contrast."""
    flat = torch.full((1, 32, 32), 100, dtype=torch.uint8)
    only_contrast = TrainPreset(AugmentSpec(rotate=0, translate=0, scale_min=1, scale_max=1, brightness=0,
                                            contrast=0.5))
    assert torch.equal(only_contrast(flat), flat)
    ramp = (60 + torch.arange(32 * 32).reshape(1, 32, 32).remainder(80)).to(torch.uint8)  # no clipping
    torch.manual_seed(1)
    out = only_contrast(ramp).float()
    assert abs(out.mean().item() - ramp.float().mean().item()) < 1.0 and out.std() != ramp.float().std()


def test_adjust_sharpness_matches_torchvision_inside_the_border(pick, data_root):
    """Same blend as torchvision's ``adjust_sharpness`` (±1 grey level of rounding) away from the edge."""
    from torchvision.transforms.v2 import functional as TF

    from pneumoscope.data.presets import adjust_sharpness

    img = preprocess(decode_image(pick(data_root, "train", "NORMAL", 1)[0]), PreprocessSpec(size=128))
    assert adjust_sharpness(img, 1.0) is img
    for factor in (0.0, 0.3, 1.7, 2.0):
        ours = adjust_sharpness(img, factor).astype(int)
        ref = TF.adjust_sharpness(torch.from_numpy(img)[None], factor)[0].numpy().astype(int)
        assert np.abs(ours[1:-1, 1:-1] - ref[1:-1, 1:-1]).max() <= 1, factor
        assert not np.array_equal(ours, img)


def test_sharpness_augmentation_spans_the_class_gap_in_high_frequency_energy(pick, data_root):
    """The documented reason for ``sharpness: 1``: factors 0..2 move a real film's high-frequency
    energy further than the ~x0.75 gap between the train split's pneumonia and normal films."""
    import cv2

    from pneumoscope.data.presets import adjust_sharpness

    def hf(x):
        x = x.astype(np.float32)
        return np.abs(x - cv2.GaussianBlur(x, (0, 0), 0.7)).mean()

    imgs = [preprocess(decode_image(p), PreprocessSpec(size=224)) for p in pick(data_root, "train", "NORMAL", 8)]
    base = np.mean([hf(im) for im in imgs])
    assert np.mean([hf(adjust_sharpness(im, 0.0)) for im in imgs]) / base < 0.75
    assert np.mean([hf(adjust_sharpness(im, 2.0)) for im in imgs]) / base > 1 / 0.75
    aug = TrainPreset(AugmentSpec(rotate=0, translate=0, scale_min=1, scale_max=1, brightness=0, contrast=0,
                                  sharpness=1.0))
    assert aug.spec.enabled
    torch.manual_seed(0)
    out = aug.batch(torch.from_numpy(np.stack(imgs)))
    ratios = [hf(o.numpy()) / hf(i) for o, i in zip(out, imgs)]
    assert min(ratios) < 0.95 and max(ratios) > 1.05  # each image draws its own factor, both ways


def test_torch_augmentation_backend_gives_the_cv2_images_up_to_interpolation_rounding(pick, data_root):
    """The batched torch path (what a GPU batch uses) draws the same parameters and makes the same
    images as the per-image cv2 path, within the rounding of two bilinear implementations."""
    imgs = torch.from_numpy(np.stack([preprocess(decode_image(p), PreprocessSpec(size=128))
                                      for p in pick(data_root, "train", "PNEUMONIA", 6)]))
    for spec in (AugmentSpec(), AugmentSpec(hflip=0.5, rotate=15, sharpness=1.0),
                 AugmentSpec(rotate=0, translate=0, scale_min=1, scale_max=1, brightness=0.3, contrast=0.3)):
        aug = TrainPreset(spec)
        torch.manual_seed(3)
        ref = aug.batch(imgs, backend="cv2")
        torch.manual_seed(3)
        got = aug.batch(imgs, backend="torch")
        assert got.dtype == torch.uint8 and got.shape == ref.shape
        diff = (got.int() - ref.int()).abs().float()
        assert diff.mean() < 0.05, (spec, diff.mean())  # measured: <= 1e-4 (a grey level on a few pixels)
        assert diff.max() <= 2, spec
        assert not torch.equal(got, imgs)  # it did augment
    try:
        aug.batch(imgs, backend="pil")
    except ValueError as err:
        assert "pil" in str(err)
    else:
        raise AssertionError("an unknown backend was accepted")
