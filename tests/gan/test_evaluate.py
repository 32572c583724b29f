"""``gan evaluate``: Fréchet distance, the discriminator as a classifier, the written report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pneumoscope.gan.evaluate import evaluate_gan, frechet_distance, frechet_distance_features, gaussian_stats


def test_frechet_distance_zero_for_identical_sets_positive_otherwise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20))
    assert frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance_features(x, x + 0.5) == pytest.approx(20 * 0.25, rel=1e-6)  # a shift adds |Δμ|²
    assert frechet_distance_features(x, x * 2.0) > 1.0


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)  # 5 + (1 + 0 + 4)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected)
    assert expected == 10.0


def test_rank_deficient_covariances_stay_real_and_finite():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(12, 64))  # fewer samples than dimensions
    mu, cov = gaussian_stats(a)
    assert np.linalg.matrix_rank(cov) < 64
    d = frechet_distance_features(a, b)
    assert np.isfinite(d) and d > 0
    assert frechet_distance_features(a, a) == pytest.approx(0.0, abs=1e-8)


def test_evaluate_gan_with_classifier(tmp_path, tiny_gan, tiny_data, smoke_run):
    res = evaluate_gan(tiny_gan, tiny_data, classifier=smoke_run, out=tmp_path / "ev", bootstrap=50,
                       cache_root=tmp_path / "cache", progress=False)
    disc = res["discriminator"]
    assert set(disc) == {"val", "test"}
    assert disc["test"]["n_images"] == 12  # 4 normal + 4 bacterial + 4 viral official test images
    split = __import__("pandas").read_csv(tiny_gan / "split.csv")
    assert disc["val"]["n_images"] == int((split["split"] == "val").sum())
    m = disc["val"]["metrics"]
    assert 0.0 <= m["accuracy"] <= 1.0 and np.asarray(m["confusion"]).sum() == disc["val"]["n_images"]
    assert "accuracy" in disc["test"]["ci"]
    fd = res["frechet"]["per_class"]
    assert set(fd) == {"normal", "bacterial", "viral"}
    for v in fd.values():
        assert v["fd_synthetic_vs_val"] > 0 and np.isfinite(v["fd_train_vs_val_baseline"])
        assert v["n_synthetic"] == v["n_val"]
    assert "not comparable with published FID" in res["frechet"]["note"]
    saved = json.loads((tmp_path / "ev" / "gan_eval.json").read_text())
    assert saved["frechet"]["per_class"]["viral"]["n_val"] == fd["viral"]["n_val"]
    html = (tmp_path / "ev" / "gan_report.html").read_text()
    assert "data:image/png;base64" in html and "Fréchet" in html
    assert "| val |" in (tmp_path / "ev" / "gan_eval.md").read_text()


def test_evaluate_gan_without_classifier_skips_the_distance(tmp_path, tiny_gan, tiny_data):
    res = evaluate_gan(tiny_gan, tiny_data, out=tmp_path / "ev", bootstrap=0, include_test=False,
                       cache_root=tmp_path / "cache", progress=False)
    assert "frechet" not in res and set(res["discriminator"]) == {"val"}
    assert "pass `--classifier RUN`" in (tmp_path / "ev" / "gan_eval.md").read_text()
