"""The web UI in a real browser: Debian's Chromium driven by Playwright (no browser download) against
a real `wuerstchen serve` process: type a prompt, generate, see the images in the gallery.

    apt-get install -y chromium && pip install playwright    # or: ci/install_browser.sh
    pytest tests/test_browser.py
    WUERSTCHEN_UI_SCREENSHOT=docs/ui.png pytest tests/test_browser.py   # also save a screenshot there
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_server import shared_server

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent (ci/install_browser.sh installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def page(tiny_folder: Path, pytestconfig: pytest.Config) -> Iterator:
    url = shared_server(tiny_folder, pytestconfig)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_selector("#preset option", state="attached")  # /api/info has answered
        yield page
        browser.close()
        assert not errors, errors


def test_generate_from_the_page(page, tmp_path: Path) -> None:
    assert page.locator("#preset option").all_inner_texts() == ["128 × 128", "128 × 256", "256 × 128", "custom"]
    page.fill("#prompt", "a red circle above a blue square")
    page.select_option("#preset", "256x128")
    page.fill("#num_images", "2")
    page.fill("#seed", "42")
    page.fill("#prior_steps", "4")
    page.fill("#decoder_steps", "2")
    page.click("#generate")

    page.wait_for_selector(".job .state.done", timeout=60_000)
    results = page.locator("img.result")
    results.first.wait_for()
    page.wait_for_function("[...document.querySelectorAll('img.result')].every(i => i.complete && i.naturalWidth)")
    assert results.count() == 2
    assert results.first.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [256, 128]
    assert page.locator("figcaption").all_inner_texts()[1].startswith("seed 43")  # image i has seed + i
    assert page.locator("figcaption a[download]").first.get_attribute("download") == "wuerstchen-42.png"
    page.screenshot(path=tmp_path / "ui.png")
    if os.environ.get("WUERSTCHEN_UI_SCREENSHOT"):
        page.screenshot(path=os.environ["WUERSTCHEN_UI_SCREENSHOT"])


def test_cancel_from_the_page(page) -> None:
    page.fill("#prompt", "a long one")
    page.fill("#num_images", "8")
    page.fill("#prior_steps", "200")
    page.fill("#decoder_steps", "200")
    page.click("#generate")
    card = page.locator(".job").first
    card.locator(".preview:not([hidden])").wait_for(timeout=30_000)  # the Stage C preview is showing
    card.locator("button.cancel").click()
    card.locator(".state.cancelled").wait_for(timeout=15_000)
    assert card.locator("img.result").count() == 0
