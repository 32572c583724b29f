"""Dataset layer: find images, decode them, describe them as a table, split by patient, check.

    >>> from pneumoscope.data import scan_dataset, patient_split
    >>> manifest = patient_split(scan_dataset("chest_xray"), val_fraction=0.15, seed=0)  # doctest: +SKIP
    >>> manifest.subset("val").ok().df.head()  # doctest: +SKIP
"""

from __future__ import annotations

from pneumoscope.data.check import build_report, check_command, format_summary, has_problems, run_check
from pneumoscope.data.imageio import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_EXTENSIONS,
    DecodedImage,
    decode_image,
    is_image_name,
    pixel_digest,
    probe_image,
    read_file_bytes,
    read_image,
)
from pneumoscope.data.manifest import MANIFEST_COLUMNS, Manifest, require_classes
from pneumoscope.data.names import NameInfo, naming_series, normalize_label, parse_filename
from pneumoscope.data.paths import DATA_ENV_VAR, resolve_data_root
from pneumoscope.data.scan import scan_dataset
from pneumoscope.data.split import group_ids, patient_split

__all__ = [
    "DATA_ENV_VAR",
    "DEFAULT_MAX_PIXELS",
    "MANIFEST_COLUMNS",
    "SUPPORTED_EXTENSIONS",
    "DecodedImage",
    "Manifest",
    "NameInfo",
    "build_report",
    "check_command",
    "decode_image",
    "format_summary",
    "group_ids",
    "has_problems",
    "is_image_name",
    "naming_series",
    "normalize_label",
    "parse_filename",
    "patient_split",
    "pixel_digest",
    "probe_image",
    "read_file_bytes",
    "read_image",
    "require_classes",
    "resolve_data_root",
    "run_check",
    "scan_dataset",
]
