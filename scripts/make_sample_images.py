"""Draw the demo's style set into sample_images/: toy-world scenes in the hatched style, captioned with "zkstyle".

The demo and the tests train a LoRA on these pictures, and the quality benchmark measures whether that LoRA
draws the style on held-out prompts. The scenes come from sdlora.toyworld.style_set, the drawing from
sdlora.toyworld.render, so every pixel comes from this repository. Running the script twice gives byte-identical
files (for one Pillow build: its rasteriser and zlib shape the bytes).

Usage: python scripts/make_sample_images.py [OUT_DIR]    (default: sample_images/ at the repo root)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Lets the script run from a checkout that was never pip-installed.
sys.path.insert(0, str(REPO))
from sdlora.atomic import atomic_path, write_text  # noqa: E402
from sdlora.toyworld.render import HATCHED, render  # noqa: E402
from sdlora.toyworld.style_set import SAMPLE_SIZE, training_scenes, with_trigger  # noqa: E402


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(training_scenes(), start=1):
        stem = f"{i:02d}_{scene.objects[0].shape}"
        with atomic_path(out / f"{stem}.png") as tmp:
            render(scene, SAMPLE_SIZE, HATCHED).save(tmp, format="PNG", optimize=True)
        write_text(out / f"{stem}.txt", with_trigger(scene.caption()) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=REPO / "sample_images")
    main(parser.parse_args().out)
