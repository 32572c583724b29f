"""The training benchmarks' own logic: slopes, the validation-chosen operating point, an end-to-end run.

No timing is asserted (speed targets live in ``benchmarks/results``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from test_common import BENCH, REPO, _load  # noqa: E402  (pytest puts this folder on sys.path)


def test_scaling_slope_recovers_the_exponent() -> None:
    scaling = _load("bench_scaling")
    n = np.array([1000, 2500, 5216])
    assert scaling.slope(n, 0.02 * n) == pytest.approx(1.0)
    assert scaling.slope(n, 3e-6 * n**2) == pytest.approx(2.0)


def _predictions(path: Path, y: np.ndarray, p: np.ndarray) -> None:
    path.mkdir(parents=True)
    pd.DataFrame({"label": np.where(y == 1, "PNEUMONIA", "NORMAL"), "prob_PNEUMONIA": p}).to_csv(
        path / "predictions.csv", index=False)


def test_sensitivity_point_is_chosen_on_validation_only(tmp_path: Path) -> None:
    acc = _load("bench_accuracy")
    rng = np.random.default_rng(0)
    yv = np.r_[np.zeros(50, int), np.ones(100, int)]
    pv = np.clip(yv * 0.5 + rng.uniform(0, 0.5, 150), 0, 1)
    yt = np.r_[np.zeros(40, int), np.ones(60, int)]
    _predictions(tmp_path / "a" / "eval" / "val", yv, pv)
    _predictions(tmp_path / "a" / "eval" / "test", yt, rng.uniform(0, 1, 100))
    _predictions(tmp_path / "b" / "eval" / "val", yv, pv)
    _predictions(tmp_path / "b" / "eval" / "test", yt, yt.astype(float))  # a perfect test set
    a, b = acc.sens_point(tmp_path / "a"), acc.sens_point(tmp_path / "b")
    assert a["threshold"] == b["threshold"]  # the test predictions never move the threshold
    assert a["val"]["sensitivity"] >= 0.98
    assert b["test"]["sensitivity"] == 1.0 and b["test"]["specificity"] == 1.0
    assert a["test"]["tp"] + a["test"]["fn"] == 60


def test_bench_efficiency_end_to_end(tmp_path: Path, data_root: Path) -> None:
    results = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    argv = [str(BENCH / "bench_efficiency.py"), "--data", str(data_root), "--images", "64", "--full-images", "32",
            "--rounds", "1", "--results-dir", str(results), "--out-name", "smoke"]
    proc = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((results / "smoke.json").read_text())["results"]
    assert res["tail"]["images"] == 64 and res["full"]["images"] == 32
    for path in ("tail", "full"):
        assert res[path]["pipeline_img_s"] > 0 and res[path]["bound_img_s"] > 0
        assert res[path]["efficiency"] == pytest.approx(res[path]["pipeline_img_s"] / res[path]["bound_img_s"])
        assert len(res[path]["rounds"]) == 1
    assert res["feature_views"] == 3
    assert "compute-only bound" in (results / "smoke.md").read_text()


def test_bench_gpu_dry_run_on_cpu(tmp_path: Path, data_root: Path) -> None:
    """bench_gpu.py's code path (device-resident caches, torch augmentation, rounds) runs with --device cpu."""
    results = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    argv = [str(BENCH / "bench_gpu.py"), "--data", str(data_root), "--device", "cpu", "--images", "32", "--batch", "8",
            "--rounds", "1", "--epochs-per-round", "1", "--amp", "off", "--results-dir", str(results),
            "--out-name", "gpu_smoke"]
    proc = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((results / "gpu_smoke.json").read_text())
    res = doc["results"]["results"]
    assert set(res) == {"full_eager", "tail"} and doc["results"]["images"] == 32
    for r in res.values():
        assert r["pipeline_img_s"] > 0 and r["bound_img_s"] > 0 and r["gpu_utilisation_pct"] is None
    import torch

    if not torch.cuda.is_available():  # without a GPU the default device is refused in one line
        proc = subprocess.run([sys.executable, str(BENCH / "bench_gpu.py"), "--data", str(data_root)], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "no CUDA device" in proc.stderr


def test_texture_swap_moves_each_class_to_the_other_classes_texture(data_root) -> None:
    """benchmarks/shortcut_texture.py: normals get smoother, pneumonia films sharper, by the
    documented factors, and the measured energy gap of the real train films is reproduced."""
    tex = _load("shortcut_texture")
    from pneumoscope.data.imageio import decode_image
    from pneumoscope.data.preprocess import PreprocessSpec, preprocess

    def films(cls):
        files = sorted((data_root / "train" / cls).iterdir())[:12]
        return np.stack([preprocess(decode_image(p), PreprocessSpec()) for p in files])

    normal, pneu = films("NORMAL"), films("PNEUMONIA")
    hf = lambda imgs: np.mean([tex.high_frequency(im) for im in imgs])  # noqa: E731
    assert hf(pneu) < 0.9 * hf(normal)  # the texture gap the benchmark measures
    u8 = np.concatenate([normal, pneu])
    y = np.r_[np.zeros(len(normal), int), np.ones(len(pneu), int)]
    out = tex.texture_swapped(u8, y)
    assert out.shape == u8.shape and out.dtype == np.uint8
    assert hf(out[y == 0]) < 0.8 * hf(normal) and hf(out[y == 1]) > 1.2 * hf(pneu)
    assert len(tex.low_level_features(normal[0])) == 8


def _fake_run(d: Path, y_val: np.ndarray, p_val: np.ndarray, y_test: np.ndarray, p_test: np.ndarray) -> Path:
    """A finished run as bench_accuracy reads it: config.yaml and eval/{val,test}/{metrics.json,predictions.csv}."""
    from pneumoscope.evaluate.metrics import binary_metrics

    for split, y, p in (("val", y_val, p_val), ("test", y_test, p_test)):
        _predictions(d / "eval" / split, y, p)
        m = binary_metrics(y, p, 0.5)
        ci = {k: {"lo": m[k] - 0.01, "hi": min(m[k] + 0.01, 1.0)} for k in ("accuracy", "sensitivity", "specificity",
                                                                           "auroc")}
        (d / "eval" / split / "metrics.json").write_text(json.dumps({
            "metrics": m, "ci": ci, "confusion": [[m["tn"], m["fp"]], [m["fn"], m["tp"]]]}))
    (d / "config.yaml").write_text("model: {name: cnn3, pretrained: false}\n")
    return d


def test_accuracy_table_carries_rows_of_an_earlier_table_unchanged(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """LABEL=@previous keeps a candidate whose run directory is gone; live runs are evaluated beside it."""
    acc = _load("bench_accuracy")
    rng = np.random.default_rng(1)
    yv, yt = np.r_[np.zeros(50, int), np.ones(100, int)], np.r_[np.zeros(40, int), np.ones(60, int)]
    run_a = _fake_run(tmp_path / "a", yv, np.clip(yv * 0.6 + rng.uniform(0, 0.4, 150), 0, 1), yt,
                      np.clip(yt * 0.3 + rng.uniform(0, 0.7, 100), 0, 1))
    run_n = _fake_run(tmp_path / "n", yv, np.clip(yv * 0.5 + rng.uniform(0, 0.5, 150), 0, 1), yt,
                      rng.uniform(0, 1, 100))
    results = tmp_path / "results"

    def table(*argv: str) -> dict:
        monkeypatch.setattr(sys, "argv", ["bench_accuracy.py", "--data", str(tmp_path), "--results-dir",
                                          str(results), *argv])
        assert acc.main() == 0
        return json.loads((results / f"{argv[argv.index('--out-name') + 1]}.json").read_text())["results"]

    first = table("--out-name", "first", "--default", f"A={run_a}")
    second = table("--out-name", "second", "--default", "A=@previous", "--seed-preset", f"seed-new={run_n}",
                   "--previous", str(results / "first.json"), "--best-single", "A")
    a1, a2 = first["candidates"]["A"], second["candidates"]["A"]
    assert a2["test_metrics"] == a1["test_metrics"] and a2["sens98"] == a1["sens98"] and a2["dir"] == str(run_a)
    assert a2["carried_from"] == str(results / "first.json") and "carried_from" not in second["candidates"]["seed-new"]
    assert second["candidates"]["seed-new"]["test_metrics"]["auroc"] != a1["test_metrics"]["auroc"]
    md = (results / "second.md").read_text()
    assert "| pneumoscope default: A |" in md and "| seed preset: seed-new |" in md
    with pytest.raises(SystemExit, match="not a candidate"):
        table("--out-name", "third", "--default", "B=@previous", "--previous", str(results / "first.json"))
    with pytest.raises(SystemExit, match="needs --previous"):
        table("--out-name", "third", "--default", "A=@previous")
