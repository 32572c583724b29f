"""``gan sample``: the requested class, PNG files, and a CSV the dataset scan reads cleanly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pneumoscope.data.scan import scan_dataset
from pneumoscope.data.tasks import task_labels
from pneumoscope.errors import ConfigError
from pneumoscope.gan.sample import generate, sample_command
from pneumoscope.gan.train import load_gan


def test_sample_one_class_scans_as_that_class(tmp_path, tiny_gan):
    df = sample_command(tiny_gan, "viral", 6, tmp_path / "syn")
    assert len(df) == 6 and set(df["label"]) == {"PNEUMONIA"} and set(df["subtype"]) == {"viral"}
    assert set(df["d_class"]) <= {"normal", "bacterial", "viral"}
    for rel in df["path"]:
        img = np.array(Image.open(tmp_path / "syn" / rel))
        assert img.shape == (16, 16) and img.dtype == np.uint8
    m = scan_dataset(tmp_path / "syn" / "samples.csv", progress=False)
    assert (m.df["status"] == "ok").all() and len(m.df) == 6
    assert set(m.df["subtype"]) == {"viral"} and set(m.df["split"]) == {"train"}
    assert m.df["patient_id"].nunique() == 6  # every synthetic image is its own patient
    _, y, _ = task_labels(m.df, "three_class")
    assert (y == 2).all()


def test_sample_all_appends_and_is_deterministic(tmp_path, tiny_gan):
    sample_command(tiny_gan, "viral", 2, tmp_path / "syn")
    first = np.array(Image.open(tmp_path / "syn" / "PNEUMONIA" / "synthetic_virus_s0_000000.png"))
    df = sample_command(tiny_gan, "all", 3, tmp_path / "syn")
    csv = pd.read_csv(tmp_path / "syn" / "samples.csv")
    assert len(csv) == 9 and csv["path"].is_unique  # the 2 viral rows were rewritten, not duplicated
    assert df.groupby("subtype").size().to_dict() == {"bacterial": 3, "normal": 3, "viral": 3}
    again = np.array(Image.open(tmp_path / "syn" / "PNEUMONIA" / "synthetic_virus_s0_000000.png"))
    assert np.array_equal(first, again)
    m = scan_dataset(tmp_path / "syn" / "samples.csv", progress=False)
    _, y, names = task_labels(m.df, "three_class")
    assert np.bincount(y).tolist() == [3, 3, 3] and names == ["normal", "bacterial", "viral"]
    assert sorted(m.df.loc[m.df["label"] == "NORMAL", "subtype"].unique()) == ["normal"]


def test_generate_depends_on_seed_and_class(tiny_gan):
    gan, _, _ = load_gan(tiny_gan)
    a, b, c = generate(gan, 0, 4, seed=0), generate(gan, 0, 4, seed=1), generate(gan, 2, 4, seed=0)
    assert a.shape == (4, 16, 16) and a.dtype == np.uint8
    assert np.array_equal(a, generate(gan, 0, 4, seed=0))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def test_unknown_class_is_refused(tmp_path, tiny_gan):
    with pytest.raises(ConfigError, match="normal, bacterial, viral"):
        sample_command(tiny_gan, "covid", 2, tmp_path / "x")
