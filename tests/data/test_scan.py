from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pneumoscope.data.manifest import MANIFEST_COLUMNS, require_classes
from pneumoscope.data.scan import OUTSIDE_ROOT, scan_dataset
from pneumoscope.errors import DatasetError
from pneumoscope.utils.io import sha256_file


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a (symlinked) tree as real files."""
    shutil.copytree(src, dst, symlinks=False)


def _rel(df: pd.DataFrame, root: Path) -> list[str]:
    return sorted(os.path.relpath(p, root) for p in df["path"])


# -- Kermany layout ------------------------------------------------------------------------


def test_small_kermany(small_kermany: Path) -> None:
    m = scan_dataset(small_kermany, progress=False)
    df = m.df
    assert (m.layout, m.class_names, m.root) == ("kermany", ["NORMAL", "PNEUMONIA"], small_kermany)
    assert list(df.columns) == MANIFEST_COLUMNS
    assert len(df) == 60 and set(df["status"]) == {"ok"} and set(df["error"]) == {""}
    assert (df["split"] == df["official_split"]).all()
    counts = df.groupby(["split", "subtype"]).size().to_dict()
    assert counts == {
        ("train", "normal"): 16, ("train", "bacterial"): 16, ("train", "viral"): 16,
        ("test", "normal"): 4, ("test", "bacterial"): 4, ("test", "viral"): 4,
    }
    assert set(df["width"]) == {224} and set(df["height"]) == {224} and set(df["mode"]) == {"RGB"}
    assert set(df["patient_source"]) == {"filename"}
    first = df.iloc[0]
    assert Path(first["path"]).is_absolute()
    assert first["content_hash"] == sha256_file(first["path"])
    assert df["pixel_hash"].str.len().eq(64).all()
    assert m.totals()["count"].sum() == 60


def test_nested_zip_copy_and_macosx_are_counted_once(pick, tmp_path: Path, data_root: Path) -> None:
    outer = tmp_path / "archive" / "chest_xray"
    pictures = {
        ("train", "NORMAL"): pick(data_root, "train", "NORMAL", 3),
        ("train", "PNEUMONIA"): pick(data_root, "train", "PNEUMONIA", 3),
        ("test", "NORMAL"): pick(data_root, "test", "NORMAL", 2),
        ("test", "PNEUMONIA"): pick(data_root, "test", "PNEUMONIA", 2),
    }
    for base in (outer, outer / "chest_xray", outer / "__MACOSX" / "chest_xray"):
        for (split, cls), files in pictures.items():
            folder = base / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for src in files:
                if base.parent.name == "__MACOSX":
                    (folder / f"._{src.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
                else:
                    shutil.copy(src, folder / src.name)
    # resource forks and Finder files beside the real images
    (outer / "train" / "NORMAL" / "._IM-0115-0001.jpeg").write_bytes(b"\x00\x05\x16\x07")
    (outer / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (outer / "val" / "NORMAL").mkdir(parents=True)  # an empty official val class folder
    # one image exists only in the inner copy: it must be picked up
    extra = pick(data_root, "train", "NORMAL", 4)[-1]
    shutil.copy(extra, outer / "chest_xray" / "train" / "NORMAL" / extra.name)

    for root in (outer, tmp_path / "archive"):  # the unzipped folder or the download folder
        m = scan_dataset(root, progress=False)
        df = m.df
        assert m.layout == "kermany"
        assert len(df) == 11, _rel(df, root)
        assert df["path"].map(lambda p: Path(p).name).is_unique
        assert not df["path"].str.contains("__MACOSX|/\\._|DS_Store").any()
        assert set(df["status"]) == {"ok"}
        outer_rows = df[~df["path"].str.contains("chest_xray/chest_xray/")]
        assert len(outer_rows) == 10  # the outer copy wins whenever it has the file
        assert df.groupby("official_split").size().to_dict() == {"train": 7, "test": 4}


def test_case_insensitive_split_and_class_folders(pick, tmp_path: Path, data_root: Path) -> None:
    for split, cls in (("Train", "normal"), ("TEST", "Pneumonia"), ("Training", "pneumonia")):
        folder = tmp_path / split / cls
        folder.mkdir(parents=True)
        for src in pick(data_root, "train", cls.upper(), 2):
            shutil.copy(src, folder / src.name)
    m = scan_dataset(tmp_path, progress=False)
    assert m.class_names == ["NORMAL", "PNEUMONIA"]
    assert m.df.groupby(["official_split", "label"]).size().to_dict() == {
        ("test", "PNEUMONIA"): 2, ("train", "NORMAL"): 2, ("train", "PNEUMONIA"): 2,
    }


# -- plain class folders -------------------------------------------------------------------


def test_plain_class_folders(pick, tmp_path: Path, data_root: Path, caplog) -> None:
    for cls in ("normal", "PNEUMONIA"):
        (tmp_path / cls).mkdir()
        for src in pick(data_root, "test", cls.upper(), 3):
            shutil.copy(src, tmp_path / cls / src.name)
    (tmp_path / "COVID").mkdir()  # empty class folder: a warning, not an error
    (tmp_path / "readme.txt").write_text("not data")
    with caplog.at_level(logging.WARNING, logger="pneumoscope.data.scan"):
        m = scan_dataset(tmp_path, progress=False)
    assert m.layout == "classfolders"
    assert m.class_names == ["NORMAL", "PNEUMONIA"]
    assert len(m) == 6 and set(m.df["split"]) == {"train"} and set(m.df["official_split"]) == {"train"}
    assert any("COVID" in r.getMessage() and "no images" in r.getMessage() for r in caplog.records)
    require_classes(m)


def test_single_class_scans_but_cannot_train(pick, tmp_path: Path, data_root: Path) -> None:
    (tmp_path / "NORMAL").mkdir()
    for src in pick(data_root, "test", "NORMAL", 2):
        shutil.copy(src, tmp_path / "NORMAL" / src.name)
    m = scan_dataset(tmp_path, progress=False)
    assert len(m) == 2
    with pytest.raises(DatasetError, match="at least 2 classes"):
        require_classes(m)


def test_empty_folder_and_missing_root(tmp_path: Path, real_jpeg: Path) -> None:
    with pytest.raises(DatasetError, match="this is one image"):
        scan_dataset(real_jpeg, progress=False)
    m = scan_dataset(tmp_path, progress=False)
    assert len(m) == 0 and m.class_names == []
    with pytest.raises(DatasetError, match="no readable images"):
        require_classes(m)
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "absent", progress=False)


# -- CSV -----------------------------------------------------------------------------------


def test_csv_layout(pick, tmp_path: Path, data_root: Path) -> None:
    root = tmp_path / "ds"
    (root / "imgs" / "a").mkdir(parents=True)
    normal, pneu = pick(data_root, "test", "NORMAL", 2), pick(data_root, "test", "PNEUMONIA", 2)
    for src in normal + pneu:
        shutil.copy(src, root / "imgs" / "a" / src.name)
    shutil.copy(normal[0], tmp_path / "outside.jpeg")
    outside = tmp_path / "elsewhere" / "outside2.jpeg"
    outside.parent.mkdir()
    shutil.copy(normal[0], outside)
    lines = [
        "path,label,patient_id,split",
        f"imgs/a/{normal[0].name},normal,,train",
        f"imgs/a/{normal[1].name},NORMAL,child-7,validation",
        f"{root / 'imgs' / 'a' / pneu[0].name},pneumonia,,test",  # absolute, inside the root
        f"imgs/a/{pneu[1].name},PNEUMONIA,,",
        "../outside.jpeg,NORMAL,,train",
        f"{outside},NORMAL,,train",  # absolute, outside the root
        "imgs/a/missing.jpeg,NORMAL,,train",
        f"imgs/a/{normal[0].name},NORMAL,,train",  # listed twice: counted once
    ]
    csv = root / "labels.csv"
    csv.write_text("\n".join(lines) + "\n")
    m = scan_dataset(csv, progress=False)
    df = m.df.set_index(m.df["path"].map(lambda p: os.path.relpath(p, root)))
    assert (m.layout, m.root, m.class_names) == ("csv", csv, ["NORMAL", "PNEUMONIA"])
    assert len(df) == 7
    ok = df[df["status"] == "ok"]
    assert sorted(ok.index) == sorted(f"imgs/a/{p.name}" for p in normal + pneu)
    assert df.loc[f"imgs/a/{normal[1].name}", ["official_split", "patient_id", "patient_source"]].tolist() == [
        "val", "child-7", "csv"
    ]
    assert df.loc[f"imgs/a/{pneu[0].name}", "official_split"] == "test"
    assert df.loc[f"imgs/a/{pneu[1].name}", "official_split"] == "train"  # no split given
    assert df.loc[f"imgs/a/{pneu[1].name}", "subtype"] in ("bacterial", "viral")
    assert df.loc["../outside.jpeg", "error"] == OUTSIDE_ROOT
    assert df.loc["../elsewhere/outside2.jpeg", "error"] == OUTSIDE_ROOT
    assert df.loc["../outside.jpeg", "content_hash"] == ""  # never read
    assert df.loc["imgs/a/missing.jpeg", "error"] == "file not found"


def test_csv_missing_columns_are_named(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("file,diagnosis\na.jpeg,NORMAL\n")
    with pytest.raises(DatasetError, match="lacks required column\\(s\\) path, label"):
        scan_dataset(csv, progress=False)
    csv.write_text("path,class\na.jpeg,NORMAL\n")
    with pytest.raises(DatasetError, match="column\\(s\\) label \\("):
        scan_dataset(csv, progress=False)


def test_csv_bad_rows(tmp_path: Path, real_jpeg: Path) -> None:
    shutil.copy(real_jpeg, tmp_path / "a.jpeg")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label,split\na.jpeg,,train\na.jpeg,NORMAL,holdout\n,NORMAL,train\n")
    m = scan_dataset(csv, progress=False)
    assert sorted(m.df["error"]) == ["empty path", "missing label"]  # second a.jpeg row is a duplicate
    csv.write_text("path,label,split\na.jpeg,NORMAL,holdout\n")
    assert scan_dataset(csv, progress=False).df["error"].tolist() == ["unknown split 'holdout' (use train, val or test)"]


# -- bad files -----------------------------------------------------------------------------


def test_bad_files_become_error_rows_and_good_ones_survive(small_kermany: Path, real_jpeg: Path, make_dicom) -> None:
    folder = small_kermany / "train" / "NORMAL"
    data = real_jpeg.read_bytes()
    (folder / "IM-9001-0001.jpeg").write_bytes(b"")
    (folder / "IM-9002-0001.jpeg").write_bytes(data[: len(data) // 2])
    (folder / "IM-9003-0001.jpeg").write_text("<html><body>Access denied</body></html>")
    (folder / "IM-9004-0001.png").symlink_to(folder / "does-not-exist.png")
    os.mkfifo(folder / "IM-9005-0001.jpg")
    (folder / "notes.txt").write_text("skipped silently")
    (folder / ".DS_Store").write_bytes(b"\x00")
    (folder / "IM-9006-0001").write_bytes(make_dicom(np.full((8, 8), 9, np.uint8)))  # DICOM without extension
    (folder / "sub").mkdir()
    (folder / "sub" / "loop").symlink_to(folder, target_is_directory=True)  # symlink loop

    m = scan_dataset(small_kermany, progress=False)
    df = m.df.set_index(m.df["path"].map(lambda p: Path(p).name))
    assert len(df) == 60 + 6
    errors = df[df["status"] == "error"]["error"].to_dict()
    assert errors == {
        "IM-9001-0001.jpeg": "empty file (0 bytes)",
        "IM-9002-0001.jpeg": "truncated JPEG",
        "IM-9003-0001.jpeg": "not an image (looks like text/HTML)",
        "IM-9004-0001.png": "broken symbolic link",
        "IM-9005-0001.jpg": "not a regular file",
    }
    assert df.loc["IM-9006-0001", "mode"] == "DICOM:MONOCHROME2"
    assert (df["status"] == "ok").sum() == 61
    assert df.loc["IM-9002-0001.jpeg", "content_hash"] != ""  # read, hashed, then failed to decode
    assert pd.isna(df.loc["IM-9001-0001.jpeg", "width"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files without permission bits")
def test_unreadable_file_is_an_error_row(small_kermany: Path, real_jpeg: Path) -> None:
    locked = small_kermany / "test" / "NORMAL" / "IM-9999-0001.jpeg"
    locked.write_bytes(real_jpeg.read_bytes())
    locked.chmod(0)
    m = scan_dataset(small_kermany, progress=False)
    assert m.df.loc[m.df["path"] == str(locked), "error"].tolist() == ["permission denied"]


def test_workers_do_not_change_the_result(small_kermany: Path) -> None:
    one = scan_dataset(small_kermany, progress=False, workers=1).df
    three = scan_dataset(small_kermany, progress=False, workers=3).df
    pd.testing.assert_frame_equal(one, three)


def test_progress_bar_can_be_silenced(small_kermany: Path, capsys) -> None:
    scan_dataset(small_kermany, progress=False)
    assert capsys.readouterr().err == ""
    scan_dataset(small_kermany, progress=True)
    assert "scan" in capsys.readouterr().err


def test_max_pixels_is_passed_through(small_kermany: Path) -> None:
    m = scan_dataset(small_kermany, progress=False, max_pixels=1000)
    assert set(m.df["status"]) == {"error"}
    assert m.df["error"].str.startswith("image is 224x224").all()


def test_permission_denied_becomes_an_error_row(small_kermany: Path, monkeypatch) -> None:
    """Same as above but works as root: the open() used by the reader refuses one file."""
    import builtins

    from pneumoscope.data import imageio

    locked = sorted((small_kermany / "test" / "NORMAL").iterdir())[0]

    def guarded_open(path, *args, **kwargs):  # noqa: ANN001, ANN202
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(imageio, "open", guarded_open, raising=False)
    m = scan_dataset(small_kermany, progress=False)
    assert m.df.loc[m.df["path"] == str(locked), "error"].tolist() == ["permission denied"]
    assert (m.df["status"] == "ok").sum() == 59
