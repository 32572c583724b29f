"""Decode any chest X-ray file (JPEG, PNG, DICOM) into one 2-D uint8 grayscale array.

Everything downstream (preprocessing, cache, server) sees the same kind of array, so the rules
for turning a file into pixels live here and only here:

* The *content* decides the format, not the extension: a PNG saved as ``.jpeg`` or a DICOM
  saved as ``.jpg`` decodes correctly (magic bytes: JPEG ``FFD8``, PNG ``\\x89PNG``, DICOM
  ``DICM`` at offset 128; files named ``.dcm``/``.dicom`` without the preamble are read with
  pydicom's ``force=True``). BMP, TIFF, GIF and WebP content is accepted too (Pillow decodes it),
  although the scan only picks up files with :data:`SUPPORTED_EXTENSIONS`.
* The pixel count is checked against ``max_pixels`` from the header, BEFORE any pixel is
  decoded, so a 40000x40000 "decompression bomb" costs nothing. Pillow's own, larger limit
  (``Image.MAX_IMAGE_PIXELS``) still applies on top; we never change that process-wide setting.
* Truncated files are errors, not half-grey images: Pillow's ``LOAD_TRUNCATED_IMAGES`` must stay
  ``False`` and ``load()`` is called inside the try. Because that flag is process-wide and another
  library may flip it, JPEGs are also checked for an end-of-image marker after the last scan.
* Colour to gray uses Pillow's ``convert('L')`` (ITU-R 601-2 luma); alpha is dropped; palette
  images go through RGB; 16-bit and 32-bit images are scaled to 8 bits by the min-max of the
  image itself (their absolute range is scanner-specific and means nothing to a CNN trained on
  8-bit JPEGs).
* DICOM: the modality LUT (rescale slope/intercept) and the VOI LUT / window are applied when
  present, MONOCHROME1 is inverted so bone is bright as in MONOCHROME2, only the first frame of a
  multi-frame file is used, and the result is min-max scaled to uint8.
* EXIF orientation is applied (a phone photo of a film is shown upright by every viewer, so
  the model should see it upright too).

Every failure raises :class:`~pneumoscope.errors.ImageDecodeError` with a short human reason;
no other exception type escapes :func:`decode_image`.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscope.errors import ImageDecodeError

#: File name extensions the dataset scan treats as images (compared in lower case).
SUPPORTED_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".dcm", ".dicom"})
#: Largest image (width x height) decoded by default: ~7000x7000, far above any radiograph.
DEFAULT_MAX_PIXELS = 50_000_000

_DICOM_EXTENSIONS = (".dcm", ".dicom")
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_SNIFF_BYTES = 132


@dataclass(frozen=True)
class DecodedImage:
    """Decoded pixels plus what the file was: ``mode`` is the source mode (``'L'``, ``'RGB'``,
    ``'I;16'``, ``'DICOM:MONOCHROME1'``, ...), ``format`` the detected container."""

    pixels: np.ndarray
    mode: str
    format: str

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def pixel_digest(pixels: np.ndarray) -> str:
    """SHA-256 of a decoded image's shape and pixels: equal digests mean pixel-identical images,
    even when the files differ (re-encoded, other container, other metadata)."""
    arr = np.ascontiguousarray(pixels)
    h = hashlib.sha256(f"{arr.dtype.str}:{'x'.join(map(str, arr.shape))}:".encode("ascii"))
    h.update(arr.tobytes())
    return h.hexdigest()


#: Reason given for a file whose name is not valid UTF-8 (it cannot go into a CSV, JSON or Parquet table).
NON_UTF8_NAME_REASON = "file name is not valid UTF-8 (rename the file)"


def display_path(path: str | os.PathLike[str]) -> str:
    """``path`` as printable UTF-8 text: bytes that are not UTF-8 (a Latin-1 name from an old
    Windows share) become ``\\xNN`` escapes, so the name can be logged and written to tables.
    Equal to ``str(path)`` for every valid name."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_image_name(name: str | os.PathLike[str]) -> bool:
    """True when the file name ends in one of :data:`SUPPORTED_EXTENSIONS` (any case)."""
    return Path(name).suffix.lower() in SUPPORTED_EXTENSIONS


def read_file_bytes(path: str | os.PathLike[str], *, name: str | None = None) -> bytes:
    """All bytes of a regular file, or :class:`ImageDecodeError` with a one-line reason.

    The file type is checked first, so a FIFO or device named ``x.jpeg`` is refused instead of
    blocking the scan forever.
    """
    label = name or str(path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise ImageDecodeError(label, "is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise ImageDecodeError(label, "not a regular file")
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        reason = "broken symbolic link" if os.path.islink(path) else "file not found"
        raise ImageDecodeError(label, reason) from None
    except PermissionError:
        raise ImageDecodeError(label, "permission denied") from None
    except IsADirectoryError:
        raise ImageDecodeError(label, "is a directory, not a file") from None
    except OSError as err:
        raise ImageDecodeError(label, f"cannot read: {err.strerror or err}") from None


def read_image(
    source: str | os.PathLike[str] | bytes,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodedImage:
    """Decode a file path or its bytes into a :class:`DecodedImage` (see module docstring)."""
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    label = name or ("<bytes>" if is_bytes else str(source))
    suffix = Path(name).suffix.lower() if name else ("" if is_bytes else Path(source).suffix.lower())
    try:
        data = bytes(source) if is_bytes else read_file_bytes(source, name=label)
        return _decode_bytes(data, label, suffix, max_pixels)
    except ImageDecodeError:
        raise
    except Exception as err:  # noqa: BLE001 - the contract is: only ImageDecodeError escapes
        raise ImageDecodeError(label, f"cannot decode: {type(err).__name__}: {err}") from err


def decode_image(
    source: str | os.PathLike[str] | bytes,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """A 2-D ``uint8`` grayscale array (H, W) from a JPEG/PNG/DICOM path or bytes.

    ``name`` is used in error messages (and its extension to allow a forced DICOM read when
    ``source`` is bytes). Raises :class:`ImageDecodeError` for every failure.
    """
    return read_image(source, name=name, max_pixels=max_pixels).pixels


def probe_image(path: str | os.PathLike[str]) -> tuple[int, int, str]:
    """``(width, height, mode)`` from the header only, without decoding the pixels.

    Oversized images are reported, not refused: probing is how callers find out the size.
    """
    label = str(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
        fmt = _sniff(head)
        if fmt == "DICOM" or (fmt is None and Path(path).suffix.lower() in _DICOM_EXTENSIONS):
            return _probe_dicom(path, label, force=fmt is None)
        if fmt is None:
            raise ImageDecodeError(label, _unknown_format_reason(head))
        return _probe_pil(path, label)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(label, "file not found") from None
    except PermissionError:
        raise ImageDecodeError(label, "permission denied") from None
    except Exception as err:  # noqa: BLE001
        raise ImageDecodeError(label, f"cannot probe: {type(err).__name__}: {err}") from err


# --------------------------------------------------------------------------------------------
# format detection


def _sniff(head: bytes) -> str | None:
    """Container format from the first bytes, or None."""
    if head.startswith(b"\xff\xd8"):
        return "JPEG"
    if head.startswith(_PNG_MAGIC):
        return "PNG"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "DICOM"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head.startswith(b"GIF8"):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _looks_like_text(head: bytes) -> bool:
    """True for HTML/XML/JSON or mostly printable ASCII (an error page saved as ``.jpeg``)."""
    sample = head[:512]
    if sample.lstrip().startswith((b"<", b"{", b"[")):
        return True
    printable = sum(1 for b in sample if 32 <= b < 127 or b in (9, 10, 13))
    return printable >= 0.95 * len(sample)


def _unknown_format_reason(head: bytes) -> str:
    if _looks_like_text(head):
        return "not an image (looks like text/HTML)"
    return f"not a recognised image format (starts with {head[:8].hex(' ')})"


def _decode_bytes(data: bytes, label: str, suffix: str, max_pixels: int) -> DecodedImage:
    if not data:
        raise ImageDecodeError(label, "empty file (0 bytes)")
    fmt = _sniff(data[:_SNIFF_BYTES])
    if fmt == "DICOM":
        return _decode_dicom(data, label, max_pixels, force=False)
    if fmt is None:
        if suffix in _DICOM_EXTENSIONS and not _looks_like_text(data[:512]):
            return _decode_dicom(data, label, max_pixels, force=True)
        raise ImageDecodeError(label, _unknown_format_reason(data[:512]))
    return _decode_pil(data, label, fmt, max_pixels)


# --------------------------------------------------------------------------------------------
# size checks


def _too_big_reason(width: int, height: int, max_pixels: int) -> str:
    mantissa, exponent = f"{width * height:.1e}".split("e")
    return (
        f"image is {width}x{height} = {mantissa}e{int(exponent)} pixels, "
        f"over the {max_pixels:,} limit"
    )


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read directly from a PNG, JPEG (SOF), GIF or BMP header, else None."""
    if data.startswith(_PNG_MAGIC) and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_sof_size(data)
    if data.startswith(b"GIF8") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return int(width), int(height)
    if data.startswith(b"BM") and len(data) >= 26:
        (dib_size,) = struct.unpack("<I", data[14:18])
        fmt = "<HH" if dib_size == 12 else "<ii"  # OS/2 v1 headers store 16-bit sizes
        width, height = struct.unpack(fmt, data[18 : 18 + struct.calcsize(fmt)])
        return abs(int(width)), abs(int(height))
    return None


def _jpeg_sof_size(data: bytes) -> tuple[int, int] | None:
    sof_markers = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            i += 2
            continue
        if marker == 0xDA:
            return None
        (seglen,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in sof_markers and i + 9 <= len(data):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return int(width), int(height)
        i += 2 + seglen
    return None


# --------------------------------------------------------------------------------------------
# Pillow formats


def _open_pil(data_or_path: bytes | str | os.PathLike[str], label: str, fmt: str):  # noqa: ANN202
    """``Image.open`` with every failure mapped to a short reason (header only, no pixels)."""
    from PIL import Image, UnidentifiedImageError

    source = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    try:
        return Image.open(source, formats=_PIL_FORMATS)
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(label, f"decompression bomb refused by Pillow: {err}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(label, f"corrupt {fmt} header (Pillow cannot identify it)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
        raise ImageDecodeError(label, f"corrupt {fmt} header: {err}") from None


def _decode_pil(data: bytes, label: str, fmt: str, max_pixels: int) -> DecodedImage:
    from PIL import ImageFile

    size = _header_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageDecodeError(label, _too_big_reason(size[0], size[1], max_pixels))
    with _open_pil(data, label, fmt) as im:
        width, height = im.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(label, f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageDecodeError(label, _too_big_reason(width, height, max_pixels))
        fmt = im.format or fmt
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
            text = str(err)
            if "truncat" in text.lower():
                raise ImageDecodeError(label, f"truncated {fmt}") from None
            raise ImageDecodeError(label, f"corrupt {fmt}: {text}") from None
        if fmt == "JPEG" and ImageFile.LOAD_TRUNCATED_IMAGES and _jpeg_lacks_end(data):
            raise ImageDecodeError(label, "truncated JPEG (no end-of-image marker)")
        mode = im.mode
        upright = _exif_upright(im)
        pixels = _pil_to_gray(upright, label)
    return DecodedImage(pixels=pixels, mode=mode, format=fmt)


def _jpeg_lacks_end(data: bytes) -> bool:
    """True when no end-of-image marker follows the last start-of-scan (a cut-off file)."""
    return data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")


def _exif_upright(im):  # noqa: ANN001, ANN202
    """Apply the EXIF orientation tag when it is not the identity (cheap header lookup)."""
    from PIL import ImageOps

    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make the image unreadable
        return im
    if orientation in (None, 1):
        return im
    return ImageOps.exif_transpose(im)


def _pil_to_gray(im, label: str) -> np.ndarray:  # noqa: ANN001
    """uint8 (H, W) from any Pillow mode; see module docstring for the rules."""
    mode = im.mode
    if mode == "L":
        gray = im
    elif mode in ("RGB", "1"):
        gray = im.convert("L")
    elif mode in ("LA", "La"):
        gray = im.getchannel(0)
    elif mode in ("I", "F") or mode.startswith("I;"):
        return _minmax_to_uint8(np.asarray(im))
    elif mode in ("PA",):
        gray = im.convert("RGBA").convert("RGB").convert("L")
    else:  # RGBA, RGBa, RGBX, P, CMYK, YCbCr, LAB, HSV, ...
        gray = im.convert("RGB").convert("L")
    arr = np.asarray(gray, dtype=np.uint8)
    if arr.ndim != 2:
        raise ImageDecodeError(label, f"unexpected pixel array shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _probe_pil(path: str | os.PathLike[str], label: str) -> tuple[int, int, str]:
    from PIL import Image

    try:
        with Image.open(path, formats=_PIL_FORMATS) as im:
            return int(im.size[0]), int(im.size[1]), im.mode
    except Image.DecompressionBombError:
        with open(path, "rb") as fh:
            head = fh.read(1 << 20)
        size = _header_size(head)
        if size is None:
            raise ImageDecodeError(label, "image too large for Pillow to open") from None
        return size[0], size[1], "unknown"
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(label, f"corrupt image header: {err}") from None


# --------------------------------------------------------------------------------------------
# DICOM


def _read_dicom(source: bytes | str | os.PathLike[str], label: str, *, force: bool, header_only: bool):  # noqa: ANN202
    import pydicom
    from pydicom.errors import InvalidDicomError

    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return pydicom.dcmread(fp, force=force, stop_before_pixels=header_only)
    except InvalidDicomError as err:
        raise ImageDecodeError(label, f"not a valid DICOM file: {err}") from None
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for broken headers
        raise ImageDecodeError(label, f"corrupt DICOM header: {type(err).__name__}: {err}") from None


def _has_pixel_data(ds) -> bool:  # noqa: ANN001
    return any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _dicom_photometric(ds) -> str:  # noqa: ANN001
    return str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()


def _probe_dicom(path: str | os.PathLike[str], label: str, *, force: bool) -> tuple[int, int, str]:
    ds = _read_dicom(path, label, force=force, header_only=True)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise ImageDecodeError(label, "DICOM has no image size (Rows/Columns)")
    return cols, rows, f"DICOM:{_dicom_photometric(ds)}"


def _decode_dicom(data: bytes, label: str, max_pixels: int, *, force: bool) -> DecodedImage:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = _read_dicom(data, label, force=force, header_only=False)
    if force and len(ds) == 0:
        raise ImageDecodeError(label, "not a DICOM file (no DICM preamble, no readable elements)")
    if not _has_pixel_data(ds):
        raise ImageDecodeError(label, "DICOM has no pixel data")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise ImageDecodeError(label, "DICOM has no image size (Rows/Columns)")
    if rows * cols > max_pixels:
        raise ImageDecodeError(label, _too_big_reason(cols, rows, max_pixels))
    photometric = _dicom_photometric(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    try:
        if frames > 1:
            ds.pixel_array_options(index=0)
        arr = np.asarray(ds.pixel_array)
    except Exception as err:  # noqa: BLE001
        raise ImageDecodeError(label, _dicom_pixel_reason(ds, err)) from None
    if frames > 1 and arr.ndim == (4 if samples > 1 else 3):
        arr = arr[0]
    if samples > 1:
        # pydicom returns RGB (YBR converted); same luma weights as Pillow's convert('L').
        gray = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
        pixels = _minmax_to_uint8(gray)
    else:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
        if photometric == "MONOCHROME1":
            # Inverted in float before scaling, so a MONOCHROME1 file and its MONOCHROME2 twin
            # give bit-identical uint8 pixels.
            values = (values.max() + values.min()) - values
        pixels = _minmax_to_uint8(values)
    if pixels.ndim != 2:
        raise ImageDecodeError(label, f"DICOM pixel array has unexpected shape {pixels.shape}")
    return DecodedImage(pixels=pixels, mode=f"DICOM:{photometric}", format="DICOM")


def _dicom_pixel_reason(ds, err: Exception) -> str:  # noqa: ANN001
    text = str(err)
    if "less than expected" in text or "truncat" in text.lower() or "insufficient" in text.lower():
        return "truncated DICOM pixel data"
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    where = f" ({syntax.name})" if syntax is not None else ""
    return f"DICOM pixel data cannot be decoded{where}: {type(err).__name__}: {text}"


# --------------------------------------------------------------------------------------------


def _minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale to 0..255 by the image's own min and max (a constant image becomes all zeros)."""
    arr = np.asarray(values, dtype=np.float64)
    if not np.isfinite(arr).all():
        finite = arr[np.isfinite(arr)]
        fill = float(finite.min()) if finite.size else 0.0
        arr = np.where(np.isfinite(arr), arr, fill)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = (arr - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
