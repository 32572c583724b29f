"""Test helpers shared by the serve, predict and export tests: a tiny random-init model, DICOM
files built from real JPEGs, hand-made bad images, and a real server process on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]


def make_checkpoint(root: Path, *, name: str = "cnn3", temperature: float = 1.3, threshold: float = 0.5,
                    seed: int = 0, size: int | None = None, resize: str = "squash", **extra_meta) -> Path:
    """A random-init model saved as a checkpoint root (``root/best.json`` + ``best-*/``); returns root."""
    from pneumoscope.models import create_model, model_spec
    from pneumoscope.train.checkpoint import save_checkpoint

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(name, num_classes=2, pretrained=False).eval()
        # Random init gives near-constant outputs; spread the last layer a little so images differ.
        for p in model.head.parameters():
            p.data.mul_(8.0)
    meta = {
        "format": "pneumoscope-checkpoint/1", "model": model_spec(model), "task": "binary",
        "class_names": ["NORMAL", "PNEUMONIA"], "output": "softmax",
        "preprocess": {"size": size or model.card.input_size, "resize": resize, "clahe": False, "clahe_clip": 2.0,
                       "clahe_grid": 8, "blur_sigma": 0.0},
        "threshold": {"rule": "youden", "threshold": threshold}, "temperature": temperature,
        "run_name": "test", "seed": seed, "val_metrics": {"auroc": 0.5, "accuracy": 0.5, "curve": [1, 2]},
        **extra_meta,
    }
    save_checkpoint(root, "best", model=model, meta=meta)
    return root


# ------------------------------------------------------------------------------------ images


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A tiny, valid-looking PNG whose IHDR claims ``width`` x ``height`` (correct CRC)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def make_dicom(src_jpeg: Path, dest: Path, *, photometric: str = "MONOCHROME2", bits: int = 8,
               slope: float = 1.0, intercept: float = 0.0) -> Path:
    """A DICOM file with the pixels of a real JPEG.

    MONOCHROME1 stores inverted values (bright = low). With ``bits=16`` the stored values are
    ``(gray * 200 + 100 - intercept) / slope`` so that the modality LUT (slope/intercept) maps them
    back to a linear function of the gray values.
    """
    import pydicom
    from PIL import Image
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    gray = np.asarray(Image.open(src_jpeg).convert("L"), dtype=np.float64)
    if bits == 8:
        stored = 255.0 - gray if photometric == "MONOCHROME1" else gray
        arr = stored.astype(np.uint8)
    else:
        value = gray * 200.0 + 100.0
        if photometric == "MONOCHROME1":
            value = (255.0 * 200.0 + 200.0) - value
        stored = np.rint((value - intercept) / slope)
        assert stored.min() >= 0 and stored.max() <= 65535, "slope/intercept push the values out of uint16"
        arr = stored.astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(dest), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientID = "TEST"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if bits == 16:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    ds.PixelData = arr.tobytes()
    pydicom.dcmwrite(dest, ds, enforce_file_format=True)
    return dest


# ------------------------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model_dir: Path, *extra_args: str, startup_s: float = 120.0) -> Iterator[str]:
    """``python -m pneumoscope.serve`` in a subprocess on a free port; yields its base URL."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(Path(model_dir).parent / f"server-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "pneumoscope.serve", "--model", str(model_dir), "--port", str(port),
         "--log-level", "warning", *extra_args],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                log.flush()
                raise RuntimeError(f"server exited with {proc.returncode}: "
                                   f"{(Path(model_dir).parent / f'server-{port}.log').read_text()[-3000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy in time")
            time.sleep(0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
