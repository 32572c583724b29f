from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pneumoscope.data.manifest import MANIFEST_COLUMNS, Manifest, require_classes
from pneumoscope.errors import DatasetError


def _row(path: str, split: str, label: str, subtype: str, patient: str, **kw: object) -> dict[str, object]:
    row: dict[str, object] = {
        "path": path,
        "split": split,
        "official_split": kw.pop("official_split", split),
        "label": label,
        "subtype": subtype,
        "patient_id": patient,
        "patient_source": "filename",
        "width": 224,
        "height": 200,
        "mode": "RGB",
        "content_hash": f"c-{path}",
        "pixel_hash": f"p-{path}",
        "status": "ok",
        "error": "",
    }
    row.update(kw)
    return row


@pytest.fixture()
def manifest(tmp_path: Path) -> Manifest:
    rows = [
        _row("/d/train/NORMAL/IM-0001-0001.jpeg", "train", "NORMAL", "normal", "IM-0001"),
        _row("/d/train/NORMAL/IM-0002-0001.jpeg", "train", "NORMAL", "normal", "IM-0002"),
        _row("/d/train/PNEUMONIA/person1_bacteria_1.jpeg", "train", "PNEUMONIA", "bacterial", "person1"),
        _row("/d/train/PNEUMONIA/person2_virus_2.jpeg", "val", "PNEUMONIA", "viral", "person2", official_split="train"),
        _row("/d/test/PNEUMONIA/person3_virus_3.jpeg", "test", "PNEUMONIA", "viral", "person3"),
        _row("/d/test/NORMAL/ü, \"odd\" name.jpeg", "test", "NORMAL", "normal", "ü, \"odd\" name",
             patient_source="file"),
        _row("/d/test/NORMAL/broken.jpeg", "test", "NORMAL", "normal", "broken", width=None, height=None, mode="",
             pixel_hash="", status="error", error="truncated JPEG"),
    ]
    return Manifest(pd.DataFrame(rows), Path("/d"), "kermany", ["NORMAL", "PNEUMONIA"])


def test_properties_len_and_views(manifest: Manifest) -> None:
    assert list(manifest.df.columns) == MANIFEST_COLUMNS
    assert (manifest.root, manifest.layout, manifest.class_names) == (Path("/d"), "kermany", ["NORMAL", "PNEUMONIA"])
    assert len(manifest) == 7
    assert len(manifest.ok()) == 6
    assert set(manifest.ok().df["status"]) == {"ok"}
    assert len(manifest.subset("test")) == 3
    assert len(manifest.subset(["train", "val"])) == 4
    assert manifest.subset("val").df["path"].tolist() == ["/d/train/PNEUMONIA/person2_virus_2.jpeg"]
    # views keep the metadata and leave the original alone
    assert manifest.subset("test").class_names == ["NORMAL", "PNEUMONIA"]
    assert len(manifest) == 7


def test_missing_values_are_normalised(manifest: Manifest) -> None:
    broken = manifest.df[manifest.df["status"] == "error"].iloc[0]
    assert pd.isna(broken["width"]) and broken["pixel_hash"] == ""
    assert str(manifest.df["width"].dtype) == "Int64"


def test_totals_counts_ok_images_in_split_and_class_order(manifest: Manifest) -> None:
    totals = manifest.totals()
    assert list(totals.columns) == ["split", "label", "subtype", "count"]
    as_tuples = [tuple(r) for r in totals.itertuples(index=False)]
    assert as_tuples == [
        ("train", "NORMAL", "normal", 2),
        ("train", "PNEUMONIA", "bacterial", 1),
        ("val", "PNEUMONIA", "viral", 1),
        ("test", "NORMAL", "normal", 1),
        ("test", "PNEUMONIA", "viral", 1),
    ]


def test_repr_shows_layout_root_and_counts(manifest: Manifest) -> None:
    text = repr(manifest)
    assert "layout='kermany'" in text and "root='/d'" in text and "images=7, errors=1" in text
    lines = text.splitlines()
    header = lines[2].split()
    assert header == ["NORMAL", "PNEUMONIA", "total"]
    assert lines[3].split() == ["train", "2", "1", "3"]
    assert lines[4].split() == ["val", "0", "1", "1"]
    assert lines[5].split() == ["test", "1", "1", "2"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_save_load_round_trip(manifest: Manifest, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / "sub" / f"manifest{suffix}"
    manifest.save(path)
    loaded = Manifest.load(path)
    pd.testing.assert_frame_equal(loaded.df, manifest.df)
    assert (loaded.root, loaded.layout, loaded.class_names) == (manifest.root, manifest.layout, manifest.class_names)
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert leftovers == []
    if suffix == ".csv":
        assert (tmp_path / "sub" / "manifest.csv.meta.json").is_file()


def test_csv_without_sidecar_infers_metadata(manifest: Manifest, tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    manifest.save(path)
    (tmp_path / "m.csv.meta.json").unlink()
    loaded = Manifest.load(path)
    assert loaded.class_names == ["NORMAL", "PNEUMONIA"]
    assert loaded.layout == "unknown"
    assert loaded.root == Path("/d")


def test_bad_suffix_missing_file_and_missing_columns(manifest: Manifest, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="csv or .parquet"):
        manifest.save(tmp_path / "m.xlsx")
    with pytest.raises(DatasetError, match="not found"):
        Manifest.load(tmp_path / "absent.parquet")
    with pytest.raises(DatasetError, match="pixel_hash, status"):
        Manifest(manifest.df.drop(columns=["pixel_hash", "status"]), Path("/d"), "csv", [])


def test_require_classes(manifest: Manifest) -> None:
    require_classes(manifest)  # two classes: fine
    with pytest.raises(DatasetError, match="at least 2 classes, found 1 \\(NORMAL: 3\\)"):
        require_classes(Manifest(manifest.df[manifest.df["label"] == "NORMAL"], Path("/d"), "kermany", ["NORMAL"]))
    empty = Manifest(manifest.df.iloc[0:0], Path("/empty"), "classfolders", [])
    with pytest.raises(DatasetError, match="no readable images"):
        require_classes(empty)
    only_errors = Manifest(manifest.df[manifest.df["status"] == "error"], Path("/d"), "kermany", ["NORMAL"])
    with pytest.raises(DatasetError, match="no readable images"):
        require_classes(only_errors)
