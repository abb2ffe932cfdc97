"""The toy world: scenes, captions, pictures and the style set's held-out prompts."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sdlora.toyworld.render import HATCHED, PLAIN, random_look, render
from sdlora.toyworld.scene import COLOURS, POSITIONS, Scene, ToyObject, sample_scene
from sdlora.toyworld.style_set import (
    EVALUATION_CELLS,
    EVALUATION_COLOURS,
    EVALUATION_SHAPES,
    TRAINING_CELLS,
    TRAINING_COLOURS,
    TRAINING_SHAPES,
    evaluation_scenes,
    training_scenes,
)


def test_caption_names_every_attribute() -> None:
    scene = Scene((ToyObject("star", "red", "small", (0, 0)), ToyObject("ring", "blue", "large", (2, 2))), "grey")
    assert scene.caption() == ("a small red star at the top left and a large blue ring at the bottom right, "
                               "on a grey background")


def test_sampled_scenes_cover_the_vocabulary_and_never_overlap() -> None:
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(2000)]
    seen = {(o.shape, o.colour, o.size, o.cell) for s in scenes for o in s.objects}
    assert {o[1] for o in seen} == set(COLOURS) and {o[3] for o in seen} == set(POSITIONS)
    assert 0.2 < sum(len(s.objects) == 2 for s in scenes) / len(scenes) < 0.3
    pairs = [s.objects for s in scenes if len(s.objects) == 2]
    assert all(a.colour != b.colour for a, b in pairs)
    for a, b in pairs[:60]:
        # Each object drawn alone on black: no pixel may belong to both.
        covered = [np.asarray(render(Scene((o,), "black"), 128)).max(axis=2) > 40 for o in (a, b)]
        assert not (covered[0] & covered[1]).any(), (a, b)


def test_render_is_deterministic_and_puts_the_object_where_the_caption_says() -> None:
    scene = Scene((ToyObject("square", "blue", "large", (2, 0)),), "white", seed=3)
    picture = render(scene, 128)
    assert picture.size == (128, 128) and picture.mode == "RGB"
    assert np.array_equal(np.asarray(picture), np.asarray(render(scene, 128)))
    pixels = np.asarray(picture).astype(int)
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 100)
    ys, xs = np.nonzero(blue)
    assert abs(xs.mean() / 128 - 0.78) < 0.02 and abs(ys.mean() / 128 - 0.22) < 0.02


def test_hatched_look_adds_lines_inside_the_shape() -> None:
    scene = Scene((ToyObject("circle", "green", "large", (1, 1)),), "white", seed=1)
    plain, hatched = (np.asarray(render(scene, 128, look)).astype(float) for look in (PLAIN, HATCHED))
    centre = (slice(54, 74), slice(54, 74))
    assert plain[centre].std(axis=(0, 1)).max() < 1.0  # a flat fill
    assert hatched[centre].std(axis=(0, 1)).max() > 20.0  # lines across it


def test_random_looks_vary() -> None:
    rng = random.Random(1)
    looks = [random_look(rng) for _ in range(50)]
    assert PLAIN in looks and len(set(looks)) > 20


def test_style_set_holds_out_shapes_colours_and_cells() -> None:
    assert not set(EVALUATION_SHAPES) & set(TRAINING_SHAPES)
    assert not set(EVALUATION_COLOURS) & set(TRAINING_COLOURS)
    assert not set(EVALUATION_CELLS) & set(TRAINING_CELLS)
    for scene in training_scenes():
        for obj in scene.objects:
            assert obj.shape in TRAINING_SHAPES and obj.colour in TRAINING_COLOURS and obj.cell in TRAINING_CELLS
    evaluation = evaluation_scenes()
    assert len({s.caption() for s in evaluation}) == len(evaluation) == 12
    for scene in evaluation:
        (obj,) = scene.objects
        assert obj.shape in EVALUATION_SHAPES and obj.colour in EVALUATION_COLOURS and obj.cell in EVALUATION_CELLS


@pytest.mark.parametrize("attribute, values", [("shape", EVALUATION_SHAPES), ("colour", EVALUATION_COLOURS),
                                               ("cell", EVALUATION_CELLS)])
def test_held_out_prompts_are_balanced(attribute: str, values: tuple) -> None:
    counts = [sum(getattr(s.objects[0], attribute) == v for s in evaluation_scenes()) for v in values]
    assert len(set(counts)) == 1
