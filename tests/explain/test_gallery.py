"""Gallery selection per outcome, gallery PNGs and attention statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pneumoscope.explain.gallery import make_gallery, outcome_galleries, select_outcomes


def _binary_table() -> pd.DataFrame:
    rows = [
        # path, label, decision, prob
        ("tp_a", 1, 1, 0.95), ("tp_b", 1, 1, 0.70), ("tp_c", 1, 1, 0.99),
        ("tn_a", 0, 0, 0.30), ("tn_b", 0, 0, 0.01), ("tn_c", 0, 0, 0.10),
        ("fp_a", 0, 1, 0.60), ("fp_b", 0, 1, 0.90),
        ("fn_a", 1, 0, 0.40),
    ]
    return pd.DataFrame(rows, columns=["path", "label", "decision", "prob"])


def test_select_binary_outcomes_most_confident_first() -> None:
    table = _binary_table()
    groups = select_outcomes(table, ["NORMAL", "PNEUMONIA"], n_per_group=2)
    names = {g: table["path"].iloc[idx].tolist() for g, idx in groups.items()}
    assert names == {
        "tp": ["tp_c", "tp_a"],  # highest P(pneumonia) first
        "tn": ["tn_b", "tn_c"],  # lowest first
        "fp": ["fp_b", "fp_a"],
        "fn": ["fn_a"],
    }
    assert select_outcomes(table, ["NORMAL", "PNEUMONIA"], n_per_group=2) == groups  # deterministic


def test_select_ties_are_deterministic_per_seed() -> None:
    table = pd.DataFrame({"path": list("abcdef"), "label": 1, "decision": 1, "prob": 0.9})
    a = select_outcomes(table, ["N", "P"], n_per_group=3, seed=0)["tp"]
    assert a == select_outcomes(table, ["N", "P"], n_per_group=3, seed=0)["tp"]
    assert len(set(a)) == 3


def test_select_multiclass_correct_incorrect_per_class() -> None:
    table = pd.DataFrame(
        [("n1", 0, 0, 0.9), ("n2", 0, 2, 0.8), ("b1", 1, 1, 0.6), ("b2", 1, 1, 0.7), ("v1", 2, 0, 0.5)],
        columns=["path", "label", "decision", "prob"],
    )
    groups = select_outcomes(table, ["NORMAL", "BACTERIA", "VIRUS"], n_per_group=8)
    names = {g: table["path"].iloc[idx].tolist() for g, idx in groups.items()}
    assert names == {
        "correct_normal": ["n1"], "incorrect_normal": ["n2"],
        "correct_bacteria": ["b2", "b1"], "incorrect_bacteria": [],
        "correct_virus": [], "incorrect_virus": ["v1"],
    }


def test_select_needs_columns() -> None:
    with pytest.raises(ValueError, match="prob"):
        select_outcomes(pd.DataFrame({"path": [], "label": [], "decision": []}), ["a", "b"])


def test_make_gallery(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    items = [
        {"image": rng.integers(0, 255, (64, 64), dtype=np.uint8), "cam": rng.random((8, 8)), "title": f"img {i}"}
        for i in range(5)
    ]
    items[0]["mask"] = np.pad(np.ones((40, 40), bool), 12)
    p = make_gallery(items, tmp_path / "g.png", cols=3, title="five")
    empty = make_gallery([], tmp_path / "e.png", title="none")
    for q in (p, empty):
        with Image.open(q) as im:
            assert im.format == "PNG"
    with Image.open(p) as im:
        assert im.size[0] > im.size[1]  # 3 columns x 2 rows


def test_outcome_galleries_end_to_end(tmp_path: Path, xray_files: list[Path], make_predictor) -> None:
    predictor = make_predictor("cnn3", size=64)
    files = [str(f) for f in xray_files[:8]]
    label = [0, 0, 0, 0, 1, 1, 1, 1]
    decision = [0, 0, 1, 1, 1, 1, 0, 0]  # 2 TN, 2 FP, 2 TP, 2 FN
    prob = [0.1, 0.2, 0.8, 0.7, 0.9, 0.6, 0.3, 0.4]
    rows = pd.DataFrame({"path": files + [str(tmp_path / "missing.jpeg")], "label": label + [1],
                         "decision": decision + [1], "prob": prob + [0.99]})
    result = outcome_galleries(predictor, rows, tmp_path / "gal", n_per_group=8)
    assert result["galleries"] == {g: f"gallery_{g}.png" for g in ("tp", "tn", "fp", "fn")}
    for name in result["galleries"].values():
        assert (tmp_path / "gal" / name).exists()
    att = result["attention"]
    assert len(att["per_image"]) == 8  # the missing file was skipped
    assert {g: s["n"] for g, s in att["by_outcome"].items()} == {"tp": 2, "tn": 2, "fp": 2, "fn": 2}
    assert {c: s["n"] for c, s in att["by_class"].items()} == {"NORMAL": 4, "PNEUMONIA": 4}
    assert sum(att["mask_method_counts"].values()) == 8
    for rec in att["per_image"]:
        assert 0.0 <= rec["lung_attention"] <= 1.0 and 0.0 <= rec["border_attention"] <= 1.0
    tp = [r["path"] for r in att["per_image"] if r["group"] == "tp"]
    assert tp == [files[4], files[5]]
