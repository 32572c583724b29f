"""A tiny ACGAN trained once per session on 60 real images (16 px, a few steps) for the GAN tests."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY = {"size": 16, "width": 8, "batch_size": 8, "epochs": 2, "seed": 3}


def make_small_kermany(root: Path, data_root: Path, n: int = 16) -> Path:
    """Kermany-layout symlink tree: ``n`` normal, bacterial and viral train images, 4 of each in test."""
    for split, k in (("train", n), ("test", 4)):
        for cls, contains in (("NORMAL", ""), ("PNEUMONIA", "bacteria"), ("PNEUMONIA", "virus")):
            dst = root / split / cls
            dst.mkdir(parents=True, exist_ok=True)
            for src in sorted(p for p in (data_root / split / cls).iterdir() if contains in p.name)[:k]:
                (dst / src.name).symlink_to(src)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, data_root) -> Path:
    return make_small_kermany(tmp_path_factory.mktemp("tinydata") / "chest_xray", data_root)


@pytest.fixture(scope="session")
def tiny_gan(tmp_path_factory, tiny_data) -> Path:
    """A GAN directory trained for two epochs (10 steps) at 16 px."""
    from pneumoscope.gan.train import train_gan

    out = tmp_path_factory.mktemp("gan") / "gan"
    train_gan(tiny_data, out, config=TINY, cache_root=out.parent / "cache", progress=False)
    return out
