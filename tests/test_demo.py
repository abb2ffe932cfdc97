"""`sdlora demo` / `make demo` end to end, shortened: the files it promises, and weight 0 is the base model."""

from pathlib import Path

import numpy as np
from PIL import Image

from sdlora.config import dump_toml, load_config
from sdlora.demo import run_demo
from sdlora.generate import GenerationParams, generate, load_pipeline, parse_sample_prompt

REPO = Path(__file__).resolve().parents[1]


def test_demo_writes_lora_comparison_grid_and_report(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.toml", [
        f'data.dirs=["{(REPO / "sample_images").as_posix()}"]', "data.resolution=64", "data.min_bucket_reso=64",
        "train.max_train_steps=4", "train.save_every_n_steps=2", "sample.every_n_steps=0", "sample.steps=2",
    ])
    config = tmp_path / "demo.toml"
    config.write_text(dump_toml(cfg))
    out = tmp_path / "demo"
    written = run_demo(out, config)

    assert written["lora"] == out / "zkstyle_tiny.safetensors" and written["lora"].is_file()
    assert (out / "grid.png").is_file() and written["report"] == out / "report.md"
    comparison = Image.open(written["comparison"])
    assert comparison.width > 3 * 64 and comparison.height > 2 * 64  # 2 prompts x (without, with, difference)

    pipe = load_pipeline(cfg.model.base_model)
    pipe.set_progress_bar_config(disable=True)
    defaults = GenerationParams(prompt="", steps=cfg.sample.steps, cfg=cfg.sample.cfg, seed=cfg.sample.seed,
                                width=64, height=64, sampler=cfg.sample.sampler)
    for i, line in enumerate(cfg.sample.prompts):
        base = np.asarray(generate(pipe, parse_sample_prompt(line, defaults)))
        assert np.array_equal(np.asarray(Image.open(out / "compare" / f"{i:02d}-base.png").convert("RGB")), base)
        assert not np.array_equal(np.asarray(Image.open(out / "compare" / f"{i:02d}-lora.png").convert("RGB")), base)
