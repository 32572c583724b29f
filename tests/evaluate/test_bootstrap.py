"""Patient-level bootstrap: intervals cover, narrow with n, widen with clustering, keep patients whole."""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pneumoscope.evaluate.bootstrap import bootstrap_ci
from pneumoscope.evaluate.metrics import binary_metrics, multiclass_metrics


def _scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fair classifier: positives score higher on average (AUROC about 0.85)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = 1.0 / (1.0 + np.exp(-(rng.normal(size=n) + 1.5 * (2 * y - 1))))
    return y, p


def _width(ci: dict) -> float:
    return ci["hi"] - ci["lo"]


def test_interval_contains_point_estimate():
    y, p = _scores(300, seed=1)
    res = bootstrap_ci(binary_metrics, y, p, n_boot=300)
    for key in ("auroc", "accuracy", "sensitivity", "specificity", "pr_auc", "brier"):
        r = res[key]
        assert r["lo"] < r["point"] < r["hi"], key
        assert r["n_valid"] == 300
    assert res["auroc"]["point"] == binary_metrics(y, p)["auroc"]  # point = full data, not a bootstrap mean


def test_interval_narrows_with_more_data():
    small = bootstrap_ci(binary_metrics, *_scores(200, seed=2), n_boot=400)
    large = bootstrap_ci(binary_metrics, *_scores(2000, seed=2), n_boot=400)
    for key in ("auroc", "accuracy"):
        # width ~ 1/sqrt(n): expect a ratio near sqrt(10) = 3.2
        assert _width(large[key]) < 0.6 * _width(small[key]), key


def test_patient_resampling_wider_when_images_within_patient_are_identical():
    """60 patients x 8 identical images: only 60 independent units, not 480."""
    y_pat, p_pat = _scores(60, seed=3)
    y, p = np.repeat(y_pat, 8), np.repeat(p_pat, 8)
    patients = np.repeat(np.arange(60), 8)
    by_image = bootstrap_ci(binary_metrics, y, p, groups=None, n_boot=400)
    by_patient = bootstrap_ci(binary_metrics, y, p, groups=patients, n_boot=400)
    for key in ("auroc", "accuracy"):
        # expected ratio sqrt(8) = 2.8; image resampling pretends to know much more than it does
        assert _width(by_patient[key]) > 2.0 * _width(by_image[key]), key
    # with 8 copies of everything, patient resampling is image resampling of the 60 patients
    per_patient = bootstrap_ci(binary_metrics, y_pat, p_pat, n_boot=400)
    assert _width(by_patient["auroc"]) == pytest.approx(_width(per_patient["auroc"]), rel=0.35)


def test_patients_are_kept_whole():
    """Each patient has a unique score and k images; a resample must hold a multiple of k of them."""
    rng = np.random.default_rng(4)
    sizes = rng.integers(1, 6, 40)
    patients = np.repeat(np.arange(40), sizes)
    p = np.repeat(np.linspace(0.01, 0.99, 40), sizes)
    y = np.repeat(rng.integers(0, 2, 40), sizes)
    size_of_score = dict(zip(np.linspace(0.01, 0.99, 40), sizes))
    broken = []

    def check_whole(yb: np.ndarray, pb: np.ndarray) -> float:
        values, counts = np.unique(pb, return_counts=True)
        broken.extend(v for v, c in zip(values, counts) if c % size_of_score[v])
        return float(yb.mean())

    bootstrap_ci(check_whole, y, p, groups=patients, n_boot=100)
    assert broken == []
    # and the same check does notice image-level resampling
    bootstrap_ci(check_whole, y, p, groups=None, n_boot=100)
    assert broken


@pytest.mark.parametrize("with_groups", [False, True])
def test_vectorised_path_equals_loop_path(with_groups):
    y, p = _scores(150, seed=5)
    p = np.round(p, 2)
    groups = np.random.default_rng(5).integers(0, 60, 150) if with_groups else None
    fast = bootstrap_ci(binary_metrics, y, p, groups=groups, n_boot=120, seed=7)
    slow = bootstrap_ci(lambda a, b: binary_metrics(a, b), y, p, groups=groups, n_boot=120, seed=7)
    assert fast.keys() == slow.keys()
    for key in fast:
        for field in ("point", "lo", "hi", "n_valid"):
            np.testing.assert_allclose(fast[key][field], slow[key][field], rtol=1e-10, err_msg=f"{key}.{field}")


def test_partial_keeps_vectorised_path_and_threshold():
    y, p = _scores(200, seed=6)
    fast = bootstrap_ci(functools.partial(binary_metrics, threshold=0.3), y, p, n_boot=50)
    slow = bootstrap_ci(lambda a, b: binary_metrics(a, b, threshold=0.3), y, p, n_boot=50)
    assert fast["threshold"]["point"] == 0.3
    np.testing.assert_allclose(fast["sensitivity"]["lo"], slow["sensitivity"]["lo"])


def test_multiclass_partial_uses_vectorised_path_with_same_result():
    rng = np.random.default_rng(13)
    y = np.r_[0, 1, 2, rng.integers(0, 3, 117)]
    probs = rng.dirichlet(np.ones(3) * 0.7, size=120)
    groups = rng.integers(0, 50, 120)
    names = ["normal", "bacterial", "viral"]
    fast = bootstrap_ci(functools.partial(multiclass_metrics, class_names=names), y, probs, groups=groups, n_boot=60)
    slow = bootstrap_ci(lambda a, b: multiclass_metrics(a, b, names), y, probs, groups=groups, n_boot=60)
    assert fast.keys() == slow.keys()
    for key in fast:
        for field in ("point", "lo", "hi", "n_valid"):
            np.testing.assert_allclose(fast[key][field], slow[key][field], rtol=1e-10, err_msg=f"{key}.{field}")


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_undefined_resamples_are_skipped_and_counted():
    """One positive in 10 images: about (9/10)^10 = 35 % of resamples have no positive."""
    y = np.array([0] * 9 + [1])
    p = np.linspace(0.05, 0.95, 10)
    res = bootstrap_ci(binary_metrics, y, p, n_boot=1000, seed=0)
    assert 550 < res["auroc"]["n_valid"] < 750
    assert res["accuracy"]["n_valid"] == 1000
    # sklearn's roc_auc_score returns NaN (with a warning) on those resamples: skipped the same way
    res = bootstrap_ci(binary_metrics, y, p, n_boot=300, seed=1)
    scalar = bootstrap_ci(roc_auc_score, y, p, n_boot=300, seed=1)
    assert scalar["n_valid"] == res["auroc"]["n_valid"] < 300
    assert scalar["lo"] == pytest.approx(res["auroc"]["lo"])

    # a metric that raises ValueError on a one-class resample is skipped the same way too
    def strict_auroc(yb: np.ndarray, pb: np.ndarray) -> float:
        if np.unique(yb).size < 2:
            raise ValueError("only one class")
        return float(roc_auc_score(yb, pb))

    strict = bootstrap_ci(strict_auroc, y, p, n_boot=300, seed=1)
    assert (strict["n_valid"], strict["hi"]) == (scalar["n_valid"], scalar["hi"])


def test_value_error_with_all_classes_present_is_not_swallowed():
    y, p = _scores(40, seed=8)

    def broken(yb: np.ndarray, pb: np.ndarray) -> float:
        if not np.array_equal(np.sort(pb), np.sort(p)):  # fails on every resample, not just one-class ones
            raise ValueError("bug in metric")
        return 0.0

    with pytest.raises(ValueError, match="bug in metric"):
        bootstrap_ci(broken, y, p, n_boot=20)


def test_nested_dicts_are_flattened():
    rng = np.random.default_rng(9)
    y = np.r_[0, 1, 2, rng.integers(0, 3, 57)]
    probs = rng.dirichlet(np.ones(3), size=60)
    res = bootstrap_ci(lambda a, b: multiclass_metrics(a, b, ["n", "b", "v"]), y, probs, n_boot=30)
    assert "per_class.v.recall" in res and "macro_auroc" in res
    assert "confusion" not in res  # a list, not a number


def test_seeded_and_reproducible():
    y, p = _scores(100, seed=10)
    a = bootstrap_ci(binary_metrics, y, p, n_boot=100, seed=1)
    b = bootstrap_ci(binary_metrics, y, p, n_boot=100, seed=1)
    c = bootstrap_ci(binary_metrics, y, p, n_boot=100, seed=2)
    assert a == b
    assert a["auroc"]["lo"] != c["auroc"]["lo"]


def test_thousand_patient_resamples_of_624_images_are_fast():
    y, p = _scores(624, seed=11)
    patients = np.random.default_rng(11).integers(0, 400, 624)
    t0 = time.perf_counter()
    res = bootstrap_ci(binary_metrics, y, p, groups=patients, n_boot=1000)
    elapsed = time.perf_counter() - t0
    assert res["auroc"]["n_valid"] == 1000
    assert elapsed < 2.0, f"{elapsed:.2f} s"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_boot": 0}, "n_boot"),
        ({"alpha": 1.5}, "alpha"),
        ({"groups": np.arange(3)}, "groups"),
        ({"groups": np.r_[np.arange(19.0), np.nan]}, "missing ids"),
        ({"groups": np.array(["a"] * 19 + [None], dtype=object)}, "missing ids"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    y, p = _scores(20, seed=12)
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(binary_metrics, y, p, **kwargs)
