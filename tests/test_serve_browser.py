"""The upload page in a real browser: Playwright driving Debian's Chromium against a live uvicorn server."""

from __future__ import annotations

import os
import shutil
import threading
import time
from contextlib import contextmanager

import pytest
from PIL import Image

from clipcap import Captioner
from clipcap.serve import ServerLimits, create_app

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
uvicorn = pytest.importorskip("uvicorn")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(
        "Debian's chromium is not installed: run `make browser` (apt-get install chromium) for the browser test",
        allow_module_level=True,
    )
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@contextmanager
def running_server(app):
    """Run `app` with uvicorn on 127.0.0.1 and a free port in a thread; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(3000):  # a hang guard while uvicorn binds, not a timing assertion
        if server.started:
            break
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()


@pytest.fixture(scope="module")
def captioner(model_dir):
    return Captioner.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def page(captioner):
    with running_server(create_app(captioner, ServerLimits(max_beams=4))) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(url)
        yield page
        browser.close()


def test_the_page_reads_the_servers_limits(page):
    assert page.locator("#num-beams option").all_text_contents() == ["1", "2", "3", "4"]
    assert page.input_value("#max-new-tokens") == "67"
    page.select_option("#num-beams", "2")
    assert page.locator("#num-captions option").all_text_contents() == ["1", "2"]


def test_upload_shows_the_caption(page, captioner, tmp_path):
    path = tmp_path / "red square.png"
    image = Image.new("RGB", (48, 48), (235, 235, 235))
    image.paste((220, 30, 30), (10, 10, 30, 30))
    image.save(path)
    page.select_option("#num-beams", "3")
    page.select_option("#num-captions", "2")
    page.fill("#max-new-tokens", "8")
    page.set_input_files("#file-input", str(path))
    card = page.locator(".card", has_text="red square.png")
    card.locator(".captions li").first.wait_for()
    expected = captioner.caption([image], num_beams=3, num_return_sequences=2, max_new_tokens=8)[0]
    assert card.get_attribute("data-state") == "done"
    assert card.locator(".captions li").all_text_contents() == [c or "(empty caption)" for c in expected]
    assert card.locator("img").evaluate("img => img.naturalWidth") == 48  # the preview shows the upload
    if os.environ.get("CLIPCAP_SCREENSHOT"):  # for looking at the page by hand
        page.screenshot(path=os.environ["CLIPCAP_SCREENSHOT"], full_page=True)


def test_a_non_image_shows_the_servers_error(page, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    page.set_input_files("#file-input", str(path))
    card = page.locator(".card", has_text="notes.txt")
    card.locator(".status").filter(has_text="415").wait_for()
    assert card.get_attribute("data-state") == "error"
    assert card.locator(".status").text_content().startswith("415: notes.txt: not a supported image")
