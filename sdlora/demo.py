"""`sdlora demo` / `make demo`: train on sample_images/ with the tiny model, export, render before/after."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from PIL import ImageChops

from .config import load_config
from .atomic import atomic_path
from .grid import label_grid
from .generate import (
    GenerationParams,
    LoraCache,
    LoraSpec,
    a1111_parameters,
    generate,
    load_pipeline,
    parse_sample_prompt,
    save_png,
)

logger = logging.getLogger(__name__)


def run_demo(out: Path, config: Path | None = None) -> dict[str, Path]:
    """Train the demo LoRA into `out`, then render every sample prompt without and with it.

    Returns the paths written: the LoRA file, the before/after PNGs and a side-by-side comparison.
    """
    config = config or Path("configs/tiny.toml")
    cfg = load_config(config, [f'train.output_dir="{out.as_posix()}"'])
    from .train import train

    started = time.time()
    lora = train(cfg)
    trained_in = time.time() - started

    pipe = load_pipeline(cfg.model.base_model)
    pipe.set_progress_bar_config(disable=True)
    cache = LoraCache(pipe)
    defaults = GenerationParams(prompt="", steps=cfg.sample.steps, cfg=cfg.sample.cfg, seed=cfg.sample.seed,
                                width=cfg.data.resolution, height=cfg.data.resolution, sampler=cfg.sample.sampler)
    written = {"lora": lora}
    rows, prompts = [], []
    for i, line in enumerate(cfg.sample.prompts):
        params = parse_sample_prompt(line, defaults)
        prompts.append(params.prompt)
        row = []
        for label, weight in (("base", 0.0), ("lora", 1.0)):
            cache.activate([LoraSpec(lora, weight)])
            image = generate(pipe, params)
            path = save_png(image, out / "compare" / f"{i:02d}-{label}.png", a1111_parameters(params, cfg.model.base_model))
            written[f"{i:02d}-{label}"] = path
            row.append(image)
        # Random-init images all look alike to the eye; the amplified difference shows what the LoRA changed.
        row.append(ImageChops.difference(*row).point(lambda v: min(255, 4 * v)))
        rows.append(row)
    comparison = label_grid(rows, ["without the LoRA", "with the LoRA", "difference x4"], prompts)
    written["comparison"] = out / "compare" / "before_after.png"
    with atomic_path(written["comparison"]) as tmp:
        comparison.save(tmp, format="PNG")
    from .report import finish_run

    written["report"] = finish_run(cfg, out, loras=cache)
    print(f"\ndemo finished (training took {trained_in:.0f} s)")
    print(f"  LoRA (kohya format, loads in ComfyUI/A1111/diffusers): {lora}")
    print(f"  samples during training:                               {out / 'samples'}")
    print(f"  without / with the LoRA, and the difference:           {written['comparison']}")
    print(f"  grid of the saved files x weights, report:             {out / 'grid.png'}, {written['report']}")
    print(f"  TensorBoard logs:                                      tensorboard --logdir {out / 'logs'}")
    return written

