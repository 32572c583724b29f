"""The HTTP API against a real server process on 127.0.0.1 (uvicorn in a subprocess)."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serve.conftest import TEST_MAX_UPLOAD
from serve.helpers import make_dicom, png_bomb

CLASSES = ["NORMAL", "PNEUMONIA"]


def _post(base: str, endpoint: str, files: list[tuple[str, bytes]], field: str = "files") -> httpx.Response:
    parts = [(field, (name, data, "application/octet-stream")) for name, data in files]
    return httpx.post(base + endpoint, files=parts, timeout=60)


def _assert_clean_error(r: httpx.Response, status: int, file: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error", "file"}, body
    assert body["error"] and "Traceback" not in r.text and "File \"" not in r.text
    if file is not None:
        assert body["file"] == file
    return body


def test_health(server: str) -> None:
    r = httpx.get(server + "/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    assert r.headers["x-content-type-options"] == "nosniff"


def test_model_info(server: str) -> None:
    m = httpx.get(server + "/v1/model").json()
    assert m["name"] == "cnn3" and m["classes"] == CLASSES and m["task"] == "binary"
    assert m["threshold"] == 0.5 and m["threshold_rule"] == "youden"
    assert m["temperature"] == pytest.approx(1.3)
    assert m["metrics"] == {"val": {"auroc": 0.5, "accuracy": 0.5}}  # non-scalars dropped
    assert m["preprocessing"]["size"] == 150 and m["input"]["channels"] == 1
    assert m["backend"] == "pytorch" and m["explain_available"] is True
    assert len(m["model_version"]) == 12
    assert "not a diagnostic device" in m["notice"]


def test_openapi_schema(server: str) -> None:
    schema = httpx.get(server + "/openapi.json").json()
    for path in ("/v1/predict", "/v1/explain", "/v1/model", "/health"):
        assert path in schema["paths"]
    comps = schema["components"]["schemas"]
    for name in ("PredictResponse", "ExplainResponse", "FilePrediction", "ModelInfo", "ErrorResponse"):
        assert name in comps
    ok = schema["paths"]["/v1/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/PredictResponse")
    assert "413" in schema["paths"]["/v1/predict"]["post"]["responses"]
    assert httpx.get(server + "/docs").status_code == 404  # Swagger UI (CDN scripts) is off by default


def test_predict_two_real_xrays_matches_library(server: str, xrays: list[Path], tiny_model: Path) -> None:
    from pneumoscope.data.imageio import decode_image
    from pneumoscope.inference import Predictor

    r = _post(server, "/v1/predict", [(p.name, p.read_bytes()) for p in xrays])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_id"] == "cnn3:test" and len(body["model_version"]) == 12 and body["backend"] == "pytorch"
    preds = body["predictions"]
    assert [p["filename"] for p in preds] == [p.name for p in xrays]
    local = Predictor.load(tiny_model)
    expected = local.predict_u8(local.prepare([decode_image(p) for p in xrays])).probs
    for pred, exp in zip(preds, expected):
        assert set(pred["probabilities"]) == set(CLASSES)
        assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert [pred["probabilities"][c] for c in CLASSES] == pytest.approx(exp.tolist(), abs=1e-6)
        assert pred["decision"] == CLASSES[int(exp[1] >= 0.5)]
        assert pred["threshold"] == 0.5 and pred["uncertainty"] >= 0 and pred["refer"] is False


def test_predict_fullres_and_png_named_jpeg(server: str, fullres_root: Path) -> None:
    big = sorted(fullres_root.rglob("*.jpeg"))[0]
    png = io.BytesIO()
    Image.open(big).convert("L").save(png, format="PNG")
    r = _post(server, "/v1/predict", [(big.name, big.read_bytes()), ("really-a-png.jpeg", png.getvalue())])
    assert r.status_code == 200, r.text
    a, b = (p["probabilities"]["PNEUMONIA"] for p in r.json()["predictions"])
    assert a == pytest.approx(b, abs=1e-3)  # same pixels (JPEG->PNG is lossless on the decoded gray)


def test_explain(server: str, xrays: list[Path]) -> None:
    pytest.importorskip("pneumoscope.explain.overlay", reason="Grad-CAM overlay module not there yet")
    r = _post(server, "/v1/explain", [(xrays[1].name, xrays[1].read_bytes())])
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    assert pred["cam_class"] == pred["decision"]
    cam = Image.open(io.BytesIO(base64.b64decode(pred["cam_png_base64"])))
    img = Image.open(io.BytesIO(base64.b64decode(pred["image_png_base64"])))
    assert cam.format == "PNG" and cam.mode == "RGB" and img.mode == "L"
    assert cam.size == img.size == (pred["width"], pred["height"]) == Image.open(xrays[1]).size


def test_dicom_monochrome1_equals_monochrome2(server: str, xrays: list[Path], tmp_path: Path) -> None:
    src = xrays[1]
    files = {
        "m2.dcm": make_dicom(src, tmp_path / "m2.dcm", photometric="MONOCHROME2"),
        "m1.dcm": make_dicom(src, tmp_path / "m1.dcm", photometric="MONOCHROME1"),
        "m2-16.dcm": make_dicom(src, tmp_path / "m2-16.dcm", bits=16, slope=2.0, intercept=-1024),
        "m1-16": make_dicom(src, tmp_path / "m1-16", photometric="MONOCHROME1", bits=16, slope=4.0, intercept=100),
    }
    r = _post(server, "/v1/predict", [(name, path.read_bytes()) for name, path in files.items()])
    assert r.status_code == 200, r.text
    p = [x["probabilities"]["PNEUMONIA"] for x in r.json()["predictions"]]
    assert p[1] == pytest.approx(p[0], abs=1e-5)  # MONOCHROME1 (8-bit) == MONOCHROME2
    assert p[3] == pytest.approx(p[2], abs=1e-5)  # MONOCHROME1 (16-bit, slope/intercept) == MONOCHROME2
    assert p[2] == pytest.approx(p[0], abs=1e-5)  # 16-bit with rescale == 8-bit


def _truncated_jpeg(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("case", ["zero-bytes", "truncated-jpeg", "text-named-png", "png-40000x40000",
                                  "garbage-named-dcm"])
def test_bad_images_get_clean_422(server: str, xrays: list[Path], case: str) -> None:
    name, data, words = {
        "zero-bytes": ("empty.jpeg", b"", "empty"),
        "truncated-jpeg": ("cut.jpeg", _truncated_jpeg(xrays[0]), "truncated"),
        "text-named-png": ("note.png", b"<html><body>not an image</body></html>\n" * 5, "not an image"),
        "png-40000x40000": ("bomb.png", png_bomb(40000, 40000), "40000x40000"),
        "garbage-named-dcm": ("x.dcm", bytes(range(256)) * 4, "DICOM"),
    }[case]
    r = _post(server, "/v1/predict", [("ok.jpeg", xrays[0].read_bytes()), (name, data)])
    body = _assert_clean_error(r, 422, file=name)
    assert words.lower() in body["error"].lower()


def test_wrong_field_and_no_files(server: str, xrays: list[Path]) -> None:
    r = _post(server, "/v1/predict", [(xrays[0].name, xrays[0].read_bytes())], field="file")
    body = _assert_clean_error(r, 422)
    assert "files" in body["error"]
    _assert_clean_error(httpx.post(server + "/v1/predict", json={"files": ["a"]}), 422)
    _assert_clean_error(httpx.post(server + "/v1/predict", data={"files": "not-a-file"}), 422)


def test_too_large_upload_is_413(server: str) -> None:
    blob = b"\xff\xd8" + b"\0" * (TEST_MAX_UPLOAD + 10)
    body = _assert_clean_error(_post(server, "/v1/predict", [("big.jpeg", blob)]), 413)
    assert "too large" in body["error"]

    def chunks():  # no Content-Length: the limit must also hold while streaming
        yield b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpeg\"\r\n\r\n"
        for _ in range(TEST_MAX_UPLOAD // 65536 + 2):
            yield b"\0" * 65536

    headers = {"content-type": "multipart/form-data; boundary=b"}
    r = httpx.post(server + "/v1/predict", content=chunks(), headers=headers)
    _assert_clean_error(r, 413)


def test_unknown_route_and_method(server: str) -> None:
    _assert_clean_error(httpx.get(server + "/etc/passwd"), 404)
    _assert_clean_error(httpx.get(server + "/static/../../../etc/passwd"), 404)
    _assert_clean_error(httpx.get(server + "/v1/predict"), 405)


def test_concurrent_requests_agree(server: str, xrays: list[Path]) -> None:
    data = xrays[0].read_bytes()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: _post(server, "/v1/predict", [("a.jpeg", data)]), range(6)))
    probs = [r.json()["predictions"][0]["probabilities"]["PNEUMONIA"] for r in results]
    assert all(r.status_code == 200 for r in results)
    assert np.ptp(probs) == 0.0


def test_page_is_self_contained(server: str) -> None:
    r = httpx.get(server + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "Research and education only" in html and "not a diagnostic device" in html
    assert "script-src 'self'" in r.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/app.css"):
        a = httpx.get(server + asset)
        assert a.status_code == 200
        assert "http://" not in a.text and "https://" not in a.text  # no CDN
    assert "http://" not in html and "https://" not in html


def test_cors_off_by_default(server: str) -> None:
    r = httpx.options(server + "/v1/predict", headers={"Origin": "https://evil.example",
                                                       "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(server + "/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_onnx_model_without_weights_explain_409(tmp_path: Path, tiny_model: Path, xrays: list[Path]) -> None:
    from pneumoscope.export import export_onnx

    from serve.helpers import running_server

    export_onnx(tiny_model, tmp_path / "onnx", include_weights=False, check_images=xrays)
    with running_server(tmp_path / "onnx") as base:
        m = httpx.get(base + "/v1/model").json()
        assert m["backend"] == "onnx" and m["explain_available"] is False
        r = _post(base, "/v1/predict", [(xrays[0].name, xrays[0].read_bytes())])
        assert r.status_code == 200 and r.json()["backend"] == "onnx"
        body = _assert_clean_error(_post(base, "/v1/explain", [(xrays[0].name, xrays[0].read_bytes())]), 409)
        assert "weights" in body["error"] and str(tmp_path) not in body["error"]  # no server paths leaked
