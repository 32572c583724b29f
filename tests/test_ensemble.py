"""Ensembles on real runs: the ensemble's probabilities are the (weighted) mean of the members'
calibrated probabilities through evaluate, predict, explain and the exported ONNX graph; its
threshold is fitted on the shared validation split; incompatible members are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pneumoscope.data.cache import ImageCache
from pneumoscope.ensemble import EnsemblePredictor, build_ensemble, member_weights
from pneumoscope.errors import DatasetError, ModelError
from pneumoscope.evaluate.run import evaluate_model
from pneumoscope.evaluate.threshold import ThresholdSelector
from pneumoscope.inference import OnnxPredictor, Predictor, load_predictor
from pneumoscope.predict import predict_files


@pytest.fixture(scope="module")
def second_run(smoke_run, data_root):
    """Another tiny run on the same validation split, deliberately different from ``smoke_run``: an
    EfficientNet-Lite0 (ImageNet mean/std on 3 channels, not the CNN's gray 0.5/0.25) with a single
    sigmoid logit (BCE) instead of two softmax logits."""
    from pneumoscope.config import load_config
    from pneumoscope.train.fit import fit

    run = smoke_run.parent / "run-effnet-bce"
    if not (run / "summary.json").exists():
        cfg = load_config("smoke", ["data.limit_per_class=40", "preprocess.size=48", "train.batch_size=16",
                                    "model.name=efficientnet_lite0", "model.pretrained=false", "train.loss.name=bce"])
        fit(cfg, run, data_root=data_root, cache_root=smoke_run.parent / "cache", progress=False)
    return run


@pytest.fixture(scope="module")
def ensembles(tmp_path_factory, smoke_run, second_run):
    out = tmp_path_factory.mktemp("ens")
    cache = smoke_run.parent / "cache"
    mean = build_ensemble([smoke_run, second_run], out / "mean", rule="mean", cache_root=cache)
    weighted = build_ensemble([smoke_run, second_run], out / "weighted", rule="val_weighted", cache_root=cache)
    return out / "mean", out / "weighted", mean, weighted


def _images(data_root, pick):
    return [str(p) for c in ("NORMAL", "PNEUMONIA") for p in pick(data_root, "test", c, 6)]


def _test_tree(root, data_root, pick):
    for cls in ("NORMAL", "PNEUMONIA"):
        dst = root / "test" / cls
        dst.mkdir(parents=True, exist_ok=True)
        for f in pick(data_root, "test", cls, 8):
            (dst / f.name).symlink_to(f)
    return root


def _probs(table: pd.DataFrame) -> np.ndarray:
    return table[["prob_NORMAL", "prob_PNEUMONIA"]].to_numpy(np.float64)


def test_ensemble_predict_equals_hand_averaged_calibrated_probabilities(ensembles, smoke_run, second_run, data_root,
                                                                         pick):
    ens_mean, ens_weighted, _, info = ensembles
    files = _images(data_root, pick)
    a, _ = predict_files(smoke_run, files, out=None, progress=False)
    b, _ = predict_files(second_run, files, out=None, progress=False)
    pa, pb = _probs(a), _probs(b)
    assert np.abs(pa - pb).max() > 1e-3  # two genuinely different members, or the test proves nothing

    m, _ = predict_files(ens_mean, files, out=None, progress=False)
    np.testing.assert_allclose(_probs(m), (pa + pb) / 2, atol=1e-6)

    # val_weighted: weight ∝ validation AUROC - 0.5, from each member's checkpoint
    aurocs = [Predictor.load(r).meta["val_metrics"]["auroc"] for r in (smoke_run, second_run)]
    w = np.array([max(x - 0.5, 0) for x in aurocs]) / sum(max(x - 0.5, 0) for x in aurocs)
    np.testing.assert_allclose(info["weights"], w, atol=1e-12)
    wt, _ = predict_files(ens_weighted, files, out=None, progress=False)
    np.testing.assert_allclose(_probs(wt), w[0] * pa + w[1] * pb, atol=1e-6)
    # decisions use the ensemble's own threshold
    thr = json.loads((ens_mean / "model.json").read_text())["threshold"]["threshold"]
    assert list(m["decision"]) == ["PNEUMONIA" if p >= thr else "NORMAL" for p in m["prob_PNEUMONIA"]]


def test_ensemble_threshold_is_fitted_on_the_shared_validation_split(ensembles, smoke_run, second_run):
    ens_mean, _, info, _ = ensembles
    split = pd.read_csv(smoke_run / "split.csv")
    val = split[split["split"] == "val"]
    members = [Predictor.load(r) for r in (smoke_run, second_run)]
    cache = ImageCache(smoke_run.parent / "cache", members[0].spec)
    u8 = torch.from_numpy(cache.get(list(val["content_hash"])))
    p = np.mean([mp.predict_u8(u8).probs for mp in members], axis=0)
    sel = ThresholdSelector("youden").fit(val["y"].to_numpy(), p[:, 1])
    assert info["threshold"]["threshold"] == pytest.approx(sel.threshold_, abs=1e-6)
    assert (ens_mean / "split.csv").exists() and len(pd.read_csv(ens_mean / "split.csv")) == len(val)


def test_ensemble_evaluate_equals_hand_averaged_member_evaluations(ensembles, smoke_run, second_run, data_root, pick,
                                                                   tmp_path):
    ens_mean = ensembles[0]
    root = _test_tree(tmp_path / "data", data_root, pick)
    kw = dict(split="test", bootstrap=0, tta=0, cache_root=smoke_run.parent / "cache", progress=False)
    ra = evaluate_model(smoke_run, root, out=tmp_path / "ea", **kw)
    rb = evaluate_model(second_run, root, out=tmp_path / "eb", **kw)
    re = evaluate_model(ens_mean, root, out=tmp_path / "ee", **kw)
    pa, pb, pe = (pd.read_csv(tmp_path / d / "predictions.csv") for d in ("ea", "eb", "ee"))
    assert list(pe["path"]) == list(pa["path"]) == list(pb["path"])
    np.testing.assert_allclose(_probs(pe), (_probs(pa) + _probs(pb)) / 2, atol=1e-6)
    assert re["n_images"] == ra["n_images"] == 16
    assert re["threshold"]["value"] == pytest.approx(json.loads((ens_mean / "model.json").read_text())["threshold"]["threshold"])
    assert "of validation" in re["referral"]["rule"] and "no validation" not in re["referral"]["rule"]
    assert rb["model"] != re["model"] and re["model"].startswith("ensemble(cnn3+efficientnet_lite0)")


def test_ensemble_explain_is_the_mean_of_member_cams(ensembles, smoke_run, second_run, data_root, pick, tmp_path):
    from pneumoscope.explain.command import explain_command

    ens = load_predictor(ensembles[0])
    assert isinstance(ens, EnsemblePredictor)
    files = _images(data_root, pick)[:3]
    from pneumoscope.data.imageio import decode_image

    u8 = ens.prepare([decode_image(f) for f in files])
    cam = ens.cams(u8, [1, 1, 0])
    by_hand = np.mean([Predictor.load(r).cams(u8, [1, 1, 0]) for r in (smoke_run, second_run)], axis=0)
    assert cam.shape == (3, 48, 48)
    np.testing.assert_allclose(cam, by_hand, atol=1e-5)
    assert explain_command(ensembles[0], files, tmp_path / "x") == 0
    report = json.loads((tmp_path / "x" / "explanations.json").read_text())
    assert len(report["images"]) == 3 and all((tmp_path / "x" / r["output"]).exists() for r in report["images"])


def test_ensemble_onnx_export_parity(ensembles, data_root, pick, tmp_path):
    from pneumoscope.export import export_onnx

    ens_dir = ensembles[1]
    files = _images(data_root, pick)
    rep = export_onnx(ens_dir, tmp_path / "onnx", check_images=[Path(f) for f in files])
    assert rep["parity"]["passed"] and rep["parity"]["images"] == len(files)
    onnx = load_predictor(tmp_path / "onnx")
    assert isinstance(onnx, OnnxPredictor)
    ens = load_predictor(ens_dir)
    t_o, _ = predict_files(onnx, files, out=None, progress=False)
    t_e, _ = predict_files(ens, files, out=None, progress=False)
    np.testing.assert_allclose(_probs(t_o), _probs(t_e), atol=1e-4)
    assert list(t_o["decision"]) == list(t_e["decision"])
    assert isinstance(onnx.pytorch(), EnsemblePredictor)  # Grad-CAM of an exported ensemble


def test_incompatible_members_are_refused(smoke_run, second_run, tmp_path):
    other = tmp_path / "other-split"
    shutil.copytree(smoke_run, other, ignore=shutil.ignore_patterns("eval", ".lock"))
    split = pd.read_csv(other / "split.csv")
    split.loc[split.index[split["split"] == "val"][0], "split"] = "train"
    split.to_csv(other / "split.csv", index=False)
    with pytest.raises(DatasetError, match="validation split differs"):
        build_ensemble([second_run, other], tmp_path / "e1", cache_root=smoke_run.parent / "cache")
    with pytest.raises(ModelError, match="listed twice"):
        build_ensemble([smoke_run, smoke_run], tmp_path / "e2", cache_root=smoke_run.parent / "cache")
    with pytest.raises(ModelError, match="no such run"):
        build_ensemble([smoke_run, tmp_path / "missing"], tmp_path / "e3")
    assert not (tmp_path / "e1").exists()


def test_member_weights():
    np.testing.assert_allclose(member_weights([0.9, 0.7], "val_weighted"), [2 / 3, 1 / 3])
    np.testing.assert_allclose(member_weights([0.4, 0.45], "val_weighted"), [0.5, 0.5])  # none above chance
    np.testing.assert_allclose(member_weights([0.9, 0.7, 0.8], "mean"), [1 / 3] * 3)


def test_ensemble_is_served_like_a_model(ensembles, smoke_run, second_run, data_root, pick):
    from fastapi.testclient import TestClient

    from pneumoscope.serve.app import create_app

    f = Path(_images(data_root, pick)[-1])
    files = [("files", (f.name, f.read_bytes(), "image/jpeg"))]
    with TestClient(create_app(ensembles[0])) as client:
        r = client.post("/v1/predict", files=files)
        e = client.post("/v1/explain", files=files)
    assert r.status_code == 200 and e.status_code == 200, (r.text, e.text)
    got = r.json()["predictions"][0]["probabilities"]["PNEUMONIA"]
    members, _ = zip(*(predict_files(run, [str(f)], out=None, progress=False) for run in (smoke_run, second_run)))
    assert got == pytest.approx(np.mean([t["prob_PNEUMONIA"].iloc[0] for t in members]), abs=1e-6)
    assert r.json()["model_id"].startswith("ensemble(") and e.json()["predictions"][0]["cam_png_base64"]


def test_ensemble_cli(smoke_run, second_run, tmp_path, capsys):
    from pneumoscope.cli import main

    assert main(["ensemble", str(smoke_run), str(second_run), "--out", str(tmp_path / "e"),
                 "--cache-dir", str(smoke_run.parent / "cache")]) == 0
    assert "ensemble val auroc" in capsys.readouterr().out
    assert main(["ensemble", str(smoke_run), str(smoke_run), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pneumoscope: error: ") and "listed twice" in err[0]


# ------------------------------------------------------------------ members with their own preprocessing
def _run_with(smoke_run, data_root, name, *overrides):
    from pneumoscope.config import load_config
    from pneumoscope.train.fit import fit

    run = smoke_run.parent / name
    if not (run / "summary.json").exists():
        cfg = load_config("smoke", ["data.limit_per_class=40", "preprocess.size=48", "train.batch_size=16", *overrides])
        fit(cfg, run, data_root=data_root, cache_root=smoke_run.parent / "cache", progress=False)
    return run


@pytest.fixture(scope="module")
def clahe_run(smoke_run, data_root):
    """The seed-efficientnet notebook's preprocessing (CLAHE + blur) at the smoke run's size."""
    return _run_with(smoke_run, data_root, "run-clahe", "preprocess.clahe=true", "preprocess.blur_sigma=0.8")


@pytest.fixture(scope="module")
def small_run(smoke_run, data_root):
    """A smaller input (40 px) than the smoke run's 48 px."""
    return _run_with(smoke_run, data_root, "run-40px", "preprocess.size=40")


def test_members_with_their_own_preprocessing_are_fed_from_one_image(smoke_run, clahe_run, data_root, pick, tmp_path):
    """A CLAHE + blur member next to a plain one: the ensemble feeds each member exactly its own
    preprocessing (same size), so predict is the hand average of the members' own predictions."""
    ens = build_ensemble([smoke_run, clahe_run], tmp_path / "ens", cache_root=smoke_run.parent / "cache")
    meta = json.loads((tmp_path / "ens" / "model.json").read_text())
    assert meta["preprocess"]["clahe"] is False and meta["preprocess"]["size"] == 48
    files = _images(data_root, pick)
    a, _ = predict_files(smoke_run, files, out=None, progress=False)
    b, _ = predict_files(clahe_run, files, out=None, progress=False)
    e, _ = predict_files(tmp_path / "ens", files, out=None, progress=False)
    assert np.abs(_probs(a) - _probs(b)).max() > 1e-3
    np.testing.assert_allclose(_probs(e), (_probs(a) + _probs(b)) / 2, atol=1e-6)
    assert ens["threshold"] is not None
    # Grad-CAM: each member explains its own input; one map per image at the ensemble's size
    ep = load_predictor(tmp_path / "ens")
    from pneumoscope.data.imageio import decode_image

    cams = ep.cams(ep.prepare([decode_image(f) for f in files[:2]]), [1, 0])
    assert cams.shape == (2, 48, 48) and np.isfinite(cams).all()
    # one ONNX graph cannot run CLAHE: refused with one line naming what to do instead
    from pneumoscope.export import export_onnx

    with pytest.raises(ModelError, match="export the members one by one"):
        export_onnx(tmp_path / "ens", tmp_path / "onnx")
    assert not (tmp_path / "onnx" / "model.onnx").exists()


def test_a_smaller_member_is_fed_a_resize_of_the_shared_image(smoke_run, small_run, data_root, pick, tmp_path):
    """40 px next to 48 px: the shared image is 48 px and the small member gets it resized to 40,
    within interpolation rounding of its own 40 px preprocessing of the original file."""
    from pneumoscope.data.imageio import decode_image
    from pneumoscope.data.preprocess import PreprocessSpec, preprocess
    from pneumoscope.ensemble import member_input

    build_ensemble([smoke_run, small_run], tmp_path / "ens", cache_root=smoke_run.parent / "cache")
    ep = load_predictor(tmp_path / "ens")
    assert ep.spec == PreprocessSpec(size=48)
    files = _images(data_root, pick)
    decoded = [decode_image(f) for f in files]
    shared = ep.prepare(decoded)
    own = torch.from_numpy(np.stack([preprocess(im, PreprocessSpec(size=40)) for im in decoded]))
    derived = member_input(shared, ep.spec, PreprocessSpec(size=40))
    assert derived.shape == own.shape == (len(files), 40, 40) and derived.dtype == torch.uint8
    diff = (derived.int() - own.int()).abs().float()
    # 48 -> 40 px is the steepest case (measured 2.1-2.2 grey levels mean); 224 -> 150 px on the
    # full-resolution sample films gives 0.67 (99th percentile 4)
    assert diff.mean() < 3.0 and not torch.equal(derived, own)  # close, not the same resize
    small = Predictor.load(small_run)
    e, _ = predict_files(tmp_path / "ens", files, out=None, progress=False)
    a, _ = predict_files(smoke_run, files, out=None, progress=False)
    by_hand = (_probs(a) + small.predict_u8(derived).probs) / 2
    np.testing.assert_allclose(_probs(e), by_hand, atol=1e-6)


def test_members_must_share_the_resize_mode(smoke_run, clahe_run):
    from pneumoscope.data.preprocess import PreprocessSpec
    from pneumoscope.ensemble import _check_compatible, _member_info, input_spec

    a, b = _member_info(smoke_run), _member_info(clahe_run)
    b["meta"] = {**b["meta"], "preprocess": {**b["meta"]["preprocess"], "resize": "pad"}}
    with pytest.raises(ModelError, match="resize mode 'pad' differs"):
        _check_compatible([a, b])
    with pytest.raises(ModelError, match="different resize modes"):
        input_spec([PreprocessSpec(size=48), PreprocessSpec(size=40, resize="pad")])
    same = PreprocessSpec(size=48, clahe=True)
    assert input_spec([same, same]) == same  # identical members: their own preprocessing, CLAHE included


def test_on_images_already_at_the_shared_size_every_member_gets_its_own_preprocessing(data_root, pick):
    """The shared Kermany copy is 224 px: the ensemble's 224 px image, resized and enhanced per member,
    is bit for bit what each member's own preprocessing makes of the file (150 px, CLAHE, blur)."""
    from pneumoscope.data.imageio import decode_image
    from pneumoscope.data.preprocess import PreprocessSpec, preprocess
    from pneumoscope.ensemble import input_spec, member_input

    specs = [PreprocessSpec(size=224), PreprocessSpec(size=150, clahe=True),
             PreprocessSpec(size=224, clahe=True, blur_sigma=1.0)]
    base = input_spec(specs)
    assert base == PreprocessSpec(size=224)
    decoded = [decode_image(f) for c in ("NORMAL", "PNEUMONIA") for f in pick(data_root, "test", c, 5)]
    shared = torch.from_numpy(np.stack([preprocess(im, base) for im in decoded]))
    for spec in specs:
        own = np.stack([preprocess(im, spec) for im in decoded])
        assert np.array_equal(member_input(shared, base, spec).numpy(), own), spec
