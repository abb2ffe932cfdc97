"""Measure the toy-world evaluator on rendered ground truth and print markdown tables.

The first table is `evaluator_accuracy` clean and under `degrade`: how often it reads an object's colour, cell
and shape right, and what style score it gives, per look. The second splits the random looks by how their
hatch differs from the demo's style, to show the score is specific to the style and not to any hatching.

Usage: python scripts/evaluator_accuracy.py [--n N] [--seed S] [--strength X]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Lets the script run from a checkout that was never pip-installed.
sys.path.insert(0, str(REPO))
from sdlora.toyworld.evaluate import accuracy_table, degrade, evaluator_accuracy, style_score  # noqa: E402
from sdlora.toyworld.render import HATCHED, Look, random_look, render  # noqa: E402
from sdlora.toyworld.scene import sample_scene  # noqa: E402


def look_kind(look: Look) -> str:
    if not (look.hatch_period or look.background_hatch):
        return "no hatch, outlined" if look.outline else "no hatch, no outline"
    # Hatch lines have no direction, so angles are compared modulo 180 degrees.
    off = abs((look.hatch_angle - HATCHED.hatch_angle + 90.0) % 180.0 - 90.0)
    band = "< 15" if off < 15 else "15-45" if off < 45 else ">= 45"
    return f"hatched {band} deg off the style"


def random_look_styles(n: int, seed: int, strength: float) -> dict[str, list[float]]:
    rng = random.Random(f"{seed}-random-looks")
    styles: dict[str, list[float]] = {}
    for _ in range(n):
        scene, look = sample_scene(rng), random_look(rng)
        image = render(scene, look=look)
        if strength:
            image = degrade(image, rng, strength)
        styles.setdefault(look_kind(look), []).append(style_score(image))
    return styles


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="scenes per look and condition")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--strength", type=float, default=1.0, help="of the degraded condition")
    args = parser.parse_args(argv)
    conditions = {"clean": 0.0, f"degraded {args.strength:g}": args.strength}
    print(accuracy_table({name: evaluator_accuracy(args.n, args.seed, strength)
                          for name, strength in conditions.items()}))
    print("\n| random look | condition | n | style mean | style p5 | style p95 |\n|---|---|---|---|---|---|")
    for name, strength in conditions.items():
        for kind, styles in sorted(random_look_styles(args.n, args.seed, strength).items()):
            p5, p95 = np.percentile(styles, [5, 95])
            print(f"| {kind} | {name} | {len(styles)} | {np.mean(styles):.3f} | {p5:.3f} | {p95:.3f} |")


if __name__ == "__main__":
    main()
