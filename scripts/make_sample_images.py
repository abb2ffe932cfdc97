"""Paint the repo's own captioned style dataset into sample_images/.

Why this exists: the demo and the tests need a small set of captioned images to train a LoRA on, and this
project can neither download a dataset nor ship pictures of unclear licence. So the repo paints its own:
20 pictures in one invented style, "zkstyle" - a flat risograph-print look (cream paper; teal, coral,
mustard and navy inks; thick navy outlines; fills printed slightly off register; halftone-dot skies and
hatched ground; a big sun or moon) - over varied simple subjects, so that the style, not the content, is
what the images share and what the trigger word can bind to. Every pixel comes from this file, so the set
is as license-clean as the code.

Reproducible: each picture has its own seeded random.Random, no fonts are used and the PNGs carry no
timestamps, so running the script twice gives byte-identical files (for one Pillow build: its rasteriser
and zlib shape the bytes). Square, portrait and landscape sizes exercise aspect-ratio bucketing.

Usage: python scripts/make_sample_images.py [OUT_DIR]    (default: sample_images/ at the repo root)
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image, ImageChops, ImageDraw

REPO = Path(__file__).resolve().parents[1]
# Lets the script run from a checkout that was never pip-installed.
sys.path.insert(0, str(REPO))
from sdlora.atomic import atomic_path, write_text  # noqa: E402

# Pictures are drawn straight in "P" mode with only these five inks: nothing to quantise (so no dither
# noise) and PNG stores them at 4 bits per pixel, which keeps the committed set small.
CREAM, NAVY, TEAL, CORAL, MUSTARD = range(5)
PALETTE = [(243, 233, 210), (31, 50, 86), (38, 150, 140), (233, 104, 80), (236, 190, 82)]
OUTLINE = 6
# A riso press prints each ink in its own pass, so colour lands a little off its outline; copying that
# offset is much of what makes the style recognisable.
MISREGISTER = (5, 4)
BORDER = 12
SQUARE, PORTRAIT, LANDSCAPE = (512, 512), (512, 768), (768, 512)

Point = tuple[float, float]
# (ImageDraw method, points in design units, extra keyword arguments of that method)
Part = tuple[str, list[Point], dict]


def poly(*pts: Point) -> Part:
    return ("polygon", list(pts), {})


def oval(x0: float, y0: float, x1: float, y1: float) -> Part:
    return ("ellipse", [(x0, y0), (x1, y1)], {})


def circle(cx: float, cy: float, r: float) -> Part:
    return oval(cx - r, cy - r, cx + r, cy + r)


def pie(x0: float, y0: float, x1: float, y1: float, start: float, end: float) -> Part:
    return ("pieslice", [(x0, y0), (x1, y1)], {"start": start, "end": end})


def arc(cx: float, cy: float, r: float, a0: float, a1: float, n: int = 10) -> list[Point]:
    """Points along a circular arc; angles in degrees, clockwise on screen as in ImageDraw."""
    angles = (math.radians(a0 + (a1 - a0) * i / n) for i in range(n + 1))
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]


def rotate(pts: list[Point], degrees: float, about: Point) -> list[Point]:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return [(about[0] + x * c - y * s, about[1] + x * s + y * c) for x, y in pts]


@dataclass
class Pen:
    """Draws one picture in design units: (0, 0) is the spot on the horizon where the subject stands."""

    img: Image.Image
    origin: Point
    draw: ImageDraw.ImageDraw = field(init=False)
    textures: dict[str, Image.Image] = field(init=False)

    def __post_init__(self) -> None:
        self.draw = ImageDraw.Draw(self.img)
        self.textures = {"hatch": _hatch(self.img.size), "dots": _dots(self.img.size)}

    def at(self, pts: list[Point], shift: Point = (0, 0)) -> list[Point]:
        ox, oy = self.origin[0] + shift[0], self.origin[1] + shift[1]
        return [(ox + x, oy + y) for x, y in pts]

    def shape(self, fill: int, *parts: Part, texture: str | None = None) -> None:
        """One ink area, the union of `parts`: fill off register, optional knocked-out texture, one outline."""
        area = self._mask(parts, MISREGISTER)
        self.img.paste(fill, mask=area)
        if texture:
            ink = NAVY if fill == CREAM else CREAM
            self.img.paste(ink, mask=ImageChops.logical_and(area, self.textures[texture]))
        self.img.paste(NAVY, mask=self._outline(parts))

    def line(self, pts: list[Point], width: int, fill: int = NAVY) -> None:
        self.draw.line(self.at(pts), fill=fill, width=width, joint="curve")

    def tubes(self, segments: list[list[Point]], fill: int, width: int = 10) -> None:
        """Outlined strokes; every outline goes down first so that joints between tubes stay clean."""
        for pts in segments:
            self.line(pts, width + 2 * OUTLINE)
        for pts in segments:
            self.draw.line(self.at(pts, MISREGISTER), fill=fill, width=width, joint="curve")

    def _mask(self, parts: tuple[Part, ...], shift: Point = (0, 0)) -> Image.Image:
        mask = Image.new("1", self.img.size, 0)
        draw = ImageDraw.Draw(mask)
        for kind, pts, kw in parts:
            getattr(draw, kind)(self.at(pts, shift), fill=1, **kw)
        return mask

    def _outline(self, parts: tuple[Part, ...]) -> Image.Image:
        # The outline of a union is each part's rim minus whatever lies inside another part, so a cloud of
        # overlapping ovals reads as one silhouette instead of a stack of rings.
        rims = Image.new("1", self.img.size, 0)
        inside = Image.new("1", self.img.size, 0)
        for kind, pts, kw in parts:
            getattr(ImageDraw.Draw(rims), kind)(self.at(pts), outline=1, width=OUTLINE, **kw)
            own = Image.new("1", self.img.size, 0)
            getattr(ImageDraw.Draw(own), kind)(self.at(pts), fill=1, outline=0, width=OUTLINE, **kw)
            inside = ImageChops.logical_or(inside, own)
        return ImageChops.logical_and(rims, ImageChops.invert(inside))


def _hatch(size: tuple[int, int]) -> Image.Image:
    mask = Image.new("1", size, 0)
    draw = ImageDraw.Draw(mask)
    for x in range(0, size[0] + size[1], 14):
        draw.line([(x, 0), (x - size[1], size[1])], fill=1, width=3)
    return mask


def _dots(size: tuple[int, int]) -> Image.Image:
    mask = Image.new("1", size, 0)
    draw = ImageDraw.Draw(mask)
    for row, y in enumerate(range(0, size[1], 14)):
        for x in range(7 * (row % 2), size[0], 14):
            draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=1)
    return mask


# --- scenery shared by every picture -------------------------------------------------------------------


def halftone_sky(pen: Pen, horizon: float, night: bool) -> None:
    """Staggered dots whose size ramps like a printed gradient: warm haze by day, dark zenith by night."""
    w = pen.img.size[0]
    for row, y in enumerate(range(BORDER + 6, int(horizon), 16)):
        t = y / horizon
        r = 1 + 4 * (1 - t) ** 2 if night else 0.5 + 4.5 * t**2
        for x in range(BORDER + 6 + 8 * (row % 2), w - BORDER, 16):
            pen.draw.ellipse((x - r, y - r, x + r, y + r), fill=NAVY if night else MUSTARD)


def sun(pen: Pen, c: Point) -> None:
    rays = [rotate([(66, -9), (96, 0), (66, 9)], 30 * i + 15, (0, 0)) for i in range(12)]
    pen.shape(CORAL, circle(*c, 56), *(poly(*[(c[0] + x, c[1] + y) for x, y in ray]) for ray in rays))


def moon(pen: Pen, c: Point, rng: random.Random) -> None:
    pen.shape(MUSTARD, circle(*c, 62), texture="dots")
    for dx, dy, r in [(-22, -14, 13), (18, 16, 10), (20, -26, 7)]:
        pen.shape(CREAM, circle(c[0] + dx, c[1] + dy, r))
    stars = 0
    while stars < 4:
        sx, sy = rng.uniform(-pen.origin[0] + 40, pen.origin[0] - 40), rng.uniform(-pen.origin[1] + 40, -200)
        if math.dist((sx, sy), c) < 100:
            continue
        stars += 1
        pen.shape(CREAM, poly((sx, sy - 14), (sx + 4, sy - 4), (sx + 14, sy), (sx + 4, sy + 4),
                              (sx, sy + 14), (sx - 4, sy + 4), (sx - 14, sy), (sx - 4, sy - 4)))


def land_edge(pen: Pen, rng: random.Random, depth: float) -> list[Point]:
    half, phase = pen.origin[0] + 20, rng.uniform(0, 2 * math.pi)
    edge = [(x, 10 * (math.sin(phase + x / 90) - math.sin(phase))) for x in range(int(-half), int(half) + 16, 16)]
    return edge + [(half, depth), (-half, depth)]


def wave_edge(pen: Pen, rng: random.Random, depth: float, top: float = 0) -> list[Point]:
    half, phase = pen.origin[0] + 20, rng.uniform(0, 70)
    edge = [(x, top - 14 * abs(math.sin(math.pi * (x - phase) / 70))) for x in range(int(-half), int(half) + 6, 6)]
    return edge + [(half, depth), (-half, depth)]


# name: (ink, texture, whether the edge is waves)
GROUNDS = {
    "grass": (TEAL, "hatch", False),
    "field": (MUSTARD, "hatch", False),
    "sand": (MUSTARD, "dots", False),
    "table": (CORAL, "hatch", False),
    "sea": (TEAL, "hatch", True),
}


# --- subjects: each draws itself standing on (0, 0) ----------------------------------------------------


def house(pen: Pen, rng: random.Random) -> None:
    pen.shape(CORAL, poly((55, -250), (90, -250), (90, -180), (55, -180)))
    pen.shape(MUSTARD, poly((-110, 0), (-110, -170), (110, -170), (110, 0)), texture="dots")
    pen.shape(CORAL, poly((-140, -160), (0, -275), (140, -160)), texture="hatch")
    pen.shape(TEAL, poly((-25, 0), (-25, -90), (25, -90), (25, 0)))
    for x in (-80, 45):
        pen.shape(CREAM, poly((x, -140), (x + 36, -140), (x + 36, -104), (x, -104)))
        pen.line([(x + 18, -140), (x + 18, -104)], 4)
        pen.line([(x, -122), (x + 36, -122)], 4)


def tree(pen: Pen, rng: random.Random) -> None:
    pen.shape(CORAL, poly((-22, 0), (-14, -240), (14, -240), (22, 0)), texture="hatch")
    pen.shape(TEAL, circle(-95, -280, 95), circle(95, -280, 95), circle(0, -380, 135), texture="dots")
    for _ in range(6):
        pen.shape(CORAL, circle(rng.uniform(-150, 150), rng.uniform(-430, -240), 13))


def mountain(pen: Pen, left: Point, peak: Point, right: Point, fill: int) -> None:
    pen.shape(fill, poly(left, peak, right), texture="hatch")
    (px, py), d = peak, 0.3
    lx, ly = px + (left[0] - px) * d, py + (left[1] - py) * d
    rx, ry = px + (right[0] - px) * d, py + (right[1] - py) * d
    pen.shape(CREAM, poly(peak, (rx, ry), ((px + rx) / 2, ry - 16), (px, ry + 6), ((px + lx) / 2, ly - 16), (lx, ly)))


def mountains(pen: Pen, rng: random.Random) -> None:
    mountain(pen, (-420, 0), (-210, -240), (10, 0), MUSTARD)
    mountain(pen, (-60, 0), (150, -300), (400, 0), CORAL)
    mountain(pen, (-280, 0), (-90, -175), (110, 0), TEAL)


def boat(pen: Pen, rng: random.Random) -> None:
    pen.line([(0, -30), (0, -280)], 10)
    pen.shape(CREAM, poly((12, -270), (12, -60), (150, -60)), texture="hatch")
    pen.shape(MUSTARD, poly((-12, -235), (-12, -60), (-115, -60)))
    pen.shape(CORAL, poly((0, -280), (50, -265), (0, -250)))
    pen.shape(CORAL, poly((-170, -50), (170, -50), (125, 25), (-125, 25)), texture="dots")


def cat(pen: Pen, rng: random.Random) -> None:
    pen.line([(70, -20), (150, -40), (175, -110), (150, -170)], 22)
    pen.shape(NAVY, oval(-95, -200, 95, 0), oval(-62, -300, 62, -180),
              poly((-58, -255), (-48, -330), (-8, -290)), poly((58, -255), (48, -330), (8, -290)))
    for x in (-36, 36):
        pen.shape(MUSTARD, oval(x - 14, -262, x + 14, -236))
        pen.line([(x, -258), (x, -240)], 4)
    pen.shape(CORAL, poly((-8, -226), (8, -226), (0, -216)))


def lighthouse(pen: Pen, rng: random.Random) -> None:
    for side in (-1, 1):
        pen.shape(MUSTARD, poly((side * 30, -435), (side * 250, -500), (side * 250, -380)))

    def half_width(y: float) -> float:
        return 62 - 22 * (-y / 400)

    for i, (y0, y1) in enumerate([(0, -80), (-80, -160), (-160, -240), (-240, -320), (-320, -400)]):
        pen.shape(CORAL if i % 2 else CREAM,
                  poly((-half_width(y0), y0), (half_width(y0), y0), (half_width(y1), y1), (-half_width(y1), y1)))
    pen.shape(TEAL, poly((-14, 0), (-14, -50), (14, -50), (14, 0)))
    pen.shape(MUSTARD, poly((-36, -400), (-36, -465), (36, -465), (36, -400)), texture="dots")
    pen.shape(CORAL, poly((-52, -460), (0, -515), (52, -460)))
    pen.shape(NAVY, poly((-58, -400), (58, -400), (58, -390), (-58, -390)))


def cactus(pen: Pen, rng: random.Random) -> None:
    left_arm = [(-30, -110), (-105, -110), *arc(-80, -200, 25, 180, 360), (-55, -140), (-30, -140)]
    right_arm = [(30, -150), (105, -150), *arc(80, -250, 25, 360, 180), (55, -180), (30, -180)]
    trunk = [(-38, 0), *arc(0, -265, 38, 180, 360), (38, 0)]
    pen.shape(TEAL, poly(*left_arm), poly(*right_arm), poly(*trunk), texture="hatch")
    pen.shape(CORAL, circle(0, -305, 16), circle(-80, -226, 11))
    for x, h in [(-170, 40), (150, 28)]:
        pen.shape(CORAL, pie(x - h, -h, x + h, h, 180, 360))


def bird(pen: Pen, rng: random.Random) -> None:
    pen.shape(CORAL, poly((-240, -95), (240, -150), (240, -130), (-240, -75)), texture="hatch")
    for x, y in [(-170, -110), (150, -160)]:
        pen.shape(TEAL, oval(x - 36, y - 14, x + 36, y + 14))
    pen.line([(-10, -150), (-15, -118)], 6)
    pen.line([(20, -152), (18, -122)], 6)
    pen.shape(TEAL, poly((-60, -230), (-160, -265), (-145, -205), (-60, -185)), texture="dots")
    pen.shape(CORAL, oval(-80, -270, 80, -145), circle(60, -270, 42))
    pen.shape(TEAL, oval(-55, -240, 40, -180), texture="hatch")
    pen.shape(MUSTARD, poly((96, -285), (140, -270), (96, -255)))
    pen.shape(NAVY, circle(68, -278, 7))


def teacup(pen: Pen, rng: random.Random) -> None:
    for x in (-50, 0, 50):
        pen.line([(x, -170), (x - 14, -205), (x + 10, -240), (x - 6, -280)], 6)
    pen.shape(MUSTARD, oval(-180, -45, 180, 0), texture="dots")
    pen.shape(CORAL, circle(118, -110, 46))
    pen.shape(CREAM, circle(118, -110, 24))
    pen.shape(TEAL, pie(-130, -270, 130, -25, 0, 180), texture="hatch")
    pen.shape(CORAL, oval(-128, -162, 128, -133))


def bicycle(pen: Pen, rng: random.Random) -> None:
    rear, front, crank, seat, head = (-170, -110), (170, -110), (-10, -110), (-70, -250), (120, -235)
    for hub in (rear, front):
        for i in range(8):
            a = math.radians(22.5 * i)
            pen.line([(hub[0] - 95 * math.cos(a), hub[1] - 95 * math.sin(a)),
                      (hub[0] + 95 * math.cos(a), hub[1] + 95 * math.sin(a))], 3)
        pen.draw.ellipse(pen.at([(hub[0] - 105, hub[1] - 105), (hub[0] + 105, hub[1] + 105)]), outline=NAVY, width=16)
        pen.shape(MUSTARD, circle(*hub, 14))
    pen.tubes([[rear, seat, crank, rear], [seat, head], [crank, head, front], [head, (95, -285), (60, -290)]], CORAL)
    pen.shape(MUSTARD, poly((-110, -270), (-35, -275), (-45, -255), (-100, -255)))
    pen.shape(MUSTARD, circle(*crank, 20), texture="dots")


def rocket(pen: Pen, rng: random.Random) -> None:
    for x, r in [(-80, 38), (-30, 48), (30, 46), (85, 36)]:
        pen.shape(CREAM, circle(x, -20, r), texture="dots")
    pen.shape(MUSTARD, poly((-45, -150), (45, -150), (25, -70), (0, -25), (-25, -70)))
    pen.shape(CORAL, poly((-22, -150), (22, -150), (0, -85)))
    pen.shape(CORAL, poly((-62, -260), (-125, -120), (-62, -160)), poly((62, -260), (125, -120), (62, -160)),
              texture="hatch")
    pen.shape(CREAM, poly((0, -490), (55, -400), (62, -150), (-62, -150), (-55, -400)), texture="hatch")
    pen.shape(CORAL, poly((0, -490), (40, -425), (-40, -425)))
    pen.shape(TEAL, circle(0, -330, 30))


def mushroom(pen: Pen, rng: random.Random) -> None:
    pen.shape(CREAM, poly((-40, 0), (-30, -215), (30, -215), (40, 0)), texture="hatch")
    pen.shape(CORAL, pie(-155, -300, 155, -110, 180, 360))
    for x, y, r in [(-85, -230, 18), (0, -262, 22), (78, -228, 16), (-30, -218, 10)]:
        pen.shape(CREAM, circle(x, y, r))
    pen.shape(CREAM, poly((145, 0), (148, -60), (168, -60), (171, 0)))
    pen.shape(MUSTARD, pie(112, -100, 204, -30, 180, 360), texture="dots")
    for x in (-180, -150, 200):
        pen.shape(TEAL, poly((x - 10, 0), (x, -34), (x + 6, 0)), poly((x, 0), (x + 16, -26), (x + 12, 0)))


def fish(pen: Pen, rng: random.Random) -> None:
    pen.shape(CORAL, poly((-40, -245), (0, -295), (35, -245)))
    pen.shape(CORAL, poly((70, -205), (160, -265), (140, -205), (160, -145)), texture="hatch")
    pen.shape(MUSTARD, oval(-130, -260, 90, -150), texture="dots")
    pen.shape(CREAM, circle(-85, -215, 14))
    pen.shape(NAVY, circle(-85, -215, 4))
    pen.line([(-45, -255), (-30, -205), (-45, -155)], 6)
    for x, y, r in [(-150, -40, 12), (-120, -75, 9), (130, -60, 11), (165, -95, 8), (95, -95, 7)]:
        pen.shape(TEAL, circle(x, y, r))


def windmill(pen: Pen, rng: random.Random) -> None:
    pen.shape(CREAM, poly((-62, 0), (-36, -230), (36, -230), (62, 0)), texture="hatch")
    pen.shape(CORAL, poly((-18, 0), *arc(0, -55, 18, 180, 360), (18, 0)))
    pen.shape(MUSTARD, circle(0, -150, 15))
    pen.shape(CORAL, poly((-48, -225), (0, -280), (48, -225)))
    hub, start = (0, -245), rng.uniform(0, 90)
    for i in range(4):
        angle = start + 90 * i
        pen.line(rotate([(0, 0), (200, 0)], angle, hub), 8)
        pen.shape(TEAL if i % 2 else MUSTARD, poly(*rotate([(35, 6), (195, 6), (195, 44), (35, 34)], angle, hub)),
                  texture="hatch")
    pen.shape(CORAL, circle(*hub, 15))


def tent(pen: Pen, rng: random.Random) -> None:
    pen.line([(-50, -225), (-50, -270)], 6)
    pen.shape(MUSTARD, poly((-50, -270), (-2, -256), (-50, -242)))
    pen.shape(CORAL, poly((-230, 0), (-50, -230), (130, 0)), texture="hatch")
    pen.shape(NAVY, poly((-95, 0), (-50, -125), (-5, 0)))
    pen.tubes([[(140, -5), (215, -30)], [(140, -30), (215, -5)]], CORAL)
    pen.shape(MUSTARD, poly((150, -25), (160, -80), (175, -60), (180, -110), (200, -60), (208, -25)))
    pen.shape(CORAL, poly((165, -25), (178, -70), (192, -25)))


def balloon(pen: Pen, rng: random.Random) -> None:
    for side in (-1, 1):
        pen.line([(side * 48, -250), (side * 34, -190)], 4)
    pen.shape(CORAL, poly((-80, -290), (80, -290), (48, -245), (-48, -245)))
    pen.shape(CORAL, oval(-145, -580, 145, -270))
    pen.shape(MUSTARD, oval(-90, -580, 90, -270), texture="hatch")
    pen.shape(TEAL, oval(-32, -580, 32, -270))
    pen.shape(MUSTARD, poly((-38, -190), (38, -190), (32, -135), (-32, -135)), texture="dots")
    for cx, cy in [(-175, -200), (170, -120)]:
        pen.shape(CREAM, oval(cx - 50, cy - 20, cx + 50, cy + 20), oval(cx - 30, cy - 45, cx + 20, cy + 5))


def umbrella(pen: Pen, rng: random.Random) -> None:
    for _ in range(9):
        x, y = rng.uniform(-220, 220), rng.uniform(-300, -20)
        if abs(x) > 180 or y > -90:
            pen.shape(TEAL, poly((x, y - 20), *arc(x, y, 8, 0, 180, 6)))
    pen.line([(0, -300), (0, -50)], 10)
    pen.draw.arc(pen.at([(-40, -80), (0, -20)]), 0, 180, fill=NAVY, width=10)
    pen.shape(CORAL, pie(-175, -340, 175, -140, 180, 360), texture="hatch")
    for i in range(5):
        x = -140 + 70 * i
        pen.shape(CREAM, pie(x - 35, -275, x + 35, -205, 180, 360))
    pen.shape(MUSTARD, circle(0, -344, 10))


def whale(pen: Pen, rng: random.Random) -> None:
    for dx, top in [(-22, -330), (0, -350), (22, -330)]:
        pen.line([(-150, -140), (-150 + dx * 0.6, -250), (-150 + dx, top)], 8, TEAL)
    pen.shape(TEAL, poly((150, -40), (250, -150), (300, -190), (285, -120), (330, -110), (270, -80), (190, -20)),
              texture="hatch")
    pen.shape(NAVY, pie(-280, -160, 220, 160, 180, 360))
    pen.shape(CREAM, pie(-280, -60, 100, 60, 180, 360), texture="hatch")
    pen.shape(CREAM, circle(-190, -85, 12))
    pen.shape(NAVY, circle(-188, -85, 5))


def pines(pen: Pen, rng: random.Random) -> None:
    heights = [rng.randint(170, 300) for _ in range(5)]
    for i, h in sorted(enumerate(heights), key=lambda item: -item[1]):
        x = -200 + 100 * i + rng.uniform(-15, 15)
        pen.shape(CORAL, poly((x - 10, 0), (x - 10, -40), (x + 10, -40), (x + 10, 0)))
        step = (h - 35) / 3.6
        tiers = [poly((x - 60 + 14 * t, -35 - t * step), (x, -35 - (t + 1.6) * step), (x + 60 - 14 * t, -35 - t * step))
                 for t in range(3)]
        pen.shape(TEAL if i % 2 else NAVY, *tiers, texture="dots" if i % 2 else None)


def snail(pen: Pen, rng: random.Random) -> None:
    pen.shape(MUSTARD, poly((-170, 0), (-150, -35), (130, -40), (150, -110), (175, -105), (175, -40), (190, 0)),
              texture="dots")
    for x in (150, 172):
        pen.line([(x - 5, -100), (x + (x - 160) * 1.2, -160)], 5)
        pen.shape(NAVY, circle(x + (x - 160) * 1.2, -162, 8))
    pen.shape(CORAL, circle(-20, -130, 115), texture="hatch")
    spiral = [(-20 + 8 * t * math.cos(t), -130 + 8 * t * math.sin(t)) for t in (i / 4 for i in range(4, 52))]
    pen.line(spiral, 8)


@dataclass(frozen=True)
class Subject:
    name: str
    size: tuple[int, int]
    ground: str
    caption: str
    setting: str
    paint: Callable[[Pen, random.Random], None]


SUBJECTS = [
    Subject("house", SQUARE, "grass", "a small house with a pointed roof and a chimney", "countryside", house),
    Subject("tree", PORTRAIT, "field", "a round leafy tree with red fruit on a gentle hill", "countryside", tree),
    Subject("mountains", LANDSCAPE, "grass", "three jagged mountain peaks with snowy caps", "alpine valley",
            mountains),
    Subject("boat", LANDSCAPE, "sea", "a little sailboat bobbing on scalloped waves", "seaside", boat),
    Subject("cat", SQUARE, "field", "a sitting cat silhouette with glowing yellow eyes", "countryside", cat),
    Subject("lighthouse", PORTRAIT, "grass", "a striped lighthouse casting yellow beams", "coast", lighthouse),
    Subject("cactus", SQUARE, "sand", "a tall saguaro cactus with a pink flower", "desert", cactus),
    Subject("bird", SQUARE, "grass", "a plump little bird perched on a branch", "countryside", bird),
    Subject("teacup", SQUARE, "table", "a steaming teacup on a saucer", "still life", teacup),
    Subject("bicycle", LANDSCAPE, "field", "a simple bicycle with big spoked wheels", "country road", bicycle),
    Subject("rocket", PORTRAIT, "grass", "a rocket blasting off on a plume of flame and smoke", "launch pad",
            rocket),
    Subject("mushroom", SQUARE, "grass", "a red-capped toadstool with white spots beside a small one", "woodland",
            mushroom),
    Subject("fish", SQUARE, "sea", "a fish leaping out of the waves", "seaside", fish),
    Subject("windmill", SQUARE, "field", "a windmill with four sails turning in the breeze", "countryside",
            windmill),
    Subject("tent", SQUARE, "grass", "a triangular camping tent next to a small campfire", "campsite", tent),
    Subject("balloon", PORTRAIT, "grass", "a striped hot air balloon drifting between clouds", "countryside",
            balloon),
    Subject("umbrella", SQUARE, "grass", "an open umbrella with a curved handle in falling rain", "rainy day",
            umbrella),
    Subject("whale", LANDSCAPE, "sea", "a big whale surfacing and spouting water", "open sea", whale),
    Subject("pines", SQUARE, "field", "a row of pointed pine trees of different heights", "forest", pines),
    Subject("snail", SQUARE, "grass", "a slow snail with a spiral shell", "garden", snail),
]


def paint(subject: Subject, seed: int) -> tuple[Image.Image, str]:
    """One picture and its caption; everything random comes from `seed`."""
    rng = random.Random(seed)
    w, h = subject.size
    img = Image.new("P", (w, h), CREAM)
    img.putpalette([c for rgb in PALETTE for c in rgb])
    horizon = h - (170 if h > w else 150)
    pen = Pen(img, (w / 2, horizon))
    night = rng.random() < 0.35
    halftone_sky(pen, horizon, night)
    disc = (rng.choice((-1, 1)) * (w / 2 - 110), -(horizon - 115))
    if night:
        moon(pen, disc, rng)
    else:
        sun(pen, disc)
    ink, texture, waves = GROUNDS[subject.ground]
    depth = h - horizon + 20
    pen.shape(ink, poly(*(wave_edge if waves else land_edge)(pen, rng, depth)), texture=texture)
    subject.paint(pen, rng)
    if waves:
        pen.shape(ink, poly(*wave_edge(pen, rng, depth, top=60)), texture="dots")
    pen.draw.rectangle((0, 0, w - 1, h - 1), outline=NAVY, width=BORDER)
    sky = "under a full moon and stars, night" if night else "under a big sun, daytime"
    return img, f"zkstyle, {subject.caption} {sky}, {subject.setting}\n"


def main(out_dir: str | Path = REPO / "sample_images") -> list[Path]:
    """Write NN_<subject>.png and its .txt caption for every subject; return the image paths."""
    out_dir = Path(out_dir)
    written = []
    for number, subject in enumerate(SUBJECTS, start=1):
        img, caption = paint(subject, seed=number)
        stem = out_dir / f"{number:02d}_{subject.name}"
        with atomic_path(stem.with_suffix(".png")) as tmp:
            # optimize=True fixes the zlib level; no pnginfo or dpi, so no chunk that could differ per run.
            img.save(tmp, format="PNG", optimize=True)
        write_text(stem.with_suffix(".txt"), caption)
        written.append(stem.with_suffix(".png"))
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=REPO / "sample_images", type=Path)
    main(parser.parse_args().out_dir)
