"""The app in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by playwright-python loads the
page, switches a LoRA on, sets its weight, clicks Generate and sees the image. The screenshot is kept in
outputs/test-artifacts/app.png; the LoRA browser, resume and preset tests keep app-loras.png, app-resume.png and
app-preset.png beside it."""

from __future__ import annotations

import contextlib
import re
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


def _serve(settings):
    """The app on a free local port for the module's tests, closed after them."""
    from sdlora.ui.app.page import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch(settings, port=port, block=False)
    yield demo, settings
    demo.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from sdlora.ui.app.settings import AppSettings

    root = tmp_path_factory.mktemp("browser")
    shutil.copytree(trained_loras(tmp_path_factory), root / "loras")
    # The LoRAs were trained on tiny-sd15; the app would start on toy-sd15.
    settings = AppSettings(models_dir=root / "models", lora_dir=root / "loras", out_dir=root / "out",
                           model="tiny-sd15")
    yield from _serve(settings)


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


ARTIFACTS = SCREENSHOT.parent


def _browser(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


@contextlib.contextmanager
def _train_tab(url: str, height: int, timeout_ms: int):
    """A page of the app at `url` on its Train tab, in a headless Chromium closed afterwards."""
    with sync_api.sync_playwright() as playwright:
        browser = _browser(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": height})
            page.set_default_timeout(timeout_ms)
            page.goto(url)
            page.get_by_role("tab", name="Train").click()
            yield page
        finally:
            browser.close()


def _choose(page, elem_id: str, option: str) -> None:
    """Pick `option` in a gradio dropdown."""
    page.locator(f"#{elem_id} input").click()
    # An option's text is a check mark (shown when selected) and the choice.
    exact = re.compile(rf"^\W*{re.escape(option)}\s*$")
    page.locator('[data-testid="dropdown-option"]').filter(has_text=exact).first.click()


def _toast(page, text: str):
    """The error message gradio shows for a gr.Error."""
    return page.locator('[data-testid="toast-body"]', has_text=text).first


def test_lora_browser_in_the_browser(app):
    import json

    import torch
    from safetensors.torch import save_file

    demo, settings = app
    xl = settings.lora_dir / "xl.safetensors"  # an SDXL LoRA: marked for the tiny SD1 model, not switchable
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(8, 32),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 8)}, xl,
              metadata={"ss_tag_frequency": json.dumps({"1_xl": {"xlstyle": 2}})})
    try:
        with sync_api.sync_playwright() as playwright:
            browser = _browser(playwright)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1100})
                page.set_default_timeout(60_000)
                page.goto(demo.local_url)
                page.locator("#refresh").click()  # the new file appears after Refresh
                page.get_by_role("tab", name="LoRAs").click()
                table = sync_api.expect(page.locator("#lora-table"))
                table.to_contain_text("no (SDXL)")
                table.to_contain_text("alpha/alpha.safetensors")
                table.to_contain_text("SD 1.x")
                _choose(page, "browse-lora", "xl.safetensors")
                info = page.locator("#browse-info")
                info.get_by_text("is a LoRA for SDXL and the base model is SD 1.x").first.wait_for()
                page.locator("#browse-use").click()  # refused with the fix, in the page
                _toast(page, "choose a SDXL base model to use it").wait_for()
                _choose(page, "browse-lora", "alpha/alpha.safetensors")
                info.get_by_text("rank 4").first.wait_for()
                page.locator("#browse-words").get_by_text("zkstyle", exact=True).first.click()
                page.locator("#browse-use").click()
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "app-loras.png"), full_page=True)
                page.get_by_role("tab", name="Generate").click()
                page.wait_for_function("document.querySelector('#prompt textarea').value.startsWith('zkstyle')")
                assert page.locator("#lora-on-0 input[type=checkbox]").is_checked()
                assert page.locator("#lora-name-0 input").input_value() == "alpha/alpha.safetensors"
                # A slot holding the SDXL LoRA cannot be switched on.
                _choose(page, "lora-name-1", "xl.safetensors")
                page.wait_for_function("document.querySelector('#lora-on-1 input').disabled")
            finally:
                browser.close()
    finally:
        xl.unlink()
    assert (ARTIFACTS / "app-loras.png").stat().st_size > 0


@pytest.fixture(scope="module")
def train_app(tmp_path_factory):
    """The app over a data folder, a preset and a run stopped at step 2 of 4 (with its checkpoint)."""
    from test_app import _train_settings

    from sdlora.ui.app.engine import Engine
    from sdlora.ui.app.train import run_train, stop_train

    root = tmp_path_factory.mktemp("browser-train")
    settings = _train_settings(root)
    engine = Engine(settings)

    def progress(value, desc=""):
        if value == (2, 4) and not engine.stop.is_set():
            stop_train(engine)

    assert "stopped at step 2" in run_train(engine, "mini.toml", "imgs", "halted", "", 4, 1e-3, 4,
                                            progress=progress)[0]
    yield from _serve(settings)


def test_resume_in_the_browser(train_app):
    demo, settings = train_app
    with _train_tab(demo.local_url, 1300, 120_000) as page:
        _choose(page, "train-runs", "halted: step 2 of 4")
        page.locator("#train-resume").click()
        page.locator("#train-info").get_by_text("resumed halted, trained in").first.wait_for()
        page.locator("#train-loss img").wait_for(state="visible")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app-resume.png"), full_page=True)
    assert (settings.lora_dir / "halted" / "halted.safetensors").is_file()


def test_preset_round_trip_in_the_browser(train_app):
    from sdlora.config import load_config

    demo, settings = train_app
    with _train_tab(demo.local_url, 1600, 60_000) as page:
        page.get_by_text("Advanced (the rest comes from the preset)").click()
        _choose(page, "adv-targets", "attn_mlp")
        page.locator("#adv-prompts textarea").fill("zkstyle, a boat --d 3")
        page.locator("#adv-batch input").fill("0")
        page.locator("#adv-batch input").press("Tab")
        page.locator("#preset-name textarea").fill("roundtrip")
        page.locator("#preset-save").click()  # a bad value: the CLI's line, nothing written
        _toast(page, "train.batch_size: must be at least 1").wait_for()
        assert not (settings.configs_dir / "roundtrip.toml").exists()
        page.locator("#adv-batch input").fill("1")
        page.locator("#adv-batch input").press("Tab")
        page.locator("#preset-save").click()
        page.locator("#train-info").get_by_text("saved").first.wait_for()
        _choose(page, "train-preset", "mini.toml")  # the preset's values again ...
        page.wait_for_function("document.querySelector('#adv-targets input').value === 'attn'")
        _choose(page, "train-preset", "roundtrip.toml")  # ... and the saved ones back
        page.wait_for_function("document.querySelector('#adv-targets input').value === 'attn_mlp'")
        assert page.locator("#adv-prompts textarea").input_value() == "zkstyle, a boat --d 3"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app-preset.png"), full_page=True)
    cfg = load_config(settings.configs_dir / "roundtrip.toml")
    assert (cfg.lora.targets, cfg.train.batch_size, cfg.sample.prompts) == ("attn_mlp", 1, ["zkstyle, a boat --d 3"])
    # Fields left empty stay unset, as the preset had them (the page sends emptied numbers as 0 or null).
    assert (cfg.train.text_encoder_lr, cfg.model.clip_skip, cfg.train.max_timestep) == (None, None, None)
