"""``compare --paired``: metric differences of two runs on the same test patients, with paired CIs."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from pneumoscope.errors import PneumoscopeError
from pneumoscope.evaluate.run import evaluate_model
from pneumoscope.report.paired import paired_comparison


@pytest.fixture()
def evaluated(tmp_path, data_root, smoke_run):
    if not (smoke_run / "eval" / "test" / "metrics.json").exists():
        evaluate_model(smoke_run, data_root, split="test", bootstrap=50, tta=0, cache_root=tmp_path / "cache",
                       progress=False)
    return smoke_run


def test_identical_runs_differ_by_zero(tmp_path, evaluated):
    other = tmp_path / "copy"
    shutil.copytree(evaluated, other)
    res = paired_comparison(evaluated, other, tmp_path / "cmp", n_boot=200)
    assert res["n_images"] == 624
    for row in res["differences"]:
        assert row["A_minus_B"] == 0 and row["lo"] == 0 and row["hi"] == 0 and not row["ci_excludes_0"]
    md = (tmp_path / "cmp" / "paired.md").read_text()
    assert "paired patient-bootstrap" in md and "validation-chosen threshold (A" in md
    assert res["decision"] == "threshold" and set(res["thresholds"]) == {"A", "B"}


def test_a_worse_copy_gives_the_auroc_difference(tmp_path, evaluated):
    other = tmp_path / "useless"
    shutil.copytree(evaluated, other)
    pred_path = other / "eval" / "test" / "predictions.csv"
    pred = pd.read_csv(pred_path)
    pred["prob_PNEUMONIA"], pred["prob_NORMAL"] = 0.5, 0.5  # a model that knows nothing
    pred.to_csv(pred_path, index=False)
    res = paired_comparison(evaluated, other, tmp_path / "cmp", n_boot=300)
    auroc = next(r for r in res["differences"] if r["metric"] == "auroc")
    a = pd.read_csv(evaluated / "eval" / "test" / "predictions.csv")
    expected = roc_auc_score(a["label"] == "PNEUMONIA", a["prob_PNEUMONIA"]) - 0.5
    assert auroc["A_minus_B"] == pytest.approx(expected)
    assert auroc["lo"] < auroc["A_minus_B"] < auroc["hi"]
    assert json.loads((tmp_path / "cmp" / "paired.json").read_text())["n_patients"] == res["n_patients"]


def test_runs_on_different_images_are_refused(tmp_path, evaluated):
    other = tmp_path / "fewer"
    shutil.copytree(evaluated, other)
    pred_path = other / "eval" / "test" / "predictions.csv"
    pd.read_csv(pred_path).iloc[:100].to_csv(pred_path, index=False)
    with pytest.raises(PneumoscopeError, match="not evaluated on the same images"):
        paired_comparison(evaluated, other, tmp_path / "cmp")
    with pytest.raises(PneumoscopeError, match="no evaluation"):
        paired_comparison(evaluated, tmp_path / "nothing", tmp_path / "cmp")
