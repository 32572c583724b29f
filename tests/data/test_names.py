from __future__ import annotations

import os
from pathlib import Path

import pytest

from pneumoscope.data.names import NameInfo, naming_series, normalize_label, parse_filename


@pytest.mark.parametrize(
    ("name", "label", "subtype", "patient"),
    [
        ("person1000_bacteria_2931.jpeg", "PNEUMONIA", "bacterial", "person1000"),
        ("person1000_virus_1681.jpeg", "PNEUMONIA", "viral", "person1000"),
        ("person1_bacteria_1.jpeg", "PNEUMONIA", "bacterial", "person1"),
        ("person1001_bacteria_2932.jpeg", "PNEUMONIA", "bacterial", "person1001"),
        ("person447_virus_921_1.jpeg", "PNEUMONIA", "viral", "person447"),
        ("IM-0115-0001.jpeg", "NORMAL", "normal", "IM-0115"),
        ("IM-0011-0001-0002.jpeg", "NORMAL", "normal", "IM-0011"),
        ("NORMAL2-IM-1427-0001.jpeg", "NORMAL", "normal", "IM-1427"),
        ("NORMAL2-IM-0173-0001-0002.jpeg", "NORMAL", "normal", "IM-0173"),
        ("PERSON12_BACTERIA_3.JPEG", "PNEUMONIA", "bacterial", "person12"),
        ("person12_virus_3 (1).png", "PNEUMONIA", "viral", "person12"),
        ("/some/folder/IM-0500-0001.dcm", "NORMAL", "normal", "IM-0500"),
    ],
)
def test_known_patterns_without_folder(name: str, label: str, subtype: str, patient: str) -> None:
    assert parse_filename(name) == NameInfo(label, subtype, patient, "filename")


def test_normal2_and_im_with_same_number_share_a_patient() -> None:
    # Decision documented in names.py: the two series are merged (conservative grouping).
    assert parse_filename("NORMAL2-IM-0095-0001.jpeg").patient_id == parse_filename("IM-0095-0001.jpeg").patient_id


def test_series_tell_the_numberings_apart() -> None:
    assert naming_series("NORMAL2-IM-0095-0001.jpeg") == "NORMAL2-IM"
    assert naming_series("IM-0095-0001.jpeg") == "IM"
    assert naming_series("person3_bacteria_10.jpeg") == "person-bacteria"
    assert naming_series("person3_virus_11.jpeg") == "person-virus"
    assert naming_series("scan.png") is None


def test_folder_label_decides_and_is_case_insensitive() -> None:
    assert parse_filename("IM-0115-0001.jpeg", folder_label="normal") == NameInfo("NORMAL", "normal", "IM-0115", "filename")
    assert parse_filename("person5_virus_9.jpeg", folder_label="Pneumonia").subtype == "viral"
    # A name that contradicts its folder: the folder wins, the subtype is left unknown.
    contradiction = parse_filename("IM-0115-0001.jpeg", folder_label="PNEUMONIA")
    assert (contradiction.label, contradiction.subtype) == ("PNEUMONIA", None)


def test_unknown_names_fall_back_to_one_patient_per_file() -> None:
    assert parse_filename("scan_0042.png") == NameInfo(None, None, "scan_0042", "file")
    assert parse_filename("scan_0042.png", folder_label="NORMAL") == NameInfo("NORMAL", "normal", "scan_0042", "file")
    # The subtype words still count when the rest of the name is unknown.
    assert parse_filename("child_virus_7.dcm", folder_label="PNEUMONIA") == NameInfo(
        "PNEUMONIA", "viral", "child_virus_7", "file"
    )
    assert parse_filename("child_bacteria_7.dcm") == NameInfo("PNEUMONIA", "bacterial", "child_bacteria_7", "file")


def test_other_class_names_are_kept() -> None:
    assert normalize_label(" covid ") == "covid"
    assert normalize_label("normal") == "NORMAL"
    assert normalize_label("") is None
    assert parse_filename("a.png", folder_label="COVID") == NameInfo("COVID", None, "a", "file")


def test_every_real_file_name_parses_to_a_patient(data_root: Path) -> None:
    """No real file may fall back, and the name must agree with the folder it is in."""
    checked = 0
    for split in sorted(os.listdir(data_root)):
        for cls in sorted(os.listdir(data_root / split)):
            for name in os.listdir(data_root / split / cls):
                from_name = parse_filename(name)
                from_folder = parse_filename(name, folder_label=cls)
                assert from_name.patient_source == "filename", name
                assert from_name.label == cls, name
                assert from_folder == from_name, name
                assert from_name.subtype in (("normal",) if cls == "NORMAL" else ("bacterial", "viral")), name
                checked += 1
    assert checked >= 5840
