"""`sdlora demo` / `make demo`: train the style LoRA of sample_images/ on the toy-world model, export it, show and
measure what it does."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from sdlora.atomic import atomic_path
from sdlora.config import load_config
from sdlora.generate.grid import label_grid
from sdlora.generate.pipeline import (
    GenerationParams,
    LoraCache,
    LoraSpec,
    a1111_parameters,
    generate,
    load_pipeline,
    model_label,
    parse_sample_prompt,
    save_png,
)

logger = logging.getLogger(__name__)

COLUMNS = ["base model", "with the LoRA", "with the LoRA, no trigger word"]


def run_demo(out: Path, config: Path | None = None) -> dict[str, Path | None]:
    """Train the demo LoRA into `out`, render each sample prompt with and without it, and measure it on the toy
    world's held-out prompts (`quality.json`, printed and in the report).

    Returns the paths written: the LoRA file, the comparison, the measurements and the report.
    """
    from sdlora.toyworld.quality import QUALITY_NAME, RenderSettings, measure, save, summary
    from sdlora.toyworld.style_set import TRIGGER
    from sdlora.train.recipe import train
    from sdlora.ui.report import finish_run

    config = config or Path("configs/tiny.toml")
    cfg = load_config(config, [f'train.output_dir="{out.as_posix()}"'])
    started = time.time()
    lora = train(cfg)
    trained_in = time.time() - started

    pipe = load_pipeline(cfg.model.base_model)
    pipe.set_progress_bar_config(disable=True)
    cache = LoraCache(pipe)
    # First, while no adapter was ever loaded into the pipeline, so that "weight 0 renders the base model bit for
    # bit" compares with the untouched base. Rendered as the samples are (the config's steps, CFG, sampler, size).
    size = cfg.data.largest_resolution()
    settings = RenderSettings(steps=cfg.sample.steps, cfg=cfg.sample.cfg, sampler=cfg.sample.sampler, size=size)
    quality = measure(pipe, cache, lora, settings=settings)
    save(quality, out / QUALITY_NAME)
    defaults = GenerationParams(prompt="", steps=cfg.sample.steps, cfg=cfg.sample.cfg, seed=cfg.sample.seed,
                                width=size, height=size, sampler=cfg.sample.sampler)
    rows, prompts = [], []
    for i, line in enumerate(cfg.sample.prompts):
        params = parse_sample_prompt(line, defaults)
        untriggered = replace(params, prompt=params.prompt.removeprefix(f"{TRIGGER}, "))
        prompts.append(params.prompt)
        row = []
        for label, weight, p in (("base", 0.0, params), ("lora", 1.0, params), ("lora-no-trigger", 1.0, untriggered)):
            spec = LoraSpec(lora, weight)
            cache.activate([spec])
            image = generate(pipe, p)
            hashes = {lora.stem: cache.model_hash(lora)} if weight else None
            save_png(image, out / "compare" / f"{i:02d}-{label}.png",
                     a1111_parameters(p, model_label(cfg.model.base_model), lora_hashes=hashes))
            row.append(image)
        rows.append(row)
    comparison = out / "compare" / "before_after.png"
    with atomic_path(comparison) as tmp:
        label_grid(rows, COLUMNS, prompts).save(tmp, format="PNG")

    report = finish_run(cfg, out, loras=cache)
    print(f"\ndemo finished (training took {trained_in:.0f} s)")
    print(f"  LoRA (kohya format, loads in ComfyUI/A1111/diffusers): {lora}")
    print(f"  base model / with the LoRA / without the trigger word: {comparison}")
    print(f"  grid of the saved files x weights, report:             {out / 'grid.png'}, {report}")
    print(f"  TensorBoard logs:                                      tensorboard --logdir {out / 'logs'}")
    print(f"measured on 12 held-out prompts, fixed seeds ({out / QUALITY_NAME}):")
    for line in summary(quality):
        print(f"  {line}")
    return {"lora": lora, "comparison": comparison, "quality": out / QUALITY_NAME, "report": report}
