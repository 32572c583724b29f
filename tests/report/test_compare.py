"""``compare``: a table (Markdown + CSV) and overlaid ROC curves for several evaluated runs."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from pneumoscope.errors import PneumoscopeError
from pneumoscope.evaluate.run import evaluate_model
from pneumoscope.report.compare import compare_runs


def test_compare_two_runs(tmp_path, data_root, smoke_run):
    if not (smoke_run / "eval" / "test" / "metrics.json").exists():
        evaluate_model(smoke_run, data_root, split="test", bootstrap=50, tta=0, cache_root=tmp_path / "cache",
                       progress=False)
    other = tmp_path / "other-run"
    shutil.copytree(smoke_run, other)
    df = compare_runs([smoke_run, other], tmp_path / "cmp")
    assert list(df["run"]) == [smoke_run.name, "other-run"]
    assert {"auroc", "missed_pneumonia_FN", "sensitivity", "specificity"} <= set(df.columns)
    assert df["missed_pneumonia_FN"].iloc[0] == df["missed_pneumonia_FN"].iloc[1]
    for f in ("compare.md", "compare.csv", "roc_compare.png"):
        assert (tmp_path / "cmp" / f).stat().st_size > 0
    assert len(pd.read_csv(tmp_path / "cmp" / "compare.csv")) == 2
    with pytest.raises(PneumoscopeError, match="no evaluation"):
        compare_runs([tmp_path / "nothing"], tmp_path / "cmp2")
