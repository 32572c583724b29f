"""``data.synthetic``: sampled images join the TRAIN portion of a classifier run only, never val or test."""

from __future__ import annotations

import pandas as pd
import pytest

from pneumoscope.config import load_config
from pneumoscope.errors import DatasetError
from pneumoscope.gan.sample import sample_command
from pneumoscope.train.fit import fit


def _fit(tmp_path, data, name, overrides):
    cfg = load_config("smoke", ["preprocess.size=32", "train.batch_size=16", "data.limit_per_class=null",
                                "task=three_class", *overrides])
    run = tmp_path / name
    return run, fit(cfg, run, data_root=data, cache_root=tmp_path / "cache", progress=False)


def test_synthetic_images_join_train_only(tmp_path, tiny_gan, tiny_data):
    sample_command(tiny_gan, "viral", 7, tmp_path / "syn")
    sample_command(tiny_gan, "normal", 5, tmp_path / "syn")
    plain, _ = _fit(tmp_path, tiny_data, "plain", [])
    run, summary = _fit(tmp_path, tiny_data, "with", [f"data.synthetic={tmp_path / 'syn'}",
                                                       "data.synthetic_per_class=6"])
    base = pd.read_csv(plain / "split.csv")
    split = pd.read_csv(run / "split.csv")
    syn = split[split["path"].str.contains("synthetic_")]
    assert set(syn["split"]) == {"train"}  # never val
    assert syn.groupby("subtype").size().to_dict() == {"normal": 5, "viral": 6}  # capped at 6 per class
    assert syn["path"].map(lambda p: p.startswith(str(tmp_path / "syn"))).all()
    # the real images and their train/val assignment are untouched by the option
    real = split.drop(syn.index)
    assert real.sort_values("path")[["path", "split"]].values.tolist() == \
        base.sort_values("path")[["path", "split"]].values.tolist()
    assert summary["class_names"] == ["normal", "bacterial", "viral"]
    # the run's validation counts are the real ones
    import json

    meta = json.loads(next((run / "checkpoints").glob("best-*/model.json")).read_text())
    base_meta = json.loads(next((plain / "checkpoints").glob("best-*/model.json")).read_text())
    assert meta["val_counts"] == base_meta["val_counts"]
    assert [a - b for a, b in zip(meta["train_counts"], base_meta["train_counts"])] == [5, 0, 6]


def test_synthetic_path_missing_is_a_one_line_error(tmp_path, tiny_data):
    with pytest.raises(DatasetError, match="data.synthetic: no such CSV or folder"):
        _fit(tmp_path, tiny_data, "bad", [f"data.synthetic={tmp_path / 'nope'}"])
