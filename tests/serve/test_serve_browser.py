"""The web page in a real browser (Debian's chromium driven by Playwright): type a prompt, click generate, wait
for the image and check it decodes as an image of the requested size. Skipped without /usr/bin/chromium.

Set ERNIELAB_SCREENSHOT=PATH to also save a screenshot of the page with its generated image."""
from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


def test_page_generates_an_image(make_server, browser):
    server = make_server(api_key=None)  # the page also takes a key, but a local server needs none
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    seen = []
    page.on("request", lambda r: seen.append(r.url))
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('steps').value !== ''")  # the form read /v1/config
    page.fill("#prompt", "a red circle above a blue square")
    page.fill("#width", "48")
    page.fill("#height", "32")
    page.fill("#steps", "6")
    page.fill("#seed", "3")
    page.fill("#n", "2")
    page.click("#generate")
    page.wait_for_selector("#gallery img.result >> nth=1", timeout=30000)
    assert page.inner_text("#status") == "done"
    assert page.eval_on_selector("#progress", "p => p.value") == 1
    srcs = page.eval_on_selector_all("#gallery img.result", "els => els.map(e => e.src)")
    seeds = page.eval_on_selector_all("#gallery img.result", "els => els.map(e => e.dataset.seed)")
    assert sorted(seeds) == ["3", "4"]
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.size == (48, 32)
    assert page.eval_on_selector_all("#gallery img.result", "els => els.map(e => e.naturalWidth)") == [48, 48]
    links = page.eval_on_selector_all("figcaption a[download]", "els => els.map(e => e.download)")
    assert sorted(links) == ["ernielab-seed3.png", "ernielab-seed4.png"]
    assert all(u.startswith(server.url) or u.startswith("data:") for u in seen), seen  # nothing from a CDN

    page.fill("#steps", "100000")  # a bad setting: the server's message shows, nothing else happens
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])", timeout=10000)
    assert "steps" in page.inner_text("#error")
    assert page.eval_on_selector_all("#gallery img.result", "els => els.length") == 2
    if os.environ.get("ERNIELAB_SCREENSHOT"):
        page.fill("#steps", "6")
        page.click("#generate")
        page.wait_for_selector("#gallery img.result >> nth=3", timeout=30000)
        page.wait_for_timeout(200)
        page.screenshot(path=os.environ["ERNIELAB_SCREENSHOT"])
    assert not errors, errors  # no script error on the page
    page.close()
