"""Fuzzing: the image decoder with mutated real files (hypothesis), the REST API from its own
OpenAPI schema (schemathesis). Bounded example counts so the file runs in CI in seconds."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pneumoscope.data.imageio import read_image
from pneumoscope.errors import ImageDecodeError

#: The seed files, filled by the ``seeds`` fixture (hypothesis strategies are built before fixtures run).
_SEEDS: dict[str, bytes] = {}


@pytest.fixture(scope="module")
def seeds(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Real files of every container the decoder supports, small enough to mutate quickly."""
    from serve.helpers import make_dicom

    src = sorted((data_root / "test" / "NORMAL").glob("*.jpeg"))[0]
    gray = Image.open(src).convert("L").resize((48, 48))

    def save(im: Image.Image, fmt: str, **kw: object) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    tmp = tmp_path_factory.mktemp("fuzz")
    src_small = tmp / "small.jpeg"
    src_small.write_bytes(save(gray, "JPEG", quality=90))
    out = {
        "x.jpeg": src_small.read_bytes(),
        "x.png": save(gray, "PNG"),
        "x16.png": save(Image.fromarray(np.asarray(gray, np.uint16) * 200), "PNG"),
        "xp.png": save(gray.convert("RGB").convert("P"), "PNG"),
        "x.dcm": make_dicom(src_small, tmp / "x.dcm").read_bytes(),
        "x1.dcm": make_dicom(src_small, tmp / "x1.dcm", photometric="MONOCHROME1", bits=16).read_bytes(),
    }
    _SEEDS.update(out)
    return out


@st.composite
def mutated(draw) -> tuple[str, bytes]:  # noqa: ANN001
    name = draw(st.sampled_from(sorted(_SEEDS)))
    data = bytearray(_SEEDS[name])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dims"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0xD8, 0xD9, 0xDA]))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 256))]
        elif kind == "truncate":
            del data[at:]
        elif kind == "dims" and data[:4] == b"\x89PNG" and len(data) >= 33:
            # structure-aware: a PNG header claiming another size, with a valid CRC
            w, h = draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 2**31 - 1))
            data[16:24] = struct.pack(">II", w, h)
            data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return name, bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(case=mutated(), max_pixels=st.sampled_from([50_000_000, 2_000, 1]))
def _decode_mutations(case: tuple[str, bytes], max_pixels: int) -> None:
    name, data = case
    try:
        img = read_image(data, name=name, max_pixels=max_pixels)
    except ImageDecodeError as err:
        assert err.reason and "\n" not in str(err) and str(err).startswith(name), str(err)
        return
    px = img.pixels
    assert px.dtype == np.uint8 and px.ndim == 2 and 0 < px.size <= max_pixels


def test_image_decoder_fuzzed_with_mutated_real_files_raises_only_its_own_error(seeds) -> None:
    """200 mutations of real JPEG/PNG (8/16-bit, palette)/DICOM (MONOCHROME1/2) bytes: each decodes
    to a 2-D uint8 image or raises ImageDecodeError with a one-line reason; nothing else escapes."""
    _decode_mutations()


# ------------------------------------------------------------------------------ REST API
def test_api_fuzzed_from_its_openapi_schema_never_answers_5xx(tiny_model: Path) -> None:
    """schemathesis generates requests for every operation of ``/openapi.json`` (valid and
    schema-violating ones: wrong types, missing fields, odd multipart bodies); none may get a 5xx,
    and every 4xx is the documented ``{"error", "file"}`` body with a one-line message.

    The strategies are drawn with plain hypothesis (``operation.as_strategy()``) rather than
    ``@schema.parametrize()``: schemathesis' pytest plugin reads a private pytest attribute that
    pytest 9 removed (``AttributeError: 'Function' object has no attribute '_nodeid'``).
    """
    from pneumoscope.serve.app import create_app

    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(tiny_model, max_upload_bytes=1_000_000))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"POST /v1/predict", "POST /v1/explain",
                                                                       "GET /v1/model", "GET /health"}
    seen: dict[int, int] = {}

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=st.one_of([op.as_strategy() for op in operations]))
    def call(case) -> None:  # noqa: ANN001
        response = case.call()
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
        if response.status_code >= 400:
            body = response.json()
            assert set(body) == {"error", "file"} and "\n" not in body["error"], body
            assert "Traceback" not in response.text

    call()
    assert any(code >= 400 for code in seen) and 200 in seen, seen  # both kinds were exercised
