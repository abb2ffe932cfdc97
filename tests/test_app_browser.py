"""The app in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by playwright-python loads the
page, switches a LoRA on, sets its weight, clicks Generate and sees the image. The screenshot is kept in
outputs/test-artifacts/app.png."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image
from test_generate import trained_loras

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = REPO / "outputs" / "test-artifacts" / "app.png"

if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing (pip install playwright)")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from sdlora.ui.app import AppSettings, launch

    root = tmp_path_factory.mktemp("browser")
    shutil.copytree(trained_loras(tmp_path_factory), root / "loras")
    # The LoRAs were trained on tiny-sd15; the app would start on toy-sd15.
    settings = AppSettings(models_dir=root / "models", lora_dir=root / "loras", out_dir=root / "out",
                           model="tiny-sd15")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch(settings, port=port, block=False)
    yield demo, settings
    demo.close()


def test_generate_in_the_browser(app):
    demo, settings = app
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(demo.local_url)
            page.locator("#prompt textarea").fill("zkstyle, a lighthouse")
            page.locator("#lora-on-0 input[type=checkbox]").check()
            for field, value in (("lora-weight-0", "0.5"), ("steps", "2"), ("width", "64"), ("height", "64")):
                number = page.locator(f"#{field} input[type=number]")
                number.fill(value)
                number.press("Enter")
            page.locator("#seed input").fill("3")
            page.locator("#generate").click()
            page.locator("#gallery img").first.wait_for(state="visible", timeout=120_000)
            assert page.locator("#used-seed input").input_value() == "3"
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
    (saved,) = settings.out_dir.glob("*.png")
    with Image.open(saved) as png:
        assert png.size == (64, 64)
        parameters = png.info["parameters"]
    assert parameters.startswith("zkstyle, a lighthouse <lora:alpha:0.5>\n") and "Steps: 2," in parameters
    assert SCREENSHOT.stat().st_size > 0
