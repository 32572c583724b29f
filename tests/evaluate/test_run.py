"""The evaluate runner on real images: outputs, CIs, and the protocol (nothing fitted on test labels)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from pneumoscope.errors import DatasetError
from pneumoscope.evaluate.run import evaluate_model


def _small_test_tree(root, data_root, pick, swap: bool):
    """A Kermany-layout ``test/`` with 12 + 12 real images, labels swapped if ``swap``."""
    for cls, other in (("NORMAL", "PNEUMONIA"), ("PNEUMONIA", "NORMAL")):
        dst = root / "test" / (other if swap else cls)
        dst.mkdir(parents=True, exist_ok=True)
        for f in pick(data_root, "test", cls, 12):
            shutil.copy(f, dst / f.name)
    return root


def test_evaluate_writes_everything_and_uses_only_validation_fitted_values(tmp_path, data_root, pick, smoke_run):
    cache = tmp_path / "cache"
    a = evaluate_model(smoke_run, _small_test_tree(tmp_path / "a", data_root, pick, swap=False), out=tmp_path / "ea",
                       bootstrap=200, tta=2, cache_root=cache, progress=False)
    for f in ("predictions.csv", "metrics.json", "metrics.md", "roc.png", "pr.png", "confusion.png",
              "reliability.png", "coverage.png"):
        assert (tmp_path / "ea" / f).exists(), f
    m = a["metrics"]
    assert m["tp"] + m["fn"] == 12 and m["tn"] + m["fp"] == 12
    for key in ("accuracy", "sensitivity", "specificity", "auroc"):
        ci = a["ci"][key]
        assert ci["lo"] <= m[key] + 1e-9 and m[key] - 1e-9 <= ci["hi"], key
    assert "0.5" in json.dumps(a["metrics_at_0.5"]["threshold"]) or a["metrics_at_0.5"]["threshold"] == 0.5
    pred = pd.read_csv(tmp_path / "ea" / "predictions.csv")
    assert len(pred) == 24 and {"prob_PNEUMONIA", "decision", "uncertainty", "refer", "patient_id"} <= set(pred.columns)
    assert len(a["errors"]) == int((~pred["correct"]).sum())

    # the same images with the test labels swapped: threshold, temperature, referral cut-off and the
    # probabilities are unchanged — nothing is fitted on the evaluated split's labels
    b = evaluate_model(smoke_run, _small_test_tree(tmp_path / "b", data_root, pick, swap=True), out=tmp_path / "eb",
                       bootstrap=200, tta=2, cache_root=cache, progress=False)
    assert a["threshold"] == b["threshold"] and a["temperature"] == b["temperature"]
    assert a["referral"]["uncertainty_threshold"] == b["referral"]["uncertainty_threshold"]
    pa = pd.read_csv(tmp_path / "ea" / "predictions.csv").set_index(pred["path"].map(lambda p: p.split("/")[-1]))
    pb = pd.read_csv(tmp_path / "eb" / "predictions.csv")
    pb = pb.set_index(pb["path"].map(lambda p: p.split("/")[-1]))
    pd.testing.assert_series_equal(pa["prob_PNEUMONIA"].sort_index(), pb["prob_PNEUMONIA"].sort_index())
    assert b["metrics"]["accuracy"] == pytest.approx(1 - a["metrics"]["accuracy"])


def test_class_set_mismatch_is_a_clear_error(tmp_path, data_root, pick, smoke_run):
    root = tmp_path / "other"
    for cls in ("CAT", "DOG"):
        (root / cls).mkdir(parents=True)
        for f in pick(data_root, "test", "NORMAL", 3):
            shutil.copy(f, root / cls / f.name)
    with pytest.raises(DatasetError, match="do not match the model's classes"):
        evaluate_model(smoke_run, root, split="all", out=tmp_path / "e", bootstrap=0, tta=0,
                       cache_root=tmp_path / "cache", progress=False)
