"""The toy world's vocabulary, its scenes and their captions.

A scene is one or two flat shapes on a neutral background. Every word a caption can use has one entry in the
tables below, and the renderer and the evaluator read the same tables, so a caption, its picture and the
measurement of a generated picture always agree on what "red" or "top left" means.

Object colours are saturated hues and backgrounds are neutral greys: that is what lets the evaluator find the
objects by saturation alone, whatever the background and however grainy a generated image is.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")

# name -> RGB; the hues are spread round the colour wheel so that the nearest hue names the colour.
COLOURS = {
    "red": (215, 40, 40),
    "orange": (240, 135, 20),
    "yellow": (225, 225, 30),
    "green": (40, 165, 60),
    "cyan": (30, 190, 200),
    "blue": (40, 75, 215),
    "purple": (135, 55, 195),
    "pink": (240, 110, 185),
}

# name -> object diameter as a share of the image side
SIZES = {"small": 0.2, "large": 0.36}

# (column, row) of a 3x3 grid -> the words a caption uses
POSITIONS = {
    (0, 0): "at the top left",
    (1, 0): "at the top",
    (2, 0): "at the top right",
    (0, 1): "on the left",
    (1, 1): "in the center",
    (2, 1): "on the right",
    (0, 2): "at the bottom left",
    (1, 2): "at the bottom",
    (2, 2): "at the bottom right",
}
# Object centres as a share of the image side: a large object still fits inside at the edges.
CELL_CENTRES = (0.22, 0.5, 0.78)

BACKGROUNDS = ("white", "grey", "black", "light gradient", "dark gradient", "checkered")

TWO_OBJECT_SHARE = 0.25  # share of sampled scenes with a second object
MAX_OFFSET = 0.03  # objects sit up to this share of the side off their cell centre
REACH = 1.25  # the farthest point of any shape (a triangle's tip) from its centre, in radii


@dataclass(frozen=True)
class ToyObject:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]  # (column, row)
    # Small variations that the caption does not name, so the model sees many pictures of one caption.
    offset: tuple[float, float] = (0.0, 0.0)  # share of the image side
    tint: tuple[int, int, int] = (0, 0, 0)

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {POSITIONS[self.cell]}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[ToyObject, ...]
    background: str
    seed: int = 0  # seeds what the renderer varies inside a background (gradient direction, check phase)

    def caption(self) -> str:
        return " and ".join(o.phrase() for o in self.objects) + f", on a {self.background} background"


def sample_object(rng: random.Random, shapes=SHAPES, colours=tuple(COLOURS), cells=tuple(POSITIONS)) -> ToyObject:
    """A random object drawn from the given shapes, colours and cells, slightly off its cell and tinted."""
    return ToyObject(
        shape=rng.choice(shapes),
        colour=rng.choice(colours),
        size=rng.choice(list(SIZES)),
        cell=rng.choice(cells),
        offset=(rng.uniform(-MAX_OFFSET, MAX_OFFSET), rng.uniform(-MAX_OFFSET, MAX_OFFSET)),
        tint=(rng.randint(-12, 12), rng.randint(-12, 12), rng.randint(-12, 12)),
    )


def sample_scene(rng: random.Random, two_object_share: float = TWO_OBJECT_SHARE) -> Scene:
    """A random scene. A second object takes another colour and a cell far enough away that the two never
    touch whatever their shapes and offsets, so each keeps a colour of its own for the evaluator to find it by."""
    first = sample_object(rng)
    objects = [first]
    if rng.random() < two_object_share:
        second = sample_object(rng, colours=[c for c in COLOURS if c != first.colour])
        gap = REACH * (SIZES[first.size] + SIZES[second.size]) / 2 + 2 * MAX_OFFSET * 2**0.5
        cells = [c for c in POSITIONS if _distance(c, first.cell) >= gap]
        if cells:  # none far enough from the centre for two large objects: the scene keeps one
            objects.append(replace(second, cell=rng.choice(cells)))
    return Scene(tuple(objects), rng.choice(BACKGROUNDS), seed=rng.randrange(2**31))


def cell_centre(cell: tuple[int, int]) -> tuple[float, float]:
    """Where an object in `cell` sits, as shares of the image width and height."""
    return CELL_CENTRES[cell[0]], CELL_CENTRES[cell[1]]


def _distance(a: tuple[int, int], b: tuple[int, int]) -> float:
    (ax, ay), (bx, by) = cell_centre(a), cell_centre(b)
    return ((ax - bx) ** 2 + (ay - by) ** 2) ** 0.5
