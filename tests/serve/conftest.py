"""Fixtures for the API tests: one tiny random-init model and one real server process per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.helpers import make_checkpoint, running_server

#: Upload limit of the test server: small, so the 413 test sends little data.
TEST_MAX_UPLOAD = 3_000_000


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init cnn3 checkpoint root (``best.json`` + ``best-000000/``)."""
    return make_checkpoint(tmp_path_factory.mktemp("model") / "ckpt")


@pytest.fixture(scope="session")
def xrays(data_root: Path) -> list[Path]:
    """Two real X-rays: one NORMAL, one PNEUMONIA (test split)."""
    return [sorted((data_root / "test" / c).glob("*.jpeg"))[0] for c in ("NORMAL", "PNEUMONIA")]


@pytest.fixture(scope="session")
def server(tiny_model: Path) -> str:
    """Base URL of ``python -m pneumoscope.serve`` running the tiny model on 127.0.0.1."""
    with running_server(tiny_model, "--max-upload-bytes", str(TEST_MAX_UPLOAD)) as base:
        yield base
