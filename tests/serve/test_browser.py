"""The page at ``/`` in a real headless Chromium (Playwright), against the real server process.

Needs the Debian packages ``chromium`` (``apt-get install -y chromium``) and the Python package
``playwright`` (``pip install playwright``; no ``playwright install``: the system Chromium is
used). Skipped with the reason when either is missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("PNEUMOSCOPE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():  # noqa: ANN201
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM}: apt-get install -y chromium (or set PNEUMOSCOPE_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, server: str):  # noqa: ANN001, ANN201
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = context.new_page()
    external: list[str] = []
    local = (server, "data:", "blob:")
    pg.on("request", lambda req: None if req.url.startswith(local) else external.append(req.url))
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(server + "/")
    yield pg
    context.close()
    assert external == [], f"the page fetched from outside the app: {external}"
    assert errors == [], f"JavaScript errors: {errors}"


def _upload(page, path: Path) -> None:  # noqa: ANN001
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)


def test_upload_shows_probabilities(page, xrays: list[Path], tmp_path: Path) -> None:  # noqa: ANN001
    assert "not a diagnostic device" in page.inner_text("#notice")
    page.wait_for_function("document.getElementById('model').textContent.includes('cnn3:test')")
    _upload(page, xrays[1])
    assert page.inner_text("#filename") == xrays[1].name
    assert page.inner_text("#decision") in ("NORMAL", "PNEUMONIA")
    probs = page.locator(".bar .prob").all_inner_texts()
    assert len(probs) == 2 and all(p.endswith("%") for p in probs)
    assert sum(float(p[:-1]) for p in probs) == pytest.approx(100.0, abs=0.11)
    widths = page.eval_on_selector_all(".bar-fill", "els => els.map(e => e.getBoundingClientRect().width)")
    assert max(widths) > 0
    assert float(page.inner_text("#uncertainty")) >= 0
    assert page.eval_on_selector("#xray", "img => img.complete && img.naturalWidth") > 0
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)


def test_upload_shows_heatmap_with_opacity(page, xrays: list[Path], tmp_path: Path) -> None:  # noqa: ANN001
    pytest.importorskip("pneumoscope.explain.overlay", reason="Grad-CAM overlay module not there yet")
    _upload(page, xrays[0])
    page.wait_for_selector("#cam:not([hidden])")
    assert page.get_attribute("#cam", "src").startswith("data:image/png;base64,")
    assert page.eval_on_selector("#cam", "img => img.complete && img.naturalWidth") > 0
    box_x, box_c = page.locator("#xray").bounding_box(), page.locator("#cam").bounding_box()
    assert box_c["width"] == pytest.approx(box_x["width"], abs=1)
    assert box_c["height"] == pytest.approx(box_x["height"], abs=1)
    page.fill("#opacity", "80")
    page.dispatch_event("#opacity", "input")
    assert page.eval_on_selector("#cam", "img => getComputedStyle(img).opacity") == "0.8"
    page.screenshot(path=str(tmp_path / "heatmap.png"), full_page=True)


def test_bad_file_shows_error(page, tmp_path: Path) -> None:  # noqa: ANN001
    bad = tmp_path / "note.png"
    bad.write_text("this is not an image")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#status.error", timeout=30_000)
    assert "not an image" in page.inner_text("#status")
