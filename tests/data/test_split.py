from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pneumoscope.data.manifest import Manifest
from pneumoscope.data.names import parse_filename
from pneumoscope.data.split import group_ids, patient_split
from pneumoscope.errors import ConfigError, DatasetError

# The published 16-image val folder (not in the shared copy): same naming, its own patients.
OFFICIAL_VAL = [f"NORMAL2-IM-{1427 + i:04d}-0001.jpeg" for i in range(8)] + [
    f"person{1946 + i}_bacteria_{4874 + i}.jpeg" for i in range(8)
]


def _row(path: str, split: str, cls: str) -> dict[str, object]:
    info = parse_filename(os.path.basename(path), folder_label=cls)
    return {
        "path": path, "split": split, "official_split": split, "label": info.label,
        "subtype": info.subtype, "patient_id": info.patient_id, "patient_source": info.patient_source,
        "width": 224, "height": 224, "mode": "RGB", "content_hash": f"c:{path}", "pixel_hash": f"p:{path}",
        "status": "ok", "error": "",
    }


@pytest.fixture(scope="module")
def kermany_names(data_root: Path) -> Manifest:
    """The real file names and patients (no decoding needed for a split) plus an official val folder."""
    rows = [
        _row(str(data_root / split / cls / name), split, cls)
        for split in ("train", "test")
        for cls in ("NORMAL", "PNEUMONIA")
        for name in sorted(os.listdir(data_root / split / cls))
    ]
    rows += [_row(f"/val/{'NORMAL' if n.startswith('N') else 'PNEUMONIA'}/{n}", "val",
                  "NORMAL" if n.startswith("N") else "PNEUMONIA") for n in OFFICIAL_VAL]
    return Manifest(pd.DataFrame(rows), data_root, "kermany", ["NORMAL", "PNEUMONIA"])


@pytest.fixture(scope="module")
def split_df(kermany_names: Manifest):  # noqa: ANN201
    """``split_df(seed)``: the default split of the real names, computed once per seed (~1 s each)."""
    cache: dict[int, pd.DataFrame] = {}

    def get(seed: int) -> pd.DataFrame:
        if seed not in cache:
            cache[seed] = patient_split(kermany_names, val_fraction=0.15, seed=seed).df
        return cache[seed]

    return get


def test_no_patient_on_both_sides_and_test_untouched(kermany_names: Manifest, split_df) -> None:
    out = split_df(0)
    before = kermany_names.df
    train_p = set(out.loc[out["split"] == "train", "patient_id"])
    val_p = set(out.loc[out["split"] == "val", "patient_id"])
    assert train_p and val_p and not (train_p & val_p)
    test = out["official_split"] == "test"
    pd.testing.assert_frame_equal(out[test], before[test])
    assert set(out.loc[~test, "split"]) == {"train", "val"}
    assert len(out) == len(before)


def test_official_val_joins_the_pool(split_df) -> None:
    sides = []
    for seed in range(4):
        out = split_df(seed)
        official_val = out[out["official_split"] == "val"]
        assert len(official_val) == 16
        sides.append(set(official_val["split"]))
    # some of the old val images are trained on: the folder is part of the pool, not kept as is
    assert any("train" in s for s in sides)


def test_stratified_within_two_percent(split_df) -> None:
    for seed in (0, 1, 2):
        out = split_df(seed)
        pool = out[out["official_split"].isin(["train", "val"])]
        val = pool[pool["split"] == "val"]
        assert 0.12 <= len(val) / len(pool) <= 0.18
        pool_share = pool["subtype"].value_counts(normalize=True)
        val_share = val["subtype"].value_counts(normalize=True)
        for subtype in ("normal", "bacterial", "viral"):
            assert abs(val_share[subtype] - pool_share[subtype]) <= 0.02, (seed, subtype)


def test_val_fraction_is_followed(kermany_names: Manifest) -> None:
    out = patient_split(kermany_names, val_fraction=0.25, seed=0).df
    pool = out[out["official_split"].isin(["train", "val"])]
    assert 0.22 <= (pool["split"] == "val").mean() <= 0.28


def test_same_seed_same_split_other_seed_other_split(kermany_names: Manifest) -> None:
    a = patient_split(kermany_names, seed=7).df["split"]
    b = patient_split(kermany_names, seed=7).df["split"]
    c = patient_split(kermany_names, seed=8).df["split"]
    pd.testing.assert_series_equal(a, b)
    assert (a != c).sum() > 100


def test_returns_a_new_manifest(kermany_names: Manifest) -> None:
    before = kermany_names.df["split"].copy()
    out = patient_split(kermany_names, seed=0)
    assert out is not kermany_names
    pd.testing.assert_series_equal(kermany_names.df["split"], before)
    assert (out.root, out.layout, out.class_names) == (kermany_names.root, "kermany", ["NORMAL", "PNEUMONIA"])


def _toy(n_patients: int = 40) -> pd.DataFrame:
    rows = []
    for i in range(n_patients):
        cls = "NORMAL" if i % 2 else "PNEUMONIA"
        for k in range(2):
            name = f"IM-{i:04d}-000{k}.jpeg" if cls == "NORMAL" else f"person{i}_bacteria_{2 * i + k}.jpeg"
            rows.append(_row(f"/t/train/{cls}/{name}", "train", cls))
    return pd.DataFrame(rows)


def test_pixel_identical_images_of_different_patients_stay_together() -> None:
    df = _toy()
    df.loc[0, "pixel_hash"] = df.loc[7, "pixel_hash"] = "same-pixels"
    assert df.loc[0, "patient_id"] != df.loc[7, "patient_id"]
    groups = group_ids(df)
    assert groups[0] == groups[7] == groups[6]  # row 6 is row 7's patient: the whole patient joins
    manifest = Manifest(df, Path("/t"), "kermany", ["NORMAL", "PNEUMONIA"])
    for seed in range(10):
        out = patient_split(manifest, val_fraction=0.2, seed=seed).df
        assert out.loc[0, "split"] == out.loc[7, "split"] == out.loc[6, "split"]


def test_error_rows_are_kept_and_follow_their_patient() -> None:
    df = _toy()
    df.loc[1, ["status", "error", "pixel_hash"]] = ["error", "truncated JPEG", ""]
    extra = _row("/t/train/NORMAL/lonely.jpeg", "train", "NORMAL") | {"status": "error", "error": "empty file (0 bytes)"}
    df = pd.concat([df, pd.DataFrame([extra])], ignore_index=True)
    manifest = Manifest(df, Path("/t"), "kermany", ["NORMAL", "PNEUMONIA"])
    for seed in range(5):
        out = patient_split(manifest, val_fraction=0.2, seed=seed).df
        assert len(out) == len(df)
        assert out.loc[1, "split"] == out.loc[0, "split"]  # same patient as row 0
        assert out.iloc[-1]["split"] == "train"  # a patient with no readable image


def test_bad_arguments_and_too_few_patients() -> None:
    manifest = Manifest(_toy(), Path("/t"), "kermany", ["NORMAL", "PNEUMONIA"])
    with pytest.raises(ConfigError, match="val_fraction"):
        patient_split(manifest, val_fraction=1.5)
    with pytest.raises(ConfigError, match="stratify_on"):
        patient_split(manifest, stratify_on="colour")
    one = Manifest(_toy().iloc[:2], Path("/t"), "kermany", ["NORMAL", "PNEUMONIA"])
    with pytest.raises(DatasetError, match="1 patient"):
        patient_split(one)


def test_few_patients_still_split(small_kermany: Path) -> None:
    from pneumoscope.data.scan import scan_dataset

    out = patient_split(scan_dataset(small_kermany, progress=False), seed=0).df
    pool = out[out["official_split"] == "train"]
    assert set(pool["split"]) == {"train", "val"}
    assert not set(pool.loc[pool["split"] == "val", "patient_id"]) & set(pool.loc[pool["split"] == "train", "patient_id"])
    assert np.isin(out.loc[out["official_split"] == "test", "split"], ["test"]).all()


# ------------------------------------------------------------------ ordered (temporal) split
def _numbers(df: pd.DataFrame) -> pd.Series:
    return df["patient_id"].str.extract(r"(\d+)")[0].astype(int)


def test_ordered_split_takes_the_earliest_patients_of_each_series(kermany_names: Manifest) -> None:
    out = patient_split(kermany_names, val_fraction=0.15, seed=0, method="ordered").df
    pool = out[out["official_split"].isin(["train", "val"])]
    train_p = set(pool.loc[pool["split"] == "train", "patient_id"])
    val_p = set(pool.loc[pool["split"] == "val", "patient_id"])
    assert val_p and not (train_p & val_p)
    names = pool["path"].map(os.path.basename)
    normal2 = names.str.startswith("NORMAL2-")
    im = pool["subtype"].eq("normal") & ~normal2
    for series in (im, pool["subtype"].eq("normal") & normal2):
        # the NORMAL2 series' first numbers (0383..) are also IM numbers, so a merged patient can
        # carry a few later IM images into val; the series' own cut is still at its beginning
        val_n, train_n = _numbers(pool[series & (pool["split"] == "val")]), _numbers(pool[series & (pool["split"] == "train")])
        assert val_n.min() == _numbers(pool[series]).min()
        assert (val_n < train_n.min()).mean() >= 0.4
    normal = pool[pool["subtype"] == "normal"]
    assert 0.14 <= (normal["split"] == "val").mean() <= 0.17
    bacterial = pool[pool["subtype"] == "bacterial"]
    assert _numbers(bacterial[bacterial["split"] == "val"]).median() < _numbers(bacterial[bacterial["split"] == "train"]).quantile(0.1)
    # person numbers join the bacterial and viral series, so one stratum may take the other's images
    assert 0.14 <= (pool["split"] == "val").mean() <= 0.20
    test = out["official_split"] == "test"
    pd.testing.assert_frame_equal(out[test], kermany_names.df[test])


def test_ordered_split_ignores_the_seed_and_differs_from_random(kermany_names: Manifest) -> None:
    a = patient_split(kermany_names, seed=1, method="ordered").df["split"]
    b = patient_split(kermany_names, seed=2, method="ordered").df["split"]
    pd.testing.assert_series_equal(a, b)
    assert (a != patient_split(kermany_names, seed=1).df["split"]).sum() > 300


def test_ordered_split_keeps_every_stratum_in_train_and_rejects_unknown_methods() -> None:
    rows = [_row(f"/t/train/NORMAL/IM-{i:04d}-0001.jpeg", "train", "NORMAL") for i in range(3)]
    rows += [_row("/t/train/PNEUMONIA/person1_bacteria_1.jpeg", "train", "PNEUMONIA")]
    manifest = Manifest(pd.DataFrame(rows), Path("/t"), "kermany", ["NORMAL", "PNEUMONIA"])
    out = patient_split(manifest, val_fraction=0.5, method="ordered").df
    assert out["split"].tolist() == ["val", "val", "train", "train"]  # the lone pneumonia patient stays in train
    with pytest.raises(ConfigError, match="split method"):
        patient_split(manifest, method="temporal")


# ------------------------------------------------------------------ external validation (data.val_source)
def _link(dst: Path, files: list[Path]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for src in files:
        (dst / src.name).symlink_to(src)


@pytest.fixture()
def external_folder(tmp_path: Path, data_root: Path, pick) -> Path:  # noqa: ANN001
    """A class-folder dataset of real images from *other* patients than ``small_kermany``'s train:
    6 normal and 6 pneumonia films taken from further down the sorted train folders."""
    root = tmp_path / "external"
    _link(root / "NORMAL", pick(data_root, "train", "NORMAL", 40)[30:36])
    _link(root / "PNEUMONIA", pick(data_root, "train", "PNEUMONIA", 40, "bacteria")[30:36])
    return root


def test_external_split_trains_on_the_whole_pool_and_validates_on_the_other_dataset(
        small_kermany: Path, external_folder: Path) -> None:
    from pneumoscope.data.scan import scan_dataset
    from pneumoscope.data.split import external_split

    base = scan_dataset(small_kermany, progress=False)
    out = external_split(base, scan_dataset(external_folder, progress=False)).df
    ext = out["path"].str.startswith(str(external_folder))
    assert ext.sum() == 12 and (out.loc[ext, "split"] == "val").all()
    pool = base.df[base.df["official_split"] == "train"]
    assert set(out.loc[out["split"] == "train", "path"]) == set(pool["path"])  # nothing of the pool held out
    assert (out.loc[out["official_split"] == "test", "split"] == "test").all()
    assert set(out.loc[out["official_split"] == "test", "path"]) == set(base.df.loc[base.df["official_split"] == "test",
                                                                                 "path"])
    again = external_split(Manifest(out, base.root, base.layout, base.class_names),
                           scan_dataset(external_folder, progress=False)).df
    assert len(again) == len(out) and (again.sort_values("path")["split"].to_numpy()
                                       == out.sort_values("path")["split"].to_numpy()).all()


def test_external_split_drops_train_images_that_leak_into_validation(
        small_kermany: Path, external_folder: Path, caplog) -> None:  # noqa: ANN001
    """A file of the train pool (same bytes) and another film of a train patient make the external
    set not external: those train images go, with a warning; the external test split is never used."""
    from pneumoscope.data.scan import scan_dataset
    from pneumoscope.data.split import external_split

    ext = external_folder.parent / "external_kermany"  # train/ and test/ folders this time
    for cls in ("NORMAL", "PNEUMONIA"):
        _link(ext / "train" / cls, [f.resolve() for f in sorted((external_folder / cls).iterdir())])
    same_file = sorted((small_kermany / "train" / "NORMAL").iterdir())[0]
    (ext / "train" / "NORMAL" / "copy.jpeg").symlink_to(same_file.resolve())  # no patient id in this name
    train_bact = sorted((small_kermany / "train" / "PNEUMONIA").glob("*bacteria*"))
    patient = train_bact[0].name.split("_")[0]
    base = scan_dataset(small_kermany, progress=False)
    of_patient = base.df[(base.df["patient_id"] == patient) & (base.df["official_split"] == "train")]
    (ext / "train" / "PNEUMONIA" / f"{patient}_bacteria_99999.jpeg").symlink_to(
        sorted((external_folder / "PNEUMONIA").iterdir())[0].resolve())
    # a train image in the external set's *test* folder: never used, so it takes nothing from train
    _link(ext / "test" / "NORMAL", [sorted((small_kermany / "train" / "NORMAL").iterdir())[1].resolve()])
    caplog.set_level("INFO", logger="pneumoscope.data.split")
    out = external_split(base, scan_dataset(ext, progress=False)).df
    assert not out["path"].str.startswith(str(ext / "test")).any()
    train = out[out["split"] == "train"]
    assert not train["content_hash"].isin(out.loc[out["split"] == "val", "content_hash"]).any()
    assert patient not in set(train["patient_id"]) and len(of_patient) >= 1
    dropped = len(base.df[base.df["official_split"] == "train"]) - len(train)
    assert dropped == 1 + len(of_patient)
    assert f"{dropped} train images share a patient" in caplog.text


def test_external_split_refuses_what_would_not_be_external(small_kermany: Path, external_folder: Path,
                                                           tmp_path: Path) -> None:
    from pneumoscope.data.scan import scan_dataset
    from pneumoscope.data.split import validation_split

    base = scan_dataset(small_kermany, progress=False)
    with pytest.raises(DatasetError, match="is the training data itself"):
        validation_split(base, val_source=small_kermany)
    with pytest.raises(DatasetError, match="no such folder or CSV"):
        validation_split(base, val_source=tmp_path / "missing")
    only_test = tmp_path / "only_test"
    _link(only_test / "test" / "NORMAL", sorted((external_folder / "NORMAL").iterdir())[:2])
    _link(only_test / "test" / "PNEUMONIA", sorted((external_folder / "PNEUMONIA").iterdir())[:2])
    with pytest.raises(DatasetError, match="outside its test split"):
        validation_split(base, val_source=only_test)
    wrong = tmp_path / "wrong_classes"
    _link(wrong / "COVID", sorted((external_folder / "PNEUMONIA").iterdir())[:2])
    _link(wrong / "NORMAL", sorted((external_folder / "NORMAL").iterdir())[:2])
    with pytest.raises(DatasetError, match="do not match"):
        validation_split(base, val_source=wrong)
