"""The web UI in a real browser: Debian's Chromium driven by Playwright (no browser download) against
a real `wuerstchen serve` process: type a prompt, generate, see the images in the gallery.

    apt-get install -y chromium && pip install playwright    # or: ci/install_browser.sh
    pytest tests/test_browser.py
    WUERSTCHEN_UI_SCREENSHOT=docs/ui.png pytest tests/test_browser.py -k screenshot   # the README's picture

The screenshot test runs only when WUERSTCHEN_UI_SCREENSHOT names a file: it serves the shipped
small model (the other tests use a tiny random one, whose images are noise) and saves the page with
one finished job and one in Stage C, its preview showing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_server import serve, shared_server

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


@contextmanager
def browse(url: str, viewport: dict[str, int] | None = None) -> Iterator:
    """A Chromium page on the UI at `url`, once /api/info has answered; no script errors allowed."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        page = browser.new_page(viewport=viewport or {"width": 1280, "height": 760})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_selector("#preset option", state="attached")  # /api/info has answered
        yield page
        browser.close()
        assert not errors, errors


@pytest.fixture(scope="module")
def page(tiny_folder: Path, pytestconfig: pytest.Config) -> Iterator:
    with browse(shared_server(tiny_folder, pytestconfig)) as page:
        yield page


def fill(page, **fields: str) -> None:
    for name, value in fields.items():
        page.fill(f"#{name}", value)


def generate(page):
    """Click Generate and return the new job's card (not the previous one, still first until the
    server has answered)."""
    before = page.locator(".job").count()
    page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('.job').length > {before}", timeout=30_000)
    return page.locator(".job").first


def test_generate_from_the_page(page, tmp_path: Path) -> None:
    assert page.locator("#preset option").all_inner_texts() == ["128 × 128", "128 × 256", "256 × 128", "custom"]
    page.fill("#prompt", "a red circle above a blue square")
    page.select_option("#preset", "256x128")
    fill(page, num_images="2", seed="42", prior_steps="4", decoder_steps="2")
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


def test_empty_prompt_generates_unconditionally(page) -> None:
    # As the CLI and the API: no prompt is unconditional generation, not a form error.
    page.fill("#prompt", "")
    page.select_option("#preset", "128x128")
    fill(page, num_images="1", seed="3", prior_steps="2", decoder_steps="2")
    card = generate(page)
    card.locator(".state.done").wait_for(timeout=60_000)
    # The card turns "done" before its gallery is filled: wait for the image, as the test above does.
    card.locator("img.result").first.wait_for(timeout=30_000)
    assert card.locator(".prompt").inner_text() == "(no prompt)"
    assert card.locator("img.result").count() == 1
    assert page.locator("#error").inner_text() == ""


def test_inpainting_from_the_page(page, tmp_path: Path) -> None:
    """Pick an image, paint a mask with the brush (and erase part of it), generate: the result keeps
    every pixel outside the painted region."""
    import io
    import urllib.request

    import numpy as np
    from PIL import Image

    pixels = np.zeros((128, 128, 3), dtype=np.uint8)
    pixels[..., 0] = np.arange(128, dtype=np.uint8)[None, :] * 2  # a gradient: any shift would show
    pixels[..., 2] = 90
    Image.fromarray(pixels).save(tmp_path / "source.png")
    page.set_input_files("#image_file", str(tmp_path / "source.png"))
    page.locator("#source_tools").wait_for(state="visible")
    assert page.input_value("#width") == "128" and page.input_value("#height") == "128"  # the image's size
    box = page.locator("#mask").bounding_box()
    at = lambda fx, fy: (box["x"] + fx * box["width"], box["y"] + fy * box["height"])  # noqa: E731
    page.mouse.move(*at(0.15, 0.15))
    page.mouse.down()
    for i in range(1, 11):  # a stroke down the left third
        page.mouse.move(*at(0.2, 0.15 + 0.07 * i))
    page.mouse.up()
    page.check("#eraser")
    page.mouse.click(*at(0.2, 0.85))  # erase the stroke's end again
    page.check("#brush")
    assert page.locator("#strength_value").inner_text() == "1.00"  # painting a mask: repaint from noise
    fill(page, prompt="a yellow star", num_images="1", seed="5", prior_steps="2", decoder_steps="2")
    card = generate(page)
    card.locator(".state.done").wait_for(timeout=60_000)
    result = card.locator("img.result").first
    result.wait_for(timeout=30_000)
    assert "inpainting" in card.locator("header .muted").inner_text()
    url = result.evaluate("i => i.src")
    with urllib.request.urlopen(url, timeout=30) as r:
        out = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))
    assert out.shape == (128, 128, 3)
    assert np.array_equal(out[:, 64:], pixels[:, 64:])  # right of the stroke (brush 24 px wide): the source
    assert not np.array_equal(out[:, :64], pixels[:, :64])  # the stroke was repainted
    page.click("#remove_image")


def test_cancel_from_the_page(page) -> None:
    page.fill("#prompt", "a long one")
    fill(page, num_images="8", prior_steps="200", decoder_steps="200")
    card = generate(page)
    card.locator(".preview:not([hidden])").wait_for(timeout=30_000)  # the Stage C preview is showing
    card.locator("button.cancel").click()
    card.locator(".state.cancelled").wait_for(timeout=15_000)
    assert card.locator("img.result").count() == 0


@pytest.mark.skipif(not os.environ.get("WUERSTCHEN_UI_SCREENSHOT"), reason="set WUERSTCHEN_UI_SCREENSHOT=PATH.png")
def test_screenshot_of_the_shipped_model(tmp_path: Path) -> None:
    """The README's screenshot: three images of the shipped model, and above them a job in Stage C
    with its preview. About 20 s on two CPU cores."""
    path = Path(os.environ["WUERSTCHEN_UI_SCREENSHOT"])
    with serve(None, log=tmp_path / "serve.log") as url, browse(url, {"width": 1280, "height": 800}) as page:
        page.fill("#prompt", "a red circle above a blue square")
        fill(page, num_images="3", seed="3")  # the official schedule and defaults otherwise
        page.click("#generate")
        page.locator(".job .state.done").wait_for(timeout=120_000)
        page.wait_for_function("[...document.querySelectorAll('img.result')].every(i => i.complete && i.naturalWidth)")

        # 200 prior steps keep Stage C running long enough to catch its preview four fifths of the way,
        # when the layout has formed but the job is not over.
        page.fill("#prompt", "two large orange diamonds")
        fill(page, seed="7", prior_steps="200")
        page.click("#generate")
        running = page.locator(".job").first
        running.locator(".preview:not([hidden])").wait_for(timeout=60_000)
        page.wait_for_function("document.querySelector('.job progress').value >= 0.8", timeout=60_000)
        page.wait_for_timeout(400)  # the next preview (one per 0.25 s) catches up with the progress bar
        page.mouse.move(0, 0)  # no hover state in the picture
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=path)
        running.locator("button.cancel").click()
        running.locator(".state.cancelled").wait_for(timeout=30_000)
    assert path.stat().st_size < 300_000, "docs/ui.png should stay small"
