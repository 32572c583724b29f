"""The evaluate runner on real images: outputs, CIs, and the protocol (nothing fitted on test labels)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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


def test_metrics_are_the_single_pass_predictors_whatever_the_tta(tmp_path, data_root, pick, smoke_run):
    """What evaluate reports is what predict/serve answer: TTA changes the uncertainty, never the
    probabilities or the metrics; and the referral record carries the single-pass cut-off that a
    bundle stores, fitted on the single-pass entropy of validation."""
    from pneumoscope.evaluate.uncertainty import predictive_entropy
    from pneumoscope.inference import Predictor
    from pneumoscope.predict import predict_files

    tree = _small_test_tree(tmp_path / "t", data_root, pick, swap=False)
    cache = tmp_path / "cache"
    plain = evaluate_model(smoke_run, tree, out=tmp_path / "e0", bootstrap=0, tta=0, cache_root=cache, progress=False)
    tta = evaluate_model(smoke_run, tree, out=tmp_path / "e3", bootstrap=0, tta=3, cache_root=cache, progress=False)
    assert plain["metrics"] == tta["metrics"]
    p0, p3 = (pd.read_csv(tmp_path / d / "predictions.csv") for d in ("e0", "e3"))
    pd.testing.assert_series_equal(p0["prob_PNEUMONIA"], p3["prob_PNEUMONIA"])
    assert not p0["uncertainty"].equals(p3["uncertainty"])
    assert plain["referral"]["single_pass_threshold"] == plain["referral"]["uncertainty_threshold"]
    assert tta["referral"]["single_pass_threshold"] == plain["referral"]["single_pass_threshold"]
    # the served predictor gives the same probabilities and single-pass uncertainty
    served, _ = predict_files(Predictor.load(smoke_run), list(p0["path"]), out=None, progress=False)
    assert served["prob_PNEUMONIA"].to_numpy() == pytest.approx(p0["prob_PNEUMONIA"].to_numpy(), abs=1e-6)
    assert served["uncertainty"].to_numpy() == pytest.approx(
        predictive_entropy(p0[["prob_NORMAL", "prob_PNEUMONIA"]].to_numpy()), abs=1e-5)


def test_bundle_stores_the_single_pass_referral_cut_off(tmp_path, data_root, pick, smoke_run):
    """A TTA evaluation fits its own cut-off on TTA entropy; the bundle keeps the single-pass one,
    the uncertainty that predict and serve compute."""
    from pneumoscope.bundle import package_model

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    tree = _small_test_tree(tmp_path / "t", data_root, pick, swap=False)
    ev = evaluate_model(run, tree, split="test", bootstrap=0, tta=3, cache_root=tmp_path / "cache", progress=False)
    assert ev["referral"]["single_pass_threshold"] != ev["referral"]["uncertainty_threshold"]
    meta = json.loads((package_model(run, tmp_path / "bundle") / "model.json").read_text())
    assert meta["refer_threshold"] == ev["referral"]["single_pass_threshold"]
    assert "single-pass" in meta["refer_rule"]


def test_evaluating_the_bundled_model_never_writes_into_the_package(tmp_path):
    from pneumoscope.bundle import bundled_model_dir
    from pneumoscope.evaluate.run import default_eval_dir

    assert default_eval_dir(bundled_model_dir(), "test") == Path("out") / "eval" / "default" / "test"
    assert default_eval_dir(tmp_path / "run", "val") == tmp_path / "run" / "eval" / "val"
