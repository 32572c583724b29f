"""Failure paths of the app that are awkward to provoke in a real server: timeouts, internal
errors, too many files. In-process (Starlette's TestClient), same app object as ``serve``."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pneumoscope.serve.app import MAX_FILES, create_app


def _files(path: Path, n: int = 1) -> list:
    return [("files", (f"{i}-{path.name}", path.read_bytes(), "image/jpeg")) for i in range(n)]


def test_timeout_is_504(tiny_model: Path, xrays: list[Path]) -> None:
    with TestClient(create_app(tiny_model, timeout_s=1e-4)) as client:
        r = client.post("/v1/predict", files=_files(xrays[0], 4))
    assert r.status_code == 504 and r.json() == {"error": "inference did not finish within 0.0001 s", "file": None}


def test_internal_error_is_500_without_traceback(tiny_model: Path, xrays: list[Path],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(tiny_model)

    def boom(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("secret internal detail /home/someone/model")

    app.state.service.predictor.predict_u8 = boom
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/v1/predict", files=_files(xrays[0]))
    assert r.status_code == 500 and r.json() == {"error": "internal error", "file": None}
    assert "secret" not in r.text
    assert any("unhandled error" in rec.getMessage() and rec.exc_info for rec in caplog.records)


def test_too_many_files_is_413(tiny_model: Path, xrays: list[Path]) -> None:
    with TestClient(create_app(tiny_model)) as client:
        r = client.post("/v1/predict", files=_files(xrays[0], MAX_FILES + 1))
    assert r.status_code == 413 and "too many files" in r.json()["error"]


def test_small_pixel_limit_is_422(tiny_model: Path, xrays: list[Path]) -> None:
    with TestClient(create_app(tiny_model, max_pixels=100 * 100)) as client:
        r = client.post("/v1/predict", files=_files(xrays[0]))
    assert r.status_code == 422 and "over the 10,000 limit" in r.json()["error"]


def test_cors_only_when_asked(tiny_model: Path) -> None:
    with TestClient(create_app(tiny_model, cors_origins=["http://localhost:3000"])) as client:
        ok = client.get("/health", headers={"Origin": "http://localhost:3000"})
        other = client.get("/health", headers={"Origin": "https://evil.example"})
    assert ok.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "access-control-allow-origin" not in other.headers
