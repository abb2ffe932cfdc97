"""`sdlora demo` / `make demo` end to end on the toy-world model: the files it promises, and what its LoRA does.

The demo runs once, exactly as `make demo` runs it (configs/tiny.toml), and the quality figures it measures are
pinned here: a regression test of what training produces, not of whether a loss went down.
"""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora.config import derive, dump_toml, load_config
from sdlora.generate.pipeline import GenerationParams, LoraCache, generate, load_pipeline, parse_sample_prompt
from sdlora.toyworld.quality import QUALITY_NAME, RenderSettings, load, measure
from sdlora.train.recipe import train
from sdlora.ui.demo import run_demo

REPO = Path(__file__).resolve().parents[1]

# Measured on the committed demo (configs/tiny.toml, 12 held-out prompts x 1 seed) on a 2-core CPU: style 0.03 at
# weight 0 and 0.80 at weight 1; colour and position kept (100 % / 8 % both); shape 75 % -> 33 %; bleed 0.58. The
# issue's targets for shape (a drop of at most 10 points) and bleed (<= 0.3) are not reached yet (see README "The
# toy world"): those two bounds pin today's level, so that a change that makes them worse fails. The bounds leave
# a margin for other CPUs' floating-point differences.
STYLE_W1_MIN = 0.6
STYLE_W0_MAX = 0.1
CONTENT_DROP_MAX = {"colour": 0.10, "position": 0.10, "shape": 0.55}
BLEED_MAX = 0.75
# The demo's config with auto class images (data.class_images_per_image = 1), measured the same way: bleed 0.21
# against the plain demo's 0.58, the style at weight 1 0.46 (benchmarks/lora_quality.jsonl, 2 seeds: 0.21 / 0.46).
# Pinned with a margin for other CPUs: the bleed at least 0.2 lower than the plain LoRA's, the style still learnt.
CLASS_IMAGES_BLEED_DROP_MIN = 0.2
CLASS_IMAGES_STYLE_W1_MIN = 0.3


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cfg = load_config(REPO / "configs" / "tiny.toml", [f'data.dirs=["{(REPO / "sample_images").as_posix()}"]'])
    config = tmp_path_factory.mktemp("config") / "demo.toml"
    config.write_text(dump_toml(cfg))
    out = tmp_path_factory.mktemp("run") / "demo"
    return cfg, out, run_demo(out, config)


def test_demo_writes_lora_comparison_grid_and_report(demo):
    cfg, out, written = demo
    assert written["lora"] == out / "zkstyle_tiny.safetensors" and written["lora"].is_file()
    assert (out / "grid.png").is_file() and written["report"] == out / "report.md"
    assert "## Measured on the toy world" in written["report"].read_text()
    comparison = Image.open(written["comparison"])
    assert comparison.width > 3 * 128 and comparison.height > 3 * 128  # 3 prompts x 3 columns

    pipe = load_pipeline(cfg.model.base_model)
    pipe.set_progress_bar_config(disable=True)
    defaults = GenerationParams(prompt="", steps=cfg.sample.steps, cfg=cfg.sample.cfg, seed=cfg.sample.seed,
                                width=128, height=128, sampler=cfg.sample.sampler)
    for i, line in enumerate(cfg.sample.prompts):
        base = np.asarray(generate(pipe, parse_sample_prompt(line, defaults)))
        assert np.array_equal(np.asarray(Image.open(out / "compare" / f"{i:02d}-base.png").convert("RGB")), base)
        assert not np.array_equal(np.asarray(Image.open(out / "compare" / f"{i:02d}-lora.png").convert("RGB")), base)


def test_the_lora_draws_the_style_keeps_the_content_and_answers_its_trigger(demo):
    _, out, _ = demo
    q = load(out / QUALITY_NAME)
    base, lora = q.at(0.0), q.at(1.0)
    assert q.weight0_equals_base
    assert lora["style"] >= STYLE_W1_MIN and base["style"] <= STYLE_W0_MAX
    assert base["style"] < q.at(0.5)["style"] < lora["style"]
    for key, drop in CONTENT_DROP_MAX.items():
        assert lora[key] >= base[key] - drop, key
    assert q.bleed <= BLEED_MAX


def test_class_images_keep_the_style_out_of_prompts_without_the_trigger(demo, tmp_path):
    """Prior preservation with class images the base model draws itself: the same training, data and seed as the
    demo, measured on the same prompts and seeds, bleeds measurably less."""
    cfg, out, _ = demo
    kept = train(derive(cfg, {"data.class_images_per_image": 1, "train.output_dir": (tmp_path / "kept").as_posix(),
                              "train.report": False, "sample.prompts": []}))
    pipe = load_pipeline(cfg.model.base_model)
    pipe.set_progress_bar_config(disable=True)
    settings = RenderSettings(steps=cfg.sample.steps, cfg=cfg.sample.cfg, sampler=cfg.sample.sampler,
                              size=cfg.data.resolution)
    q = measure(pipe, LoraCache(pipe), kept, weights=(1.0,), settings=settings)
    plain = load(out / QUALITY_NAME)
    assert q.bleed <= plain.bleed - CLASS_IMAGES_BLEED_DROP_MIN
    assert q.at(1.0)["style"] >= CLASS_IMAGES_STYLE_W1_MIN
