"""Fixtures for the dataset-layer tests: DICOM files built from real X-rays, one cached full scan."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
import pytest


def build_dicom(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    preamble: bool = True,
    with_pixels: bool = True,
    **elements: object,
) -> bytes:
    """A minimal uncompressed DICOM (explicit VR little endian) holding ``pixels``.

    ``pixels`` is (H, W) or (frames, H, W), uint8 or uint16. Extra keyword arguments become
    data elements (``RescaleSlope=...``, ``WindowCenter=...``).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientID = "TEST"
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if pixels.ndim == 3:
        ds.NumberOfFrames = int(pixels.shape[0])
    for key, value in elements.items():
        setattr(ds, key, value)
    if with_pixels:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if preamble:
        ds.preamble = b"\0" * 128
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=preamble)
    return out.getvalue()


@pytest.fixture(scope="session")
def pick() -> Callable[..., list[Path]]:
    """``pick(root, split, cls, n, contains="")``: same rule as ``pick_images`` in tests/conftest.py.

    A fixture rather than ``from conftest import pick_images``: two conftest.py files share the
    module name ``conftest``, so that import would depend on collection order.
    """

    def _pick(root: Path, split: str, cls: str, n: int, contains: str = "") -> list[Path]:
        return sorted(p for p in (root / split / cls).iterdir() if contains in p.name)[:n]

    return _pick


@pytest.fixture(scope="session")
def make_dicom() -> Callable[..., bytes]:
    return build_dicom


@pytest.fixture(scope="session")
def real_jpeg(data_root: Path) -> Path:
    """One real 224x224 RGB JPEG (a normal chest film)."""
    return data_root / "train" / "NORMAL" / "IM-0115-0001.jpeg"


@pytest.fixture(scope="session")
def real_manifest(data_root: Path):  # noqa: ANN201
    """The full real dataset, scanned once per session (a few seconds)."""
    from pneumoscope.data.scan import scan_dataset

    return scan_dataset(data_root, progress=False, workers=2)
