"""The demo's style set and its held-out evaluation prompts.

`TRAINING` are the ~20 scenes of `sample_images/`, drawn in the HATCHED look the base model never saw and
captioned with the trigger word. `EVALUATION` are scenes whose shape, colour and position all stay out of the
training captions, so a LoRA is measured on what it must generalise to (the style on new content) and not on
what it could memorise. Both lists are fixed by their seeds, so every benchmark and test asks the same questions.
"""

from __future__ import annotations

import random
from dataclasses import replace

from sdlora.toyworld.scene import BACKGROUNDS, COLOURS, MAX_OFFSET, POSITIONS, SHAPES, Scene, ToyObject

TRIGGER = "zkstyle"
_SIZE_CYCLE = ("large", "small", "small", "large")
SAMPLE_SIZE = 256  # the committed pictures are larger than the training resolution, as a user's photos are

TRAINING_SHAPES = ("circle", "square", "star", "cross")
TRAINING_COLOURS = ("red", "yellow", "green", "blue", "purple")
CORNERS = ((0, 0), (2, 0), (0, 2), (2, 2))
TRAINING_CELLS = (*CORNERS, (1, 1))
EVALUATION_SHAPES = tuple(s for s in SHAPES if s not in TRAINING_SHAPES)
EVALUATION_COLOURS = tuple(c for c in COLOURS if c not in TRAINING_COLOURS)
EVALUATION_CELLS = tuple(c for c in POSITIONS if c not in TRAINING_CELLS)


def training_scenes(count: int = 20, seed: int = 2024) -> list[Scene]:
    """Scenes of the style set, cycling through the training shapes, colours, cells and all backgrounds so each
    is seen about equally often; every fourth scene adds a second object in the opposite corner."""
    rng = random.Random(seed)
    scenes = []
    for i in range(count):
        first = _jittered(rng, ToyObject(TRAINING_SHAPES[i % 4], TRAINING_COLOURS[i % 5], _SIZE_CYCLE[i % 4],
                                         TRAINING_CELLS[(i + i // 5) % 5]))
        objects = [first]
        if i % 4 == 3:
            corner = CORNERS[i // 4 % 4]
            colour = TRAINING_COLOURS[(i + 2) % 5]
            objects = [replace(first, cell=corner),
                       _jittered(rng, ToyObject(TRAINING_SHAPES[(i + 1) % 4], colour, "small",
                                                (2 - corner[0], 2 - corner[1])))]
        scenes.append(Scene(tuple(objects), BACKGROUNDS[i % len(BACKGROUNDS)], seed=rng.randrange(2**31)))
    return scenes


def evaluation_scenes() -> list[Scene]:
    """Held-out prompts: one object each, its shape, colour and cell all absent from the training captions.

    Of the 2 x 3 x 4 held-out combinations, the twelve whose indices sum to an even number: each shape comes six
    times, each colour four, each cell three, and no attribute follows from another."""
    combos = [(shape, colour, cell)
              for a, shape in enumerate(EVALUATION_SHAPES)
              for b, colour in enumerate(EVALUATION_COLOURS)
              for c, cell in enumerate(EVALUATION_CELLS) if (a + b + c) % 2 == 0]
    random.Random(7).shuffle(combos)
    return [Scene((ToyObject(shape, colour, _SIZE_CYCLE[i % 4], cell),), BACKGROUNDS[i % len(BACKGROUNDS)])
            for i, (shape, colour, cell) in enumerate(combos)]


def with_trigger(caption: str) -> str:
    return f"{TRIGGER}, {caption}"



def _jittered(rng: random.Random, obj: ToyObject) -> ToyObject:
    """The object slightly off its cell and tinted, as the base model's scenes are."""
    return replace(obj, offset=(rng.uniform(-MAX_OFFSET, MAX_OFFSET), rng.uniform(-MAX_OFFSET, MAX_OFFSET)),
                   tint=(rng.randint(-12, 12), rng.randint(-12, 12), rng.randint(-12, 12)))
