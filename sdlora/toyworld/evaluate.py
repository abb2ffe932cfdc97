"""Measure a toy-world picture without the model that drew it: what objects it shows, where, and how hatched.

Generated pictures are grainy, blurred and a little off in colour, so every measurement averages before it
decides, and each is checked on rendered ground truth, clean and degraded (`evaluator_accuracy`).

Objects: colours are saturated and backgrounds neutral, so an object is a connected patch of chroma (max - min
of R, G, B) in the picture smoothed over 3x3 pixels. Smoothing the colour channels *before* taking chroma
matters: chroma of a noisy grey pixel is the spread of three noise draws and reads as colour, while the mean of
nine pixels is grey again. A patch's colour is the chroma-weighted vote of its pixels' nearest palette hue
(hue is what survives hatching, shading and blending with a grey background); its cell is its centroid by thirds
of the picture; its shape comes from a small CNN on a crop around it (`ShapeNet`, trained by
scripts/train_shape_classifier.py on renders of every look under `degrade`).

Style: the demo's style hatches objects along 45 degrees and the background along 135. `style_score` measures
how much more texture energy at the hatch period lies along the style's direction than across it, inside the
objects and (with the sign flipped) on the background. Filters tuned to the period (Gabor filters) pass little
of broadband grain, blur and edges, and what they pass is the same along both diagonals, because noise has no
orientation and every toy shape is mirror-symmetric: none of it moves the score. It is specific: hatching 15
degrees off the style's angle still reads as the style, 30 degrees off reads near zero and perpendicular
hatching below zero; the style's outlines are not measured, because on the black background they do not show.
A statistic rather than a classifier, so that a reading can be explained from the picture and no look the
classifier never saw can fool it.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from safetensors.torch import load_file
from torch import nn

from sdlora.toyworld.render import HATCHED, PLAIN, random_look, render
from sdlora.toyworld.scene import COLOURS, SHAPES, Scene, cell_centre, sample_scene

WEIGHTS = Path(__file__).with_name("shape_classifier.safetensors")

# Chroma after 3x3 smoothing and cast removal. Objects start at 45 (green, the palette's least saturated colour,
# reads about 100, and about 80 hatched), and a patch grows into pixels above 25, which keeps the thin coloured
# line of a small hatched ring; grain leaves grey backgrounds mostly below 25.
SEED_CHROMA = 45.0
GROW_CHROMA = 25.0
MIN_AREA = 0.002  # share of the picture; a small hatched star keeps about 0.006 of colour, stray specks less
CROP = 32  # side of the shape classifier's input


@dataclass(frozen=True)
class FoundObject:
    colour: str
    cell: tuple[int, int]  # (column, row), as in scene.POSITIONS
    shape: str
    centroid: tuple[float, float]  # shares of the picture's width and height
    area: float  # share of the picture


@dataclass(frozen=True)
class Patch:
    """A coloured patch before its shape is named: what the classifier needs and what the style score masks."""

    colour: str
    cell: tuple[int, int]
    centroid: tuple[float, float]
    area: float
    mask: np.ndarray  # bool, picture-sized
    crop: np.ndarray  # (2, CROP, CROP) float32: chroma and lightness around the patch
    scale: float  # the patch's side as a share of the picture's, which the crop's resizing hides


def find_objects(image: Image.Image, max_objects: int = 2) -> list[FoundObject]:
    """The largest `max_objects` coloured objects in `image`, with colour, cell and shape."""
    patches = find_patches(image, max_objects)
    shapes = classify_shapes(patches)
    return [FoundObject(p.colour, p.cell, s, p.centroid, p.area) for p, s in zip(patches, shapes)]


def find_patches(image: Image.Image, max_objects: int = 2) -> list[Patch]:
    """The largest `max_objects` coloured patches in `image`, their shapes not yet named."""
    rgb = _smoothed(image)
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    colour_index = _nearest_colour(_hue(rgb))
    side = rgb.shape[0]
    seeds = chroma > SEED_CHROMA
    # Growing at most two pixels from a seed keeps a blotch of coloured grain from bridging two objects.
    grown = (chroma > GROW_CHROMA) & _dilate(seeds, 2)
    # Bridging one-pixel gaps keeps a dashed thin ring (hatch lines cross it) in one piece.
    labels = _label(_dilate(grown, 1))
    seeded = np.unique(labels[seeds])
    lightness = rgb.mean(axis=2)
    patches = []
    for label in seeded[seeded >= 0]:
        pixels = (labels == label) & grown
        for colour, part in _split_by_colour(pixels, colour_index, chroma, MIN_AREA * side * side):
            patches.append(_patch(part, colour, chroma, lightness))
    patches.sort(key=lambda p: -p.area)
    return patches[:max_objects]


def _split_by_colour(pixels: np.ndarray, colour_index: np.ndarray, chroma: np.ndarray,
                     min_pixels: float) -> list[tuple[str, np.ndarray]]:
    """(colour, mask) of the one or two objects in a patch. Two objects of different colours can touch (large
    shapes in diagonal cells do, and a small one beside a large one after a little shift); a second colour
    splits off only where its pixels lie apart from the first's, so grain that scatters an object's hues over
    two neighbouring names, or shading that drifts across it, does not split it."""
    if pixels.sum() < min_pixels:
        return []
    votes = np.bincount(colour_index[pixels], weights=chroma[pixels], minlength=len(COLOURS))
    first, second = np.argsort(-votes)[:2]
    parts = [pixels & (colour_index == c) for c in (first, second)]
    if votes[second] > 0.1 * votes.sum() and parts[1].sum() >= min_pixels:
        (x1, y1), (x2, y2) = (_centroid(p) for p in parts)
        apart = math.hypot(x1 - x2, y1 - y2) > 0.5 * math.sqrt(pixels.sum())
        if apart:
            # Pixels of neither colour (blended edges) go to the part whose centre is nearer.
            ys, xs = np.mgrid[0:pixels.shape[0], 0:pixels.shape[1]]
            near_first = np.hypot(xs - x1, ys - y1) <= np.hypot(xs - x2, ys - y2)
            return [(_COLOUR_NAMES[first], pixels & near_first), (_COLOUR_NAMES[second], pixels & ~near_first)]
    return [(_COLOUR_NAMES[first], pixels)]


def _patch(pixels: np.ndarray, colour: str, chroma: np.ndarray, lightness: np.ndarray) -> Patch:
    side = pixels.shape[0]
    x, y = _centroid(pixels)
    centroid = ((x + 0.5) / side, (y + 0.5) / side)
    cell = (min(int(centroid[0] * 3), 2), min(int(centroid[1] * 3), 2))
    ys, xs = np.nonzero(pixels)
    extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
    # Room for an outline drawn round the colour (about 3 px at 128) and a margin of background.
    half = int(0.6 * extent + 0.06 * side) + 1
    cx, cy = (xs.max() + xs.min()) // 2, (ys.max() + ys.min()) // 2
    box = (cy - half, cy + half, cx - half, cx + half)
    # The patch's own chroma, scaled so its typical pixel reads 1 whatever its colour; a touching object's colour
    # is hidden, its outline is not (lightness).
    own = np.where(_dilate(pixels, 2), chroma, 0.0) / max(float(np.median(chroma[pixels])), 1.0)
    light = _cut(lightness, box)
    light = (light - np.median(np.concatenate([light[0], light[-1], light[:, 0], light[:, -1]]))) / 100.0
    crop = np.stack([np.clip(_cut(own, box), 0, 1.5), np.clip(light, -1.5, 1.5)]).astype(np.float32)
    crop = nn.functional.interpolate(torch.from_numpy(crop)[None], size=(CROP, CROP), mode="bilinear",
                                     antialias=True, align_corners=False)[0].numpy()
    return Patch(colour, cell, centroid, float(pixels.sum()) / side**2, pixels, crop, 2 * half / side)


class ShapeNet(nn.Module):
    """Three conv-pool stages over the 2x32x32 crop, then one linear layer that also sees the patch's scale
    (a small hatched star keeps only a small blob of colour, which a small circle would not)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * (CROP // 8) ** 2 + 1, len(SHAPES))

    def forward(self, crops: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.features(crops).flatten(1), 4.0 * scales[:, None]], dim=1))


def classifier_inputs(patches: list[Patch]) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's inputs for `patches`."""
    crops = torch.from_numpy(np.stack([p.crop for p in patches]))
    return crops, torch.tensor([p.scale for p in patches], dtype=torch.float32)


@lru_cache(maxsize=1)
def load_shape_classifier(path: Path = WEIGHTS) -> ShapeNet:
    net = ShapeNet()
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return net.eval()


def classify_shapes(patches: list[Patch]) -> list[str]:
    if not patches:
        return []
    with torch.no_grad():
        logits = load_shape_classifier()(*classifier_inputs(patches))
    return [SHAPES[i] for i in logits.argmax(dim=1).tolist()]


# The style's hatch, as a share of the picture's side (render.HATCHED.hatch_period) and its direction.
HATCH_PERIOD = HATCHED.hatch_period
HATCH_ANGLE = HATCHED.hatch_angle
# Energies are in squared grey levels of a sine grating's amplitude: texture fainter than about 2 grey levels
# counts as flat, so a nearly flat picture cannot read as hatched from a trace of diagonal structure.
FLAT_ENERGY = 4.0
# `hatch_excess` measured on 60 renders per row: plain at most 0.085 clean, under degrade (strength 1 or 1.3) or
# grain of sigma 20; hatched at least 0.45 clean, 0.39 under strength 1, 0.37 under 1.3 and 0.43 with grain. The
# logistic centres between those: it reads plain's worst as 0.03 and hatched's as 0.99.
STYLE_MIDPOINT = 0.2
STYLE_WIDTH = 0.03


def style_score(image: Image.Image) -> float:
    """How much `image` looks hatched in the demo's style, in [0, 1]: about 0 plain, about 1 hatched."""
    # More patches than a scene has objects: a stray blob is masked like an object rather than read as background.
    return _style(image, find_patches(image, max_objects=4))


def _style(image: Image.Image, patches: list[Patch]) -> float:
    return float(1.0 / (1.0 + math.exp(-(hatch_excess(image, patches) - STYLE_MIDPOINT) / STYLE_WIDTH)))


def hatch_excess(image: Image.Image, patches: list[Patch]) -> float:
    """The style score before squashing, in [-1, 1]: grating energy along the style's hatch less that across
    it (objects' hatch in `patches`, the background's at right angles to it), over the energy at four angles
    45 degrees apart. Counting the two angles between as well is what makes a hatch 20 or 30 degrees off the
    style's read clearly lower: a filter this narrow in angle would otherwise see it only along, never across."""
    rgb = np.asarray(image.convert("RGB"), np.float32)
    lightness = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    side = lightness.shape[0]
    along, between, across, between_too = (_grating_energy(lightness, HATCH_ANGLE + turn, HATCH_PERIOD * side)
                                           for turn in (0.0, 45.0, 90.0, 135.0))
    inside = np.zeros(lightness.shape, bool)
    for p in patches:
        inside |= p.mask
    # A band round the objects is neither: the filter there straddles an edge and the outline.
    outside = ~_dilate(inside, max(1, round(0.04 * side)))
    counted = inside | outside
    excess = (along - across)[inside].sum() - (along - across)[outside].sum()
    total = (along + between + across + between_too)[counted].sum() + FLAT_ENERGY * counted.sum()
    return float(excess / total)


def _grating_energy(lightness: np.ndarray, angle: float, period: float) -> np.ndarray:
    """Per pixel, the squared amplitude of a grating of `period` pixels whose lines run along `angle` (render's
    convention), by a zero-mean complex Gabor filter about one period wide, normalised so that a sine grating
    of amplitude 1 reads 1."""
    sigma = 0.5 * period
    r = int(math.ceil(3 * sigma))
    y, x = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float64)
    theta = math.radians(angle)
    across = -x * math.sin(theta) + y * math.cos(theta)
    envelope = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    kernel = envelope * np.exp(2j * math.pi * across / period)
    kernel -= envelope * (kernel.sum() / envelope.sum())
    kernel /= envelope.sum() / 2
    h, w = lightness.shape
    padded = np.pad(lightness, r, mode="reflect")
    response = np.fft.ifft2(np.fft.fft2(padded) * np.fft.fft2(kernel, s=padded.shape))
    return np.abs(response[2 * r:2 * r + h, 2 * r:2 * r + w]) ** 2


def score_image(image: Image.Image, scene: Scene) -> dict:
    """Per object of `scene`, whether `image` shows it in the right colour, cell and shape, and the style score.

    Each scene object is matched to the found object of its colour; failing that, to the nearest unmatched one
    (then colour is wrong, but position and shape are still judged); with nothing left, all three are wrong."""
    patches = find_patches(image, max_objects=max(2, len(scene.objects) + 1))
    shapes = classify_shapes(patches)
    found = [FoundObject(p.colour, p.cell, s, p.centroid, p.area) for p, s in zip(patches, shapes)]
    unmatched = list(found)
    results: list[dict] = []
    for obj in scene.objects:
        match = next((f for f in unmatched if f.colour == obj.colour), None)
        if match is None and unmatched:
            match = min(unmatched, key=lambda f: math.dist(f.centroid, cell_centre(obj.cell)))
        if match is not None:
            unmatched.remove(match)
        results.append({
            "colour": match is not None and match.colour == obj.colour,
            "position": match is not None and match.cell == obj.cell,
            "shape": match is not None and match.shape == obj.shape,
            "found": match,
        })
    return {
        "objects": results,
        **{k: sum(r[k] for r in results) / len(results) for k in ("colour", "position", "shape")},
        "style": _style(image, patches),
    }


def degrade(image: Image.Image, rng: random.Random, strength: float = 1.0) -> Image.Image:
    """`image` spoilt as a small diffusion model spoils its pictures, at random, scaled by `strength` (1 is
    about the worst the evaluator is meant to read): turned, scaled and shifted a little, blurred and resampled
    as by a VAE, colours cast, grain per pixel and in blotches, a few stray specks, JPEG blocks."""
    s = strength
    side = image.size[0]
    image = image.convert("RGB")
    # Rotation, scale and shift about the centre; the inverse map is what PIL wants.
    turn, zoom = math.radians(rng.uniform(-4, 4) * s), 1 + rng.uniform(-0.06, 0.06) * s
    dx, dy = (rng.uniform(-0.02, 0.02) * s * side for _ in range(2))
    c, t = math.cos(turn) / zoom, math.sin(turn) / zoom
    m = side / 2
    inverse = (c, -t, m - c * (m + dx) + t * (m + dy), t, c, m - t * (m + dx) - c * (m + dy))
    edge = np.asarray(image)[[0, -1]].reshape(-1, 3).mean(axis=0)
    image = image.transform(image.size, Image.Transform.AFFINE, inverse, Image.Resampling.BILINEAR,
                            fillcolor=tuple(int(v) for v in edge))
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8) * s))
    small = max(8, round(side / (1 + rng.uniform(0, 0.6) * s)))
    image = image.resize((small, small), Image.Resampling.BILINEAR).resize((side, side), Image.Resampling.BICUBIC)
    pixels: np.ndarray = np.asarray(image, np.float32)
    pixels = pixels * np.array([1 + rng.uniform(-0.06, 0.06) * s for _ in range(3)], np.float32)
    pixels = pixels + np.array([rng.uniform(-6, 6) * s for _ in range(3)], np.float32)
    noise = np.random.default_rng(rng.randrange(2**32))
    pixels = pixels + noise.normal(0, rng.uniform(2, 16) * s, pixels.shape)
    blotches = noise.normal(0, rng.uniform(0, 8) * s, (side // 8, side // 8, 3)).astype(np.float32)
    pixels = pixels + np.stack([np.asarray(Image.fromarray(b).resize((side, side), Image.Resampling.BILINEAR))
                                for b in blotches.transpose(2, 0, 1)], axis=2)
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(4) if rng.random() < 0.5 * s else 0):
        x, y, r = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(0.008, 0.016) * side
        draw.ellipse((x - r, y - r, x + r, y + r), fill=rng.choice(list(COLOURS.values())))
    buffer = io.BytesIO()
    # 4:4:4, because a VAE does not halve colour resolution as JPEG's default does.
    image.save(buffer, "JPEG", quality=int(rng.uniform(95 - 50 * s, 95)), subsampling=0)
    return Image.open(buffer).convert("RGB")


LOOKS = {"plain": lambda rng: PLAIN, "hatched": lambda rng: HATCHED, "random": random_look}


def evaluator_accuracy(n: int = 200, seed: int = 2024, degrade_strength: float = 0.0,
                       looks: tuple[str, ...] = ("plain", "hatched", "random")) -> dict[str, dict[str, float]]:
    """The evaluator measured on `n` rendered scenes per look: the share of objects whose colour, position and
    shape it reads right, and the style score's mean, 5th and 95th percentile, least and greatest."""
    results = {}
    for look_name in looks:
        rng = random.Random(f"{seed}-{look_name}")
        counts = {"colour": 0, "position": 0, "shape": 0}
        objects, styles = 0, []
        for _ in range(n):
            scene = sample_scene(rng)
            image = render(scene, look=LOOKS[look_name](rng))
            if degrade_strength:
                image = degrade(image, rng, degrade_strength)
            score = score_image(image, scene)
            for r in score["objects"]:
                objects += 1
                for k in counts:
                    counts[k] += r[k]
            styles.append(score["style"])
        results[look_name] = {
            **{k: v / objects for k, v in counts.items()},
            "style_mean": float(np.mean(styles)),
            "style_p5": float(np.percentile(styles, 5)),
            "style_p95": float(np.percentile(styles, 95)),
            "style_min": float(np.min(styles)),
            "style_max": float(np.max(styles)),
        }
    return results


def accuracy_table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """A markdown table of `evaluator_accuracy` results keyed by condition (e.g. "clean", "degraded")."""
    lines = ["| look | condition | colour | position | shape | style mean | style p5 | style p95 |",
             "|---|---|---|---|---|---|---|---|"]
    for condition, looks in rows.items():
        for look, r in looks.items():
            lines.append(f"| {look} | {condition} | {r['colour']:.1%} | {r['position']:.1%} | {r['shape']:.1%} | "
                         f"{r['style_mean']:.3f} | {r['style_p5']:.3f} | {r['style_p95']:.3f} |")
    return "\n".join(lines)


_COLOUR_NAMES = list(COLOURS)


def _smoothed(image: Image.Image) -> np.ndarray:
    """RGB averaged over 3x3 pixels, less the picture's colour cast (the median pixel's offset from grey, which
    is the background's, as the background covers most of any toy-world picture)."""
    rgb = _window(np.asarray(image.convert("RGB"), np.float32), 1, np.mean)
    return rgb - np.median(rgb - rgb.mean(axis=2, keepdims=True), axis=(0, 1))


def _hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high = rgb.max(axis=-1)
    spread = np.maximum(high - rgb.min(axis=-1), 1e-6)
    sector = np.where(high == r, ((g - b) / spread) % 6,
                      np.where(high == g, (b - r) / spread + 2, (r - g) / spread + 4))
    return 60.0 * sector


_PALETTE_HUES = _hue(np.array(list(COLOURS.values()), np.float32))


def _nearest_colour(hue: np.ndarray) -> np.ndarray:
    return np.abs((hue[..., None] - _PALETTE_HUES + 180.0) % 360.0 - 180.0).argmin(axis=-1)


def _window(a: np.ndarray, r: int, reduce) -> np.ndarray:
    """`reduce` (np.mean, np.min, np.max) over the (2r+1)-pixel square round each pixel, the edges repeated; one
    axis at a time, which gives the same for these three and costs 2(2r+1) slices instead of (2r+1)^2."""
    h, w = a.shape[:2]
    rest = [(0, 0)] * (a.ndim - 2)
    p = np.pad(a, [(r, r), (0, 0)] + rest, mode="edge")
    a = reduce(np.stack([p[d:d + h] for d in range(2 * r + 1)]), axis=0)
    p = np.pad(a, [(0, 0), (r, r)] + rest, mode="edge")
    return reduce(np.stack([p[:, d:d + w] for d in range(2 * r + 1)]), axis=0)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    return _window(mask, r, np.max)


def _label(mask: np.ndarray) -> np.ndarray:
    """Connected components (8-neighbour) of `mask`: each pixel's component id, -1 off the mask. Every pixel
    takes the smallest pixel index among its neighbours' labels, then its label's label (pointer jumping), until
    nothing changes: a few dozen passes over a 128 px picture."""
    h, w = mask.shape
    off = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), off)
    while True:
        least = np.where(mask, _window(labels, 1, np.min), off)
        least = np.where(mask, np.append(least.ravel(), off)[least], off)
        if np.array_equal(least, labels):
            return np.where(mask, labels, -1)
        labels = least


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def _cut(a: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """a[top:bottom, left:right], repeating the edge where the box leaves the picture."""
    top, bottom, left, right = box
    pad = max(0, -top, -left, bottom - a.shape[0], right - a.shape[1])
    a = np.pad(a, pad, mode="edge")
    return a[top + pad:bottom + pad, left + pad:right + pad]
