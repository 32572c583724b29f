from __future__ import annotations

import io
import os
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from pneumoscope.data import imageio
from pneumoscope.data.imageio import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_EXTENSIONS,
    decode_image,
    is_image_name,
    pixel_digest,
    probe_image,
    read_image,
)
from pneumoscope.errors import ImageDecodeError


def _png_bytes(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


def _jpeg_bytes(im: Image.Image, **kw: object) -> bytes:
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=95, **kw)
    return out.getvalue()


def _reason(source: object, **kw: object) -> str:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(source, **kw)  # type: ignore[arg-type]
    return info.value.reason


def _gray_of(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


# -- real images ---------------------------------------------------------------------------


def test_real_rgb_jpeg_matches_pillow_luma(real_jpeg: Path) -> None:
    pixels = decode_image(real_jpeg)
    assert pixels.dtype == np.uint8 and pixels.shape == (224, 224)
    np.testing.assert_array_equal(pixels, _gray_of(real_jpeg))
    decoded = read_image(real_jpeg)
    assert (decoded.mode, decoded.format, decoded.width, decoded.height) == ("RGB", "JPEG", 224, 224)


def test_path_bytes_and_pathlike_agree(real_jpeg: Path) -> None:
    from_path = decode_image(str(real_jpeg))
    np.testing.assert_array_equal(from_path, decode_image(real_jpeg))
    np.testing.assert_array_equal(from_path, decode_image(real_jpeg.read_bytes(), name="x.jpeg"))


def test_full_resolution_grayscale_jpegs(fullres_root: Path) -> None:
    files = sorted((fullres_root / "train" / "NORMAL").iterdir())[:2]
    for path in files:
        decoded = read_image(path)
        with Image.open(path) as im:
            assert decoded.pixels.shape == (im.size[1], im.size[0])
            assert decoded.mode == im.mode
        assert decoded.pixels.shape[0] > 224 and decoded.pixels.std() > 10


def test_content_decides_not_extension(tmp_path: Path, real_jpeg: Path) -> None:
    gray = _gray_of(real_jpeg)
    fake_jpeg = tmp_path / "really_a_png.jpeg"
    fake_jpeg.write_bytes(_png_bytes(Image.fromarray(gray)))
    decoded = read_image(fake_jpeg)
    assert decoded.format == "PNG"
    np.testing.assert_array_equal(decoded.pixels, gray)
    fake_png = tmp_path / "really_a_jpeg.png"
    fake_png.write_bytes(real_jpeg.read_bytes())
    assert read_image(fake_png).format == "JPEG"


def test_one_by_one_image() -> None:
    pixels = decode_image(_png_bytes(Image.new("L", (1, 1), 77)))
    assert pixels.shape == (1, 1) and pixels[0, 0] == 77


# -- modes ---------------------------------------------------------------------------------


def test_16bit_png_is_scaled_by_its_own_min_and_max() -> None:
    raw = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 3 + 1000).astype(np.uint16)
    im = Image.fromarray(raw)
    decoded = read_image(_png_bytes(im))
    assert decoded.mode.startswith("I")
    expected = np.rint((raw.astype(float) - raw.min()) * 255.0 / (raw.max() - raw.min())).astype(np.uint8)
    np.testing.assert_array_equal(decoded.pixels, expected)
    assert decoded.pixels.min() == 0 and decoded.pixels.max() == 255


def test_rgba_png_drops_alpha(real_jpeg: Path) -> None:
    with Image.open(real_jpeg) as im:
        rgb = im.convert("RGB")
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224), dtype=np.uint8)))
    decoded = read_image(_png_bytes(rgba))
    assert decoded.mode == "RGBA"
    np.testing.assert_array_equal(decoded.pixels, np.asarray(rgb.convert("L")))


def test_palette_png_goes_through_rgb(real_jpeg: Path) -> None:
    with Image.open(real_jpeg) as im:
        pal = im.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    decoded = read_image(_png_bytes(pal))
    assert decoded.mode == "P"
    np.testing.assert_array_equal(decoded.pixels, np.asarray(pal.convert("RGB").convert("L")))


def test_cmyk_jpeg_decodes_close_to_the_gray_original(real_jpeg: Path) -> None:
    with Image.open(real_jpeg) as im:
        rgb = im.convert("RGB")
    decoded = read_image(_jpeg_bytes(rgb.convert("CMYK")))
    assert decoded.mode == "CMYK" and decoded.pixels.shape == (224, 224)
    diff = np.abs(decoded.pixels.astype(int) - np.asarray(rgb.convert("L")).astype(int))
    assert diff.mean() < 3.0


@pytest.mark.parametrize("mode", ["LA", "1", "I", "F"])
def test_other_modes_give_uint8_gray(mode: str) -> None:
    base = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1)))
    im = base.convert(mode)
    data = io.BytesIO()
    im.save(data, format="TIFF")
    pixels = decode_image(data.getvalue())
    assert pixels.dtype == np.uint8 and pixels.shape == (8, 64)
    if mode == "LA":
        np.testing.assert_array_equal(pixels, np.asarray(base))
    elif mode == "1":
        assert set(np.unique(pixels)) <= {0, 255}
    else:  # 32-bit: min-max scaled, order kept
        assert pixels[0, 0] == 0 and pixels[0, -1] == 255 and np.all(np.diff(pixels[0].astype(int)) >= 0)


def test_exif_orientation_is_applied(real_jpeg: Path) -> None:
    with Image.open(real_jpeg) as im:
        wide = im.convert("L").crop((0, 0, 224, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    pixels = decode_image(_jpeg_bytes(wide, exif=exif.tobytes()))
    assert pixels.shape == (224, 100)


# -- DICOM ---------------------------------------------------------------------------------


def test_dicom_monochrome1_equals_monochrome2_after_inversion(real_jpeg: Path, make_dicom) -> None:
    gray = _gray_of(real_jpeg)
    mono2 = read_image(make_dicom(gray, photometric="MONOCHROME2"), name="a.dcm")
    mono1 = read_image(make_dicom(255 - gray, photometric="MONOCHROME1"), name="b.dcm")
    assert (mono2.mode, mono1.mode) == ("DICOM:MONOCHROME2", "DICOM:MONOCHROME1")
    np.testing.assert_array_equal(mono1.pixels, mono2.pixels)
    # MONOCHROME2 is shown as stored (min-max scaled): bright bone stays bright.
    expected = np.rint((gray.astype(float) - gray.min()) * 255.0 / (gray.max() - gray.min())).astype(np.uint8)
    np.testing.assert_array_equal(mono2.pixels, expected)
    assert np.corrcoef(mono1.pixels.ravel(), gray.ravel())[0, 1] > 0.999


def test_dicom_rescale_slope_intercept_is_applied(real_jpeg: Path, make_dicom) -> None:
    gray = _gray_of(real_jpeg)
    stored = (gray.astype(np.uint16) * 4 + 100).astype(np.uint16)
    plain = decode_image(make_dicom(gray), name="p.dcm")
    rescaled = decode_image(make_dicom(stored, RescaleSlope=0.25, RescaleIntercept=-25), name="r.dcm")
    np.testing.assert_array_equal(rescaled, plain)


def test_dicom_window_clips_outside_values(real_jpeg: Path, make_dicom) -> None:
    gray = _gray_of(real_jpeg)
    pixels = decode_image(make_dicom(gray, WindowCenter=128, WindowWidth=128), name="w.dcm")
    assert np.all(pixels[gray <= 63] == 0)
    assert np.all(pixels[gray >= 193] == 255)
    inside = (gray > 70) & (gray < 185)
    assert np.corrcoef(pixels[inside], gray[inside])[0, 1] > 0.999


def test_dicom_multiframe_uses_first_frame(real_jpeg: Path, make_dicom) -> None:
    gray = _gray_of(real_jpeg)
    first = decode_image(make_dicom(gray), name="one.dcm")
    multi = decode_image(make_dicom(np.stack([gray, 255 - gray, gray // 2])), name="multi.dcm")
    np.testing.assert_array_equal(multi, first)


def test_dicom_without_preamble_needs_dcm_name(real_jpeg: Path, make_dicom) -> None:
    raw = make_dicom(_gray_of(real_jpeg), preamble=False)
    assert raw[128:132] != b"DICM"
    assert decode_image(raw, name="nopreamble.dcm").shape == (224, 224)
    assert "not a recognised image format" in _reason(raw, name="nopreamble.bin")


def test_dicom_without_pixel_data(make_dicom) -> None:
    raw = make_dicom(np.zeros((4, 4), np.uint8), with_pixels=False)
    assert _reason(raw, name="x.dcm") == "DICOM has no pixel data"


def test_dicom_too_many_pixels_is_refused_from_the_header(make_dicom) -> None:
    raw = make_dicom(np.zeros((100, 100), np.uint8))
    assert _reason(raw, name="big.dcm", max_pixels=5_000) == "image is 100x100 = 1.0e4 pixels, over the 5,000 limit"


def test_truncated_dicom_pixel_data(make_dicom) -> None:
    raw = make_dicom(np.zeros((64, 64), np.uint8))
    assert _reason(raw[:-1000], name="cut.dcm") == "truncated DICOM pixel data"


# -- broken inputs -------------------------------------------------------------------------


def test_zero_bytes(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpeg"
    empty.write_bytes(b"")
    assert _reason(empty) == "empty file (0 bytes)"
    with pytest.raises(ImageDecodeError) as info:
        decode_image(empty)
    assert str(info.value) == f"{empty}: empty file (0 bytes)"


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9])
def test_truncated_jpeg(real_jpeg: Path, keep: float) -> None:
    data = real_jpeg.read_bytes()
    assert _reason(data[: int(len(data) * keep)], name="cut.jpeg") == "truncated JPEG"


def test_truncated_jpeg_is_caught_even_if_pillow_flag_is_flipped(real_jpeg: Path, monkeypatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = real_jpeg.read_bytes()
    assert "truncated JPEG" in _reason(data[: len(data) // 2], name="cut.jpeg")
    assert decode_image(data).shape == (224, 224)


def test_truncated_png(real_jpeg: Path) -> None:
    data = _png_bytes(Image.fromarray(_gray_of(real_jpeg)))
    reason = _reason(data[: len(data) // 2], name="cut.png")
    assert reason.startswith(("truncated PNG", "corrupt PNG"))


@pytest.mark.parametrize(
    "content",
    [b"<!DOCTYPE html><html><body>404 Not Found</body></html>", b"just some notes\nabout a patient\n"],
)
def test_text_named_jpeg(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "download.jpeg"
    path.write_bytes(content)
    assert _reason(path) == "not an image (looks like text/HTML)"


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert _reason(tmp_path / "nope.jpeg") == "file not found"
    folder = tmp_path / "folder.jpeg"
    folder.mkdir()
    assert _reason(folder) == "is a directory, not a file"


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpeg"
    os.mkfifo(fifo)
    assert _reason(fifo) == "not a regular file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files without permission bits")
def test_permission_denied_real_file(tmp_path: Path, real_jpeg: Path) -> None:
    path = tmp_path / "locked.jpeg"
    path.write_bytes(real_jpeg.read_bytes())
    path.chmod(0)
    assert _reason(path) == "permission denied"


def test_permission_denied_reason(tmp_path: Path, real_jpeg: Path, monkeypatch) -> None:
    path = tmp_path / "locked.jpeg"
    path.write_bytes(real_jpeg.read_bytes())

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(imageio, "open", denied, raising=False)  # shadows the builtin in imageio only
    assert _reason(path) == "permission denied"


def test_unexpected_errors_are_wrapped(real_jpeg: Path, monkeypatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(imageio, "_decode_pil", boom)
    assert _reason(real_jpeg) == "cannot decode: RuntimeError: boom"


# -- decompression bombs -------------------------------------------------------------------


def _png_with_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR claims ``width x height`` (CRC fixed, so it looks valid)."""
    data = bytearray(_png_bytes(Image.new("L", (1, 1))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def test_png_bomb_is_refused_before_allocating() -> None:
    bomb = _png_with_size(40000, 40000)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        reason = _reason(bomb, name="bomb.png")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reason == "image is 40000x40000 = 1.6e9 pixels, over the 50,000,000 limit"
    assert peak < 5_000_000
    assert time.perf_counter() - started < 2.0


def test_bomb_within_pillow_limit_but_over_ours() -> None:
    # 8000x8000 = 64 Mpx: Pillow would open it (its limit is ~179 Mpx); our 50 Mpx default refuses.
    reason = _reason(_png_with_size(8000, 8000), name="big.png")
    assert reason == f"image is 8000x8000 = 6.4e7 pixels, over the {DEFAULT_MAX_PIXELS:,} limit"


def test_max_pixels_applies_to_real_jpeg(real_jpeg: Path) -> None:
    assert _reason(real_jpeg, max_pixels=10_000) == "image is 224x224 = 5.0e4 pixels, over the 10,000 limit"
    assert decode_image(real_jpeg, max_pixels=224 * 224).shape == (224, 224)


def test_gif_bomb() -> None:
    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, format="GIF")
    data = bytearray(out.getvalue())
    data[6:10] = struct.pack("<HH", 65535, 65535)
    assert "65535x65535" in _reason(bytes(data), name="bomb.gif")


# -- probe and helpers ---------------------------------------------------------------------


def test_probe_image(real_jpeg: Path, tmp_path: Path, make_dicom) -> None:
    assert probe_image(real_jpeg) == (224, 224, "RGB")
    dcm = tmp_path / "a.dcm"
    dcm.write_bytes(make_dicom(np.zeros((30, 40), np.uint16)))
    assert probe_image(dcm) == (40, 30, "DICOM:MONOCHROME2")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_with_size(40000, 40000))
    assert probe_image(bomb)[:2] == (40000, 40000)
    text = tmp_path / "t.jpeg"
    text.write_text("<html></html>")
    with pytest.raises(ImageDecodeError, match="looks like text"):
        probe_image(text)


def test_extensions_and_digest() -> None:
    assert SUPPORTED_EXTENSIONS == {".jpeg", ".jpg", ".png", ".dcm", ".dicom"}
    assert is_image_name("A.JPG") and is_image_name("b.DiCoM") and not is_image_name("notes.txt")
    a = np.zeros((2, 3), np.uint8)
    assert pixel_digest(a) == pixel_digest(a.copy())
    assert pixel_digest(a) != pixel_digest(a.reshape(3, 2))
    assert pixel_digest(a) != pixel_digest(a + 1)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about corrupt EXIF before we refuse
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from([b"", b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00"]),
    body=st.binary(max_size=300),
    name=st.sampled_from(["x.jpeg", "x.png", "x.dcm", "x"]),
)
def test_garbage_only_ever_raises_image_decode_error(prefix: bytes, body: bytes, name: str) -> None:
    try:
        pixels = decode_image(prefix + body, name=name)
    except ImageDecodeError as err:
        assert err.reason
    else:
        assert pixels.dtype == np.uint8 and pixels.ndim == 2
