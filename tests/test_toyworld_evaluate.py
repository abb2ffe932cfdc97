"""The toy-world evaluator, checked on rendered ground truth: it must read colour, position and shape right on
fresh renders (seeds the shape classifier never trained or was measured on), clean and degraded, and its style
score must separate the demo's hatched look from the plain one without being moved by grain."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.toyworld.evaluate import (
    WEIGHTS,
    ShapeNet,
    degrade,
    evaluator_accuracy,
    find_objects,
    load_shape_classifier,
    score_image,
    style_score,
)
from sdlora.toyworld.render import BACKGROUND_GREYS, HATCHED, PLAIN, Look, render
from sdlora.toyworld.scene import BACKGROUNDS, Scene, ToyObject

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_shape_classifier.py"
# scripts/train_shape_classifier.py trains on seed 0 and measures on 1_000_003; these draw other scenes.
SEED = 4242
SCENES = 50  # per look and condition


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, dict[str, float]]]:
    return {name: evaluator_accuracy(SCENES, SEED, strength, looks=("plain", "hatched"))
            for name, strength in (("clean", 0.0), ("degraded", 1.0))}


@pytest.mark.parametrize("look", ["plain", "hatched"])
def test_reads_clean_renders(measured, look: str) -> None:
    r = measured["clean"][look]
    assert r["colour"] >= 0.98 and r["position"] >= 0.98, r
    assert r["shape"] >= 0.95, r


@pytest.mark.parametrize("look", ["plain", "hatched"])
def test_reads_degraded_renders(measured, look: str) -> None:
    r = measured["degraded"][look]
    assert r["colour"] >= 0.95 and r["position"] >= 0.95, r
    assert r["shape"] >= 0.93, r


@pytest.mark.parametrize("condition", ["clean", "degraded"])
def test_style_separates_hatched_from_plain(measured, condition: str) -> None:
    assert measured[condition]["plain"]["style_max"] < 0.1, measured[condition]["plain"]
    assert measured[condition]["hatched"]["style_min"] > 0.9, measured[condition]["hatched"]


def _grainy(image: Image.Image, sigma: float, seed: int) -> Image.Image:
    noise = np.random.default_rng(seed).normal(0.0, sigma, (image.size[1], image.size[0], 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise + 0.5, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("background", BACKGROUNDS)
def test_grain_is_not_style(background: str) -> None:
    """Grain, which a naive texture measure reads as detail, never makes a plain picture look hatched, however
    heavy; grain heavier than `degrade` adds leaves a hatched picture hatched."""
    scene = Scene((ToyObject("star", "red", "large", (0, 0)), ToyObject("ring", "blue", "small", (2, 2))), background)
    for seed, sigma in enumerate((20.0, 40.0, 60.0)):
        assert style_score(_grainy(render(scene, look=PLAIN), sigma, seed)) < 0.1, sigma
    assert style_score(_grainy(render(scene, look=HATCHED), 20.0, 0)) > 0.8


def test_pure_noise_is_not_style() -> None:
    grey = Image.new("RGB", (128, 128), (int(BACKGROUND_GREYS["grey"]),) * 3)
    assert max(style_score(_grainy(grey, 60.0, seed)) for seed in range(5)) < 0.1


def test_style_is_specific_to_the_hatch_direction() -> None:
    """Hatching across the style's direction reads as its opposite, and at 0 or 90 degrees (equal parts of both
    diagonals) as nothing: the score measures this style, not hatching in general."""
    scene = Scene((ToyObject("circle", "green", "large", (1, 1)),), "grey")
    for angle in (0.0, 90.0, 135.0):
        look = Look(outline=HATCHED.outline, hatch_period=HATCHED.hatch_period, hatch_angle=angle,
                    background_hatch=True)
        assert style_score(render(scene, look=look)) < 0.05, angle
    assert style_score(render(scene, look=HATCHED)) > 0.95


def test_touching_objects_are_told_apart() -> None:
    """Large squares in diagonal cells overlap at their corners; each is still found with its own colour."""
    scene = Scene((ToyObject("square", "orange", "large", (0, 0)), ToyObject("square", "blue", "large", (1, 1))),
                  "white")
    found = {f.colour: f for f in find_objects(render(scene))}
    assert set(found) == {"orange", "blue"}
    assert (found["orange"].cell, found["blue"].cell) == ((0, 0), (1, 1))
    assert found["orange"].shape == found["blue"].shape == "square"


def test_score_image_matches_by_colour_then_position() -> None:
    drawn = Scene((ToyObject("triangle", "red", "large", (0, 0)),), "grey")
    image = render(drawn)
    right = score_image(image, drawn)
    assert (right["colour"], right["position"], right["shape"]) == (1.0, 1.0, 1.0)
    # The caption's colour is wrong: the object in the named cell is judged on position and shape.
    recoloured = score_image(image, Scene((ToyObject("triangle", "blue", "large", (0, 0)),), "grey"))
    assert (recoloured["colour"], recoloured["position"], recoloured["shape"]) == (0.0, 1.0, 1.0)
    moved = score_image(image, Scene((ToyObject("circle", "red", "large", (2, 2)),), "grey"))
    assert (moved["colour"], moved["position"], moved["shape"]) == (1.0, 0.0, 0.0)
    assert score_image(render(Scene((), "grey")), drawn)["objects"][0]["found"] is None


def test_degrade_is_reproducible() -> None:
    image = render(Scene((ToyObject("cross", "cyan", "small", (1, 0)),), "checkered"), look=HATCHED)
    first, second = (np.asarray(degrade(image, random.Random(3))) for _ in range(2))
    assert np.array_equal(first, second)
    assert not np.array_equal(first, np.asarray(degrade(image, random.Random(4))))


def test_shipped_weights_match_the_architecture() -> None:
    from safetensors.torch import load_file

    shipped = load_file(str(WEIGHTS))
    expected = ShapeNet().state_dict()
    assert {k: tuple(v.shape) for k, v in shipped.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert WEIGHTS.stat().st_size < 1024 * 1024
    net = load_shape_classifier()
    assert sum(p.numel() for p in net.parameters()) < 50_000


def test_train_script_smoke(tmp_path: Path) -> None:
    # scripts/ is not a package, so load the file directly.
    spec = importlib.util.spec_from_file_location("train_shape_classifier", SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)
    out = tmp_path / "shapes.safetensors"
    threads = torch.get_num_threads()
    try:
        script.main(["--renders", "12", "--epochs", "1", "--held-out", "6", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    net = load_shape_classifier(out)
    logits = net(torch.zeros(2, 2, 32, 32), torch.full((2,), 0.3))
    assert logits.shape == (2, 6) and torch.isfinite(logits).all()
