from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from pneumoscope.data.check import check_command, has_problems, run_check
from pneumoscope.data.manifest import Manifest
from pneumoscope.data.scan import scan_dataset
from pneumoscope.data.split import patient_split
from pneumoscope.errors import DatasetError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_outputs(out: Path, report: dict) -> None:
    for name in ("counts.png", "sizes.png", "samples.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert json.loads((out / "data_check.json").read_text()) == json.loads(json.dumps(report))
    assert (out / "data_check.md").read_text().startswith("# Data check")


@pytest.fixture()
def messy_kermany(small_kermany: Path, data_root: Path, pick) -> Path:
    """small_kermany plus: a truncated file, a cross-split copy, a re-used patient id (same and other series)."""
    train_normal = small_kermany / "train" / "NORMAL"
    first = sorted(train_normal.iterdir())[0]
    data = first.read_bytes()
    (train_normal / "IM-9999-0001.jpeg").write_bytes(data[: len(data) // 2])
    shutil.copy(first, small_kermany / "test" / "NORMAL" / "dup_copy.jpeg")
    spare = pick(data_root, "test", "PNEUMONIA", 30)[-2:]  # images not in small_kermany
    shutil.copy(spare[0], small_kermany / "test" / "PNEUMONIA" / "person1000_bacteria_9999.jpeg")
    shutil.copy(spare[1], small_kermany / "test" / "PNEUMONIA" / "person1001_virus_9998.jpeg")
    return small_kermany


def test_problems_are_found_and_reported(messy_kermany: Path, tmp_path: Path) -> None:
    manifest = scan_dataset(messy_kermany, progress=False)
    out = tmp_path / "check"
    report = run_check(manifest, out, sample_per_class=3)
    _assert_outputs(out, report)

    assert (report["n_files"], report["n_ok"], report["n_errors"]) == (64, 63, 1)
    assert report["corrupt"] == [
        {"path": str(messy_kermany / "train" / "NORMAL" / "IM-9999-0001.jpeg"), "reason": "truncated JPEG", "split": "train"}
    ]
    dup = report["duplicates"]
    assert dup["n_pixel_groups"] == dup["n_exact_groups"] == 1
    group = dup["pixel_identical"][0]
    assert group["cross_split"] and group["splits"] == ["train", "test"]
    assert sorted(Path(f["path"]).name for f in group["files"]) == ["IM-0115-0001.jpeg", "dup_copy.jpeg"]
    overlap = report["patients"]["overlap_split"]
    # person100 is already in small_kermany (viral in train, bacterial in test): another series
    assert overlap["n"] == 3 and overlap["n_likely_same_patient"] == 1 and overlap["n_different_series_only"] == 2
    same = [e for e in overlap["entries"] if e["likely_same_patient"]]
    assert same[0]["patient_id"] == "person1000"
    assert same[0]["series"] == {"train": ["person-bacteria", "person-virus"], "test": ["person-bacteria"]}
    assert report["patients"]["fallback"] == 1  # dup_copy.jpeg has no patient in its name
    assert report["counts"]["train"]["classes"]["NORMAL"]["total"] == 16
    assert report["counts"]["test"]["classes"]["NORMAL"]["total"] == 5
    assert report["image_size"]["width"] == {"min": 224, "median": 224.0, "max": 224}
    assert report["imbalance"]["train"] == {"counts": {"NORMAL": 16, "PNEUMONIA": 32}, "ratio": 2.0}
    assert has_problems(report) and len(report["problems"]) == 3
    markdown = (out / "data_check.md").read_text()
    assert "truncated JPEG" in markdown and "**across splits**" in markdown and "`person1000`" in markdown


def test_clean_small_dataset_has_no_problems(small_kermany: Path, tmp_path: Path) -> None:
    manifest = patient_split(scan_dataset(small_kermany, progress=False), seed=0)
    report = run_check(manifest, tmp_path, sample_per_class=2)
    _assert_outputs(tmp_path, report)
    assert report["problems"] == [] and not has_problems(report)
    assert report["duplicates"]["n_pixel_groups"] == 0
    overlap = report["patients"]["overlap_split"]
    assert (overlap["n"], overlap["n_likely_same_patient"]) == (1, 0)
    assert overlap["entries"][0]["patient_id"] == "person100"
    assert overlap["entries"][0]["series"]["test"] == ["person-bacteria"]
    assert set(report["counts"]) == {"train", "val", "test"}
    assert list(report["counts"]) == ["train", "val", "test"]
    assert sum(report["patients"]["per_official_split"].values()) == sum(report["patients"]["per_split"].values())


def test_has_problems_flags() -> None:
    assert not has_problems({"problems": []})
    assert has_problems({"problems": ["1 unreadable image files"]})


def test_check_command_exit_codes_and_outputs(messy_kermany: Path, small_kermany: Path, tmp_path: Path, caplog) -> None:
    bad = messy_kermany / "train" / "NORMAL" / "IM-9999-0001.jpeg"
    with caplog.at_level(logging.INFO, logger="pneumoscope"):
        code = check_command(str(messy_kermany), tmp_path / "out", progress=False)
    assert code == 1
    assert f"{bad}: truncated JPEG" in [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(r.getMessage().startswith("problems: ") for r in caplog.records)
    saved = Manifest.load(tmp_path / "out" / "manifest.parquet")
    assert len(saved) == 64 and set(saved.df["split"]) == {"train", "val", "test"}
    assert (tmp_path / "out" / "data_check.json").is_file()

    bad.unlink()
    (small_kermany / "test" / "NORMAL" / "dup_copy.jpeg").unlink()
    (small_kermany / "test" / "PNEUMONIA" / "person1000_bacteria_9999.jpeg").unlink()
    code = check_command(str(small_kermany), tmp_path / "clean", manifest_out=tmp_path / "m.csv", progress=False)
    assert code == 0
    assert len(Manifest.load(tmp_path / "m.csv")) == 61


def test_check_command_without_data(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PNEUMOSCOPE_DATA", raising=False)
    with pytest.raises(DatasetError, match="chest-xray-pneumonia"):
        check_command(None, tmp_path)


def test_full_real_dataset(real_manifest: Manifest, tmp_path: Path) -> None:
    """The one test on all 5,840 real images: published counts, duplicates, patient overlap."""
    assert real_manifest.layout == "kermany" and real_manifest.class_names == ["NORMAL", "PNEUMONIA"]
    report = run_check(patient_split(real_manifest, seed=0), tmp_path, sample_per_class=4)
    assert (report["n_files"], report["n_errors"]) == (5840, 0)
    official = report["counts_official"]
    train, test = official["train"]["classes"], official["test"]["classes"]
    assert (train["NORMAL"]["total"], train["PNEUMONIA"]["total"]) == (1341, 3875)
    assert train["PNEUMONIA"]["subtypes"] == {"bacterial": 2530, "viral": 1345}
    assert (test["NORMAL"]["total"], test["PNEUMONIA"]["total"]) == (234, 390)
    assert test["PNEUMONIA"]["subtypes"] == {"bacterial": 242, "viral": 148}
    assert sum(report["counts"][s]["total"] for s in ("train", "val")) == 5216

    dup = report["duplicates"]
    assert 20 <= dup["n_pixel_groups"] <= 40
    assert dup["n_cross_split_groups"] == 0 and dup["n_label_conflict_groups"] == 0
    assert report["image_size"]["modes"] == {"RGB": 5840}

    patients = report["patients"]
    assert patients["fallback"] == 0
    assert patients["per_official_split"] == {"train": 2635, "test": 404}
    # 264 ids occur in official train and test, each time across different numbering series
    # (bacteria vs virus, IM vs NORMAL2-IM); within a series the official split is patient-disjoint.
    overlap = patients["overlap_official"]
    assert (overlap["n"], overlap["n_likely_same_patient"], overlap["by_splits"]) == (264, 0, {"train/test": 264})
    assert patients["overlap_split"]["n_likely_same_patient"] == 0
    assert not has_problems(report)


def test_data_check_with_an_external_validation_set_is_the_split_training_uses(
        small_kermany: Path, data_root: Path, tmp_path: Path) -> None:
    """`data check --val-source` saves the split the main job trains on; training from that manifest
    applies the same external split again without duplicating the external rows."""
    import pandas as pd

    from pneumoscope.cli import main
    from pneumoscope.config import load_config
    from pneumoscope.train.fit import fit

    ext = tmp_path / "external"
    for cls in ("NORMAL", "PNEUMONIA"):
        (ext / cls).mkdir(parents=True)
        for src in sorted((data_root / "train" / cls).iterdir())[60:66]:
            (ext / cls / src.name).symlink_to(src)
    out = tmp_path / "check"
    assert main(["data", "check", str(small_kermany), "--out", str(out), "--val-source", str(ext)]) in (0, 1)
    saved = Manifest.load(out / "manifest.parquet").df
    val = saved[saved["split"] == "val"]
    assert len(val) == 12 and val["path"].str.startswith(str(ext)).all()
    assert (saved.loc[saved["official_split"] == "train", "split"].isin(["train", "val"])).all()
    cfg = load_config("smoke", ["preprocess.size=32", "train.batch_size=16", f"data.val_source={ext}"])
    fit(cfg, tmp_path / "run", data_root=out / "manifest.parquet", cache_root=tmp_path / "cache", progress=False)
    split = pd.read_csv(tmp_path / "run" / "split.csv")
    assert sorted(split.loc[split["split"] == "val", "path"]) == sorted(val["path"])
    assert set(split.loc[split["split"] == "train", "path"]) == set(saved.loc[saved["split"] == "train", "path"])
    assert main(["data", "check", str(small_kermany), "--out", str(tmp_path / "bad"), "--val-source",
                 str(small_kermany)]) == 2
