"""The committed sample_images/ set: the demo's style set, and that scripts/make_sample_images.py reproduces it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from sdlora.toyworld.style_set import SAMPLE_SIZE, TRIGGER, training_scenes, with_trigger

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_images"
SCRIPT = REPO / "scripts" / "make_sample_images.py"
MAX_TOTAL_BYTES = 1024 * 1024


def load_script() -> ModuleType:
    # scripts/ is not a package, so load the file directly.
    spec = importlib.util.spec_from_file_location("make_sample_images", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def images() -> list[Path]:
    return sorted(SAMPLES.glob("*.png"))


def test_one_picture_per_style_set_scene(images: list[Path]) -> None:
    scenes = training_scenes()
    assert len(images) == len(scenes) == 20
    for image, scene in zip(images, scenes):
        assert image.with_suffix(".txt").read_text(encoding="utf-8").strip() == with_trigger(scene.caption())
        with Image.open(image) as im:
            assert im.size == (SAMPLE_SIZE, SAMPLE_SIZE) and im.mode == "RGB"


def test_captions_start_with_trigger(images: list[Path]) -> None:
    for image in images:
        caption = image.with_suffix(".txt").read_bytes().decode("utf-8").strip()
        assert caption.startswith(f"{TRIGGER}, a "), image.name


def test_total_size() -> None:
    assert sum(f.stat().st_size for f in SAMPLES.iterdir() if f.is_file()) < MAX_TOTAL_BYTES


def test_regenerates_byte_identical(tmp_path: Path) -> None:
    load_script().main(tmp_path)
    fresh = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    committed = {f.name: f.read_bytes() for f in SAMPLES.iterdir() if f.suffix in (".png", ".txt")}
    assert fresh.keys() == committed.keys()
    for name, data in fresh.items():
        assert data == committed[name], f"{name} differs from the committed file: rerun scripts/make_sample_images.py"
