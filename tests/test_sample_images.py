"""The committed sample_images/ set: shape of the dataset, and that scripts/make_sample_images.py reproduces it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_images"
SCRIPT = REPO / "scripts" / "make_sample_images.py"
MAX_TOTAL_BYTES = 5 * 1024 * 1024


def load_script() -> ModuleType:
    # scripts/ is not a package, so load the file directly.
    spec = importlib.util.spec_from_file_location("make_sample_images", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class body is built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def images() -> list[Path]:
    return sorted(SAMPLES.glob("*.png"))


def test_count(images: list[Path]) -> None:
    assert 16 <= len(images) <= 24


def test_captions_start_with_trigger(images: list[Path]) -> None:
    for image in images:
        caption = image.with_suffix(".txt").read_bytes().decode("utf-8").strip()
        assert caption.startswith("zkstyle"), image.name
        assert caption != "zkstyle", image.name


def test_sizes_and_aspect_ratios(images: list[Path]) -> None:
    sizes = set()
    for image in images:
        with Image.open(image) as im:
            sizes.add(im.size)
    assert all(512 <= side <= 768 for size in sizes for side in size)
    assert len({w / h for w, h in sizes}) >= 2


def test_total_size() -> None:
    assert sum(f.stat().st_size for f in SAMPLES.iterdir() if f.is_file()) < MAX_TOTAL_BYTES


def test_regenerates_byte_identical(tmp_path: Path) -> None:
    load_script().main(tmp_path)
    fresh = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    committed = {f.name: f.read_bytes() for f in SAMPLES.iterdir() if f.suffix in (".png", ".txt")}
    assert fresh.keys() == committed.keys()
    for name, data in fresh.items():
        assert data == committed[name], f"{name} differs from the committed file: rerun scripts/make_sample_images.py"
