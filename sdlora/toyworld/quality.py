"""What a LoRA does to pictures, measured on the toy-world model: style learned, content kept, bleed.

The demo's LoRA is trained on `sample_images/` (toy-world scenes in the hatched style) and measured on held-out
prompts whose shapes, colours and positions it never saw. Every image is rendered by `generate()` (what `sdlora
generate` gives for the same prompt and seed) and read by the toy world's evaluator, which is not the model:

- style: the evaluator's style score (0 = plain toy world, 1 = the hatched style), on the prompts with the
  trigger word, at each LoRA weight;
- content: the share of objects drawn in the prompt's colour / cell / shape;
- bleed: the style score on the same prompts WITHOUT the trigger word, with the LoRA at weight 1 (a LoRA that
  only answers its trigger keeps this near the base model's);
- weight 0 equals the base model bit for bit (the adapters are switched off, not scaled to zero).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sdlora.toyworld.scene import Scene
from sdlora.toyworld.style_set import evaluation_scenes, with_trigger

QUALITY_WEIGHTS = (0.0, 0.5, 1.0)
QUALITY_NAME = "quality.json"  # in a run folder: what `sdlora demo` measured
CONTENT = ("colour", "position", "shape")


@dataclass
class RenderSettings:
    """How the measured images are rendered: the toy model's own size, a fixed seed per image."""

    steps: int = 20
    cfg: float = 5.0
    sampler: str = "euler"
    size: int = 128
    seeds: tuple[int, ...] = (1,)

    def params(self, prompt: str, seed: int):
        from sdlora.generate.pipeline import GenerationParams

        return GenerationParams(prompt=prompt, steps=self.steps, cfg=self.cfg, width=self.size, height=self.size,
                                seed=seed, sampler=self.sampler)


@dataclass
class Quality:
    """One LoRA's scores; `by_weight` maps a weight (as text, for JSON) to its mean scores on trigger prompts."""

    by_weight: dict[str, dict[str, float]]
    base: dict[str, float]  # the base model on the prompts without the trigger word
    bleed: float  # style score at weight 1 on the prompts without the trigger word
    weight0_equals_base: bool
    images: int
    seconds: float
    extra: dict = field(default_factory=dict)

    def at(self, weight: float) -> dict[str, float]:
        return self.by_weight[f"{weight:g}"]

    def to_json(self) -> dict:
        return asdict(self)


def measure(pipe, loras, lora: Path, scenes: list[Scene] | None = None, weights=QUALITY_WEIGHTS,
            settings: RenderSettings | None = None, progress=None) -> Quality:
    """Render the held-out prompts with and without `lora` and score every image.

    `loras` is the pipeline's `LoraCache`; `progress(done, total)` is called after each image.
    """
    from sdlora.generate.pipeline import LoraSpec, generate

    scenes = scenes or evaluation_scenes()
    settings = settings or RenderSettings()
    started = time.perf_counter()
    jobs = [(s, seed) for s in scenes for seed in settings.seeds]
    total, done = len(jobs) * (len(weights) + 2), 0

    def render(scene: Scene, seed: int, trigger: bool):
        nonlocal done
        image = generate(pipe, settings.params(with_trigger(scene.caption()) if trigger else scene.caption(), seed))
        done += 1
        if progress:
            progress(done, total)
        return image

    # The base model first, before any adapter exists in the pipeline: weight 0 must reproduce these bits.
    loras.activate([])
    base_trigger = [render(s, seed, True) for s, seed in jobs]
    base_plain = [render(s, seed, False) for s, seed in jobs]
    by_weight, equal = {}, True
    for weight in weights:
        loras.activate([LoraSpec(lora, weight)])
        images = [render(s, seed, True) for s, seed in jobs]
        if weight == 0:
            equal = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, base_trigger))
        by_weight[f"{weight:g}"] = _mean_scores(images, jobs)
    loras.activate([LoraSpec(lora, 1.0)])
    bleed = _mean_scores([render(s, seed, False) for s, seed in jobs], jobs)["style"]
    loras.activate([])
    return Quality(by_weight=by_weight, base=_mean_scores(base_plain, jobs), bleed=bleed,
                   weight0_equals_base=equal, images=total, seconds=time.perf_counter() - started)


def measure_base(pipe, scenes: list[Scene], settings: RenderSettings | None = None) -> dict[str, float]:
    """How well the pipeline as it is draws plain captions: mean colour / position / shape accuracy and style."""
    from sdlora.generate.pipeline import generate

    settings = settings or RenderSettings()
    jobs = [(s, seed) for s in scenes for seed in settings.seeds]
    images = [generate(pipe, settings.params(s.caption(), seed)) for s, seed in jobs]
    return {**_mean_scores(images, jobs), "images": len(images)}


def _mean_scores(images, jobs) -> dict[str, float]:
    from sdlora.toyworld.evaluate import score_image

    scores = [score_image(image, scene) for image, (scene, _) in zip(images, jobs)]
    return {key: float(np.mean([s[key] for s in scores])) for key in (*CONTENT, "style")}


def summary(q: Quality) -> list[str]:
    """The measured figures as the demo prints them."""
    w0, w1 = q.at(0.0), q.at(1.0)
    return [
        f"style score (0 = plain, 1 = the trained style), trigger prompts: weight 0 {w0['style']:.2f}, "
        f"weight 1 {w1['style']:.2f}",
        f"content kept (colour / position / shape): base {w0['colour']:.0%} / {w0['position']:.0%} / "
        f"{w0['shape']:.0%}, with the LoRA {w1['colour']:.0%} / {w1['position']:.0%} / {w1['shape']:.0%}",
        f"bleed (style score without the trigger word, LoRA at weight 1): {q.bleed:.2f} "
        f"(base model {q.base['style']:.2f})",
        f"weight 0 renders the base model bit for bit: {'yes' if q.weight0_equals_base else 'NO'}",
    ]


def save(q: Quality, path: Path) -> None:
    from sdlora.atomic import write_text

    write_text(path, json.dumps(q.to_json(), indent=2))


def load(path: Path) -> Quality:
    return Quality(**json.loads(Path(path).read_text()))
