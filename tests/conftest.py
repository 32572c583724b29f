"""Shared fixtures: where the real X-rays are, and small copies of them for layout tests.

Tests read the real images from ``../shared/data`` (or ``$PNEUMOSCOPE_DATA``) and never copy the
dataset into the repository. When the folder is absent the tests that need it are skipped with a
reason that says where to get it.
"""

from __future__ import annotations

import os
from pathlib import Path

# One intra-op thread per test process: the tests run many tiny ops where thread start-up costs
# more than it saves (a measured 6x on this 2-core machine), and subprocesses inherit the same
# setting, so a run and its resumed continuation use the same reduction order.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
_SHARED = REPO.parent / "shared" / "data"


def _data_root() -> Path:
    env = os.environ.get("PNEUMOSCOPE_DATA")
    return Path(env) if env else _SHARED / "chest_xray"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The Kermany/Kaggle ``chest_xray`` folder (train/test × NORMAL/PNEUMONIA)."""
    root = _data_root()
    if not (root / "train").is_dir():
        pytest.skip(
            f"chest X-ray data not found at {root}: set PNEUMOSCOPE_DATA to the Kaggle "
            "'chest-xray-pneumonia' folder (or Mendeley doi:10.17632/rscbjbr9sj.2)"
        )
    return root


@pytest.fixture(scope="session")
def fullres_root() -> Path:
    """22 original full-resolution radiographs (grayscale and RGB, 462-1820 px)."""
    root = _SHARED / "chest_xray_fullres_sample"
    if not root.is_dir():
        pytest.skip(f"full-resolution sample not found at {root}")
    return root


def pick_images(root: Path, split: str, cls: str, n: int, contains: str = "") -> list[Path]:
    """The first ``n`` images (sorted, deterministic) of ``root/split/cls`` whose name contains ``contains``."""
    files = sorted(p for p in (root / split / cls).iterdir() if contains in p.name)
    return files[:n]


@pytest.fixture(scope="session")
def pick():
    """:func:`pick_images` as a fixture (test modules cannot import conftest reliably)."""
    return pick_images


@pytest.fixture()
def small_kermany(tmp_path: Path, data_root: Path) -> Path:
    """A Kermany-layout tree of 60 real images (symlinks), patients kept whole: 20 normal, 20 bacterial, 20 viral."""
    root = tmp_path / "chest_xray"
    for split, n in (("train", 16), ("test", 4)):
        for cls, contains in (("NORMAL", ""), ("PNEUMONIA", "bacteria"), ("PNEUMONIA", "virus")):
            dst = root / split / cls
            dst.mkdir(parents=True, exist_ok=True)
            for src in pick_images(data_root, split, cls, n, contains):
                (dst / src.name).symlink_to(src)
    return root


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, data_root) -> Path:
    """A real (tiny) training run: the notebook CNN, 48 px, 40 images per class, 1 epoch."""
    from pneumoscope.config import load_config
    from pneumoscope.train.fit import fit

    run = tmp_path_factory.mktemp("smoke") / "run"
    cfg = load_config("smoke", ["data.limit_per_class=40", "preprocess.size=48", "train.batch_size=16"])
    fit(cfg, run, data_root=data_root, cache_root=run.parent / "cache", progress=False)
    return run
