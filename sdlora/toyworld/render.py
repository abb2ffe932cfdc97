"""Draw toy-world scenes: the plain look the base model is trained on, and drawing styles a LoRA can learn.

A `Look` says how shapes are drawn (flat or hatched fill, outline) and whether the background is hatched. The
plain look is the base model's world; `HATCHED` is the demo's style, which the base model never sees; the
VAE is trained on random looks around both (`random_look`) so that it can reconstruct any of them, as a real
SD VAE reconstructs styles its UNet was never fine-tuned on.

Shapes are drawn at four times the size and reduced, so edges are antialiased as in a real picture.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from sdlora.toyworld.scene import COLOURS, SIZES, Scene, ToyObject, cell_centre

SUPERSAMPLE = 4
BACKGROUND_GREYS = {"white": 242.0, "grey": 128.0, "black": 22.0}
GRADIENTS = {"light gradient": (250.0, 165.0), "dark gradient": (95.0, 10.0)}
CHECKS = (148.0, 112.0)  # the two greys of the checkered background, 8 checks a side


@dataclass(frozen=True)
class Look:
    """How a scene is drawn. Lengths are shares of the image side, so a look is the same at any size."""

    outline: float = 0.0  # width of a dark outline inside the edge of the largest shapes (thinner on smaller); 0 = none
    outline_rgb: tuple[int, int, int] = (26, 24, 40)
    hatch_period: float = 0.0  # distance between hatch lines in the shapes; 0 = flat fill
    hatch_angle: float = 45.0  # degrees, counter-clockwise from the x axis
    hatch_width: float = 0.4  # share of a period that is a line
    hatch_shade: float = 0.45  # the lines are the fill colour times this
    background_hatch: bool = False  # lines across the background, at right angles to the shapes'
    background_shade: float = 28.0  # how much darker (on light grounds) or lighter the background lines are, of 255


PLAIN = Look()
# The demo's style: thick dark outlines and diagonal hatching, like a pen-and-ink print.
HATCHED = Look(outline=0.025, hatch_period=0.16, hatch_width=0.45, hatch_angle=45.0, background_hatch=True,
               background_shade=70.0)


def random_look(rng: random.Random) -> Look:
    """A random drawing style for training the autoencoder: plain, outlined and hatched in any direction."""
    if rng.random() < 0.4:
        return PLAIN
    return Look(
        outline=rng.choice((0.0, rng.uniform(0.01, 0.04))),
        outline_rgb=rng.choice(((26, 24, 40), (0, 0, 0), (60, 60, 60), (250, 250, 250))),
        hatch_period=rng.choice((0.0, rng.uniform(0.03, 0.09))),
        hatch_angle=rng.uniform(0.0, 180.0),
        hatch_width=rng.uniform(0.25, 0.6),
        hatch_shade=rng.uniform(0.3, 0.8),
        background_hatch=rng.random() < 0.5,
    )


def render(scene: Scene, size: int = 128, look: Look = PLAIN) -> Image.Image:
    """The RGB picture of `scene`, `size` pixels square."""
    side = size * SUPERSAMPLE
    canvas = _background(scene, side)
    if look.background_hatch:
        lines = _stripes(side, look.hatch_period or 0.05, look.hatch_angle + 90.0, 0.25)
        # Darker lines on light grounds, lighter ones on dark grounds, so the texture shows on both.
        shift = np.where(canvas.mean(axis=2, keepdims=True) > 90, -look.background_shade, look.background_shade)
        canvas += lines[..., None] * shift
    for obj in scene.objects:
        mask = _shape_mask(obj, side, width=0)
        colour = np.clip(np.add(COLOURS[obj.colour], obj.tint), 0, 255).astype(np.float32)
        fill: np.ndarray = np.broadcast_to(colour, canvas.shape)
        if look.hatch_period:
            lines = _stripes(side, look.hatch_period, look.hatch_angle, look.hatch_width)[..., None]
            fill = fill * (1.0 - lines * (1.0 - look.hatch_shade))
        canvas = canvas * (1.0 - mask[..., None]) + fill * mask[..., None]
        if look.outline:
            # Thinner on small shapes, or a small star would be all outline.
            width = look.outline * side * min(1.0, SIZES[obj.size] / max(SIZES.values()))
            edge = _shape_mask(obj, side, width=max(1, round(width))) * mask
            canvas = canvas * (1.0 - edge[..., None]) + np.asarray(look.outline_rgb, np.float32) * edge[..., None]
    picture = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
    return picture.reduce(SUPERSAMPLE)


def render_batch(scenes: list[Scene], size: int = 128, look: Look = PLAIN) -> np.ndarray:
    """[N, size, size, 3] uint8 pictures of `scenes` (a picklable unit of work for a process pool)."""
    return np.stack([np.asarray(render(scene, size, look)) for scene in scenes])


def _background(scene: Scene, side: int) -> np.ndarray:
    rng = random.Random(scene.seed)
    name = scene.background
    if name in BACKGROUND_GREYS:
        grey = np.full((side, side), BACKGROUND_GREYS[name] + rng.uniform(-8, 8), np.float32)
    elif name in GRADIENTS:
        top, bottom = GRADIENTS[name]
        ramp = np.linspace(top, bottom, side, dtype=np.float32)
        if rng.random() < 0.5:
            ramp = ramp[::-1]
        grey = np.repeat(ramp[:, None], side, axis=1)
    else:
        check = side // 8
        phase = rng.randrange(check)
        y, x = np.mgrid[0:side, 0:side]
        grey = np.where(((x + phase) // check + (y + phase) // check) % 2 == 0, *CHECKS).astype(np.float32)
    return np.repeat(grey[..., None], 3, axis=2)


def _stripes(side: int, period: float, angle: float, width: float) -> np.ndarray:
    """1 on the lines of a parallel hatch, 0 between them (antialiased by the reduction that follows)."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    theta = math.radians(angle)
    # Distance across the lines: the lines run along `angle`, so measure along its normal.
    across = -x * math.sin(theta) + y * math.cos(theta)
    return ((across / (period * side)) % 1.0 < width).astype(np.float32)


def _shape_mask(obj: ToyObject, side: int, width: int) -> np.ndarray:
    """The shape's area in [0, 1] (width 0), or a band `width` pixels wide inside its edge."""
    image = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(image)
    cx, cy = cell_centre(obj.cell)
    cx, cy = (cx + obj.offset[0]) * side, (cy + obj.offset[1]) * side
    r = SIZES[obj.size] * side / 2
    stroke = {"fill": 255} if width == 0 else {"outline": 255, "width": width}
    if obj.shape in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), **stroke)
        if obj.shape == "ring":
            hole = 0.5 * r
            if width == 0:
                draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=0)
            else:
                # The outline of the hole lies outside the hole, inside the ring.
                draw.ellipse((cx - hole - width, cy - hole - width, cx + hole + width, cy + hole + width),
                             outline=255, width=width)
    else:
        draw.polygon(_polygon(obj.shape, cx, cy, r), **stroke)
    return np.asarray(image, np.float32) / 255.0


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.86 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Equilateral, pointing up, its centroid a little below the centre so it looks centred.
        R, dy = 1.1 * r, 0.15 * r
        return [(cx + R * math.sin(a), cy + dy - R * math.cos(a)) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    if shape == "star":
        outer, inner = 1.08 * r, 0.45 * r
        return [(cx + (outer if k % 2 == 0 else inner) * math.sin(k * math.pi / 5),
                 cy - (outer if k % 2 == 0 else inner) * math.cos(k * math.pi / 5)) for k in range(10)]
    if shape == "cross":
        a, b = 0.34 * r, r
        return [(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a), (cx + b, cy + a),
                (cx + a, cy + a), (cx + a, cy + b), (cx - a, cy + b), (cx - a, cy + a), (cx - b, cy + a),
                (cx - b, cy - a), (cx - a, cy - a)]
    raise ValueError(f"unknown shape {shape!r}")
