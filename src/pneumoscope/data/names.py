"""Labels, pneumonia subtype and patient id from the file names of the Kermany chest X-ray set.

The published folders only say NORMAL or PNEUMONIA; the finer subtype (bacterial / viral) and the
patient live in the file names, and the patient is what a validation split must keep whole
(several children have many images; a split by image inflates validation scores).

Name patterns found by listing all 5,840 train and test files of the published set::

    person1000_bacteria_2931.jpeg      -> PNEUMONIA, bacterial, patient person1000
    person1000_virus_1681.jpeg         -> PNEUMONIA, viral,     patient person1000
    person447_virus_921_1.jpeg         -> PNEUMONIA, viral,     patient person447 (one extra suffix)
    IM-0115-0001.jpeg                  -> NORMAL,               patient IM-0115
    IM-0011-0001-0002.jpeg             -> NORMAL,               patient IM-0011 (several views)
    NORMAL2-IM-1427-0001.jpeg          -> NORMAL,               patient IM-1427
    NORMAL2-IM-0173-0001-0002.jpeg     -> NORMAL,               patient IM-0173

Decision on shared numbers (checked on the real data): ``IM-XXXX`` and ``NORMAL2-IM-XXXX`` share
328 numbers, and ``personN_bacteria`` / ``personN_virus`` share many person numbers. The evidence
says these are *separate numbering series*, i.e. probably different children:

* each series is cut into train/test at its own boundary (IM: test 0001-0111, train 0115-0766;
  NORMAL2-IM: test 0007-0381, train 0383-1423; bacteria and virus person numbers never cross the
  official train/test boundary within their own series, but do across series);
* 808 of the train person numbers have both bacterial and viral images; two independent
  numberings with the observed local density would share 811 numbers by pure chance, so the
  sharing carries no sign of being the same child.

We nevertheless map both members of a series pair to ONE patient id (``IM-1427``, ``person1000``).
The patient id is a grouping key for leak-free splits: merging two children only makes a group a
little coarser (harmless), while splitting one child across train and validation leaks. The data
check reports ids that cross the official train/test split together with their naming series
(:func:`naming_series`), so the honest reading ("different series: probably a numbering
coincidence") is visible in the report rather than hidden in the id.

Any other name falls back to one patient per file (patient id = file stem, ``patient_source =
'file'``); the data check counts those fallbacks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath

#: Canonical spellings of the two Kermany classes.
NORMAL = "NORMAL"
PNEUMONIA = "PNEUMONIA"

_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_\d+(?:_\d+)*$", re.IGNORECASE)
_IM = re.compile(r"^(NORMAL2-)?(IM-\d+)(?:-\d+)+$", re.IGNORECASE)
# "name (1).jpeg" / "name copy.jpeg": copies made by file managers keep the patient of the original.
_COPY_SUFFIX = re.compile(r"(?:\s*\(\d+\)|\s+copy(?:\s*\d+)?)$", re.IGNORECASE)

_SUBTYPE_WORDS = {"bacteria": "bacterial", "virus": "viral"}


@dataclass(frozen=True)
class NameInfo:
    """What a file name (and its class folder) says about an image.

    ``label``: ``'NORMAL'`` / ``'PNEUMONIA'`` (or the folder name for other class sets), ``None``
    when neither folder nor name tells. ``subtype``: ``'normal'``, ``'bacterial'``, ``'viral'`` or
    ``None``. ``patient_id``: grouping key for patient-level splits. ``patient_source``:
    ``'filename'`` when the id came from a known pattern, ``'file'`` for the one-patient-per-file
    fallback.
    """

    label: str | None
    subtype: str | None
    patient_id: str | None
    patient_source: str


def normalize_label(value: str | None) -> str | None:
    """Canonical class name: NORMAL / PNEUMONIA in any case become upper case; others are kept.

    Other class names (a user's own folders) are only stripped, so a dataset with, say,
    ``COVID`` folders still scans; empty values become ``None``.
    """
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    if text.upper() in (NORMAL, PNEUMONIA):
        return text.upper()
    return text


def _stem(name: str) -> str:
    """File name without folders and without its last extension, copy suffixes removed."""
    stem = PurePath(name).name
    if "." in stem.lstrip("."):
        stem = stem[: stem.rfind(".")]
    return _COPY_SUFFIX.sub("", stem)


def _subtype_from_words(stem: str) -> str | None:
    low = stem.lower()
    for word, subtype in _SUBTYPE_WORDS.items():
        if f"_{word}_" in low or low.endswith(f"_{word}"):
            return subtype
    return None


def naming_series(name: str) -> str | None:
    """The numbering series a Kermany name belongs to, or ``None`` for other names.

    ``'person-bacteria'``, ``'person-virus'``, ``'IM'`` or ``'NORMAL2-IM'``. Two files with the
    same patient id but different series are probably different children (see module docstring).
    """
    stem = _stem(name)
    if m := _PERSON.match(stem):
        return f"person-{m.group(2).lower()}"
    if m := _IM.match(stem):
        return "NORMAL2-IM" if m.group(1) else "IM"
    return None


def parse_filename(name: str, folder_label: str | None = None) -> NameInfo:
    """Label, subtype and patient id of one image file.

    ``name`` may be a bare file name or a path (only the last component is used).
    ``folder_label`` is the class folder the file was found in (any case) or a CSV label; when
    given it decides the label, because the folder is what the publishers labelled. The subtype
    then follows the label: NORMAL -> ``'normal'``; PNEUMONIA -> bacterial/viral from the name,
    ``None`` when the name does not say (or contradicts the folder).
    """
    stem = _stem(name)
    label = normalize_label(folder_label)
    patient_id: str | None = None
    name_label: str | None = None

    if m := _PERSON.match(stem):
        patient_id = m.group(1).lower()
        name_label = PNEUMONIA
    elif m := _IM.match(stem):
        patient_id = m.group(2).upper()
        name_label = NORMAL

    word_subtype = _subtype_from_words(stem)
    if name_label is None and word_subtype is not None:
        name_label = PNEUMONIA
    if label is None:
        label = name_label

    subtype: str | None
    if label == NORMAL:
        subtype = "normal"
    elif label == PNEUMONIA:
        subtype = word_subtype
    else:
        subtype = None

    if patient_id is None:
        return NameInfo(label=label, subtype=subtype, patient_id=stem, patient_source="file")
    return NameInfo(label=label, subtype=subtype, patient_id=patient_id, patient_source="filename")
