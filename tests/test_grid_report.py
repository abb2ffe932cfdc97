"""Epoch grids and the training report: grid cells are exactly what `generate_images` renders, labels and layout,
run-folder discovery order, report.md with loss curves from real TensorBoard events, the CLI commands.

One tiny run is trained for the module (3 steps, a LoRA file per epoch, validation split, two sample prompts)
and finished with `finish_run`, as training does at its end.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdlora.cli import main
from sdlora.generate.grid import (
    find_run_loras,
    grid_layout,
    label_grid,
    make_grid,
    prompt_title,
    run_config,
    sample_prompts,
)
from sdlora.generate.pipeline import GenerationParams, LoraSpec, generate_images
from sdlora.ui.report import finish_run, read_scalars, write_report

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["zkstyle, a boat --d 3", "a tent"]


pytestmark = pytest.mark.usefixtures("single_thread_plain_kernels")


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache):
    """A finished tiny run: lora-000001 (step 1), lora-000002 (step 2), lora (step 3), validation.csv, logs/,
    then `finish_run` (grid.png with weights 0 and 1, report.md)."""
    from sdlora.config import load_config
    from sdlora.train.recipe import train

    data = tmp_path_factory.mktemp("grid-data")
    for src in sorted((REPO / "sample_images").glob("*.png"))[:6]:
        shutil.copy(src, data / src.name)
        shutil.copy(src.with_suffix(".txt"), data / src.with_suffix(".txt").name)
    out = tmp_path_factory.mktemp("grid-run") / "run"
    prompts = "[" + ", ".join(f'"{p}"' for p in PROMPTS) + "]"
    cfg = load_config(None, [  # 2 of 6 images held out, the other 4 in one batch: one step per epoch
        f'data.dirs=["{data.as_posix()}"]', "data.resolution=64", "data.min_bucket_reso=64", "data.max_bucket_reso=64",
        "data.cache_latents=none", "data.validation_split=0.34", "lora.rank=4", "lora.alpha=4.0",
        "train.batch_size=4", "train.learning_rate=1e-2", "train.max_train_steps=3", "train.save_every_n_epochs=1",
        "train.log_every_n_steps=1", f'train.output_dir="{out.as_posix()}"', "export.dtype=fp32",
        f"sample.prompts={prompts}", "sample.steps=2",
    ])
    train(cfg)
    assert finish_run(cfg, out, weights=[0.0, 1.0], progress=False, loras=cache) == out / "report.md"
    return out


def test_layout_and_labels():
    colours = ["red", "green", "blue"]
    cells = [[Image.new("RGB", (64, 48), c) for c in colours[:2]] for _ in colours]
    cols, rows = ["weight 0", "weight 1"], ["lora-000001\nepoch 1, step 2", "lora-000002", "lora"]
    layout = grid_layout((64, 48), cols, rows, title="a boat (seed 3)")
    grid = label_grid(cells, cols, rows, title="a boat (seed 3)")
    assert grid.size == (layout.width, layout.height)
    assert layout.width == layout.label_w + 2 * 64 and layout.height == layout.title_h + layout.header_h + 3 * 48
    assert layout.title_h > 0 and layout.header_h > 0 and layout.label_w > 0
    assert grid_layout((64, 48), cols, rows).title_h == 0
    assert grid_layout((64, 48), cols, rows, "a long prompt " * 20).title_h == layout.title_h + layout.line_h  # 2 lines
    for r in range(3):
        for c in range(2):
            assert grid.crop(layout.cell_box(r, c)).tobytes() == cells[r][c].tobytes()
    bands = {
        "title": (0, 1, layout.width, layout.title_h),  # below the rule that parts stacked blocks
        "header": (layout.label_w, layout.title_h, layout.width, layout.title_h + layout.header_h),
        "row label": (0, layout.title_h + layout.header_h, layout.label_w, layout.height),
    }
    for name, box in bands.items():
        lo, hi = grid.crop(box).convert("L").getextrema()
        assert lo < 100 and hi == 255, f"no text in the {name} band"


def test_run_files_are_ordered_by_epoch_and_step(tmp_path, run):
    # Names only (no ss_* metadata): epoch files by epoch, then step files by step, the final file last.
    (tmp_path / "config.toml").write_text('[train]\noutput_name = "zk"\n')
    names = ["zk.safetensors", "zk-step00000500.safetensors", "zk-000010.safetensors", "zk-000002.safetensors",
             "zk-step00000050.safetensors", "other.safetensors", "zk-old.safetensors"]
    for name in names:
        (tmp_path / name).write_bytes(b"not a real file")
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "zk-000001.safetensors").write_bytes(b"")
    found = find_run_loras(tmp_path)
    assert [f.path.name for f in found] == ["zk-000002.safetensors", "zk-000010.safetensors",
                                            "zk-step00000050.safetensors", "zk-step00000500.safetensors",
                                            "zk.safetensors"]
    assert [(f.epoch, f.step, f.final) for f in found] == [(2, None, False), (10, None, False), (None, 50, False),
                                                           (None, 500, False), (None, None, True)]
    # A real run: epoch and step from the files' metadata.
    found = find_run_loras(run)
    assert [(f.path.name, f.epoch, f.step) for f in found] == [
        ("lora-000001.safetensors", 1, 1), ("lora-000002.safetensors", 2, 2), ("lora.safetensors", 3, 3)]
    assert found[0].label == "lora-000001\nepoch 1, step 1"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no LoRA files"):
        find_run_loras(tmp_path / "empty")


def test_grid_cells_are_what_generate_images_renders(run, pipe, cache, tmp_path):
    files = find_run_loras(run)
    prompts = sample_prompts(run_config(run))
    assert [(p.prompt, p.seed, p.steps, p.width, p.height) for p in prompts] == [("zkstyle, a boat", 3, 2, 64, 64),
                                                                                  ("a tent", 1, 2, 64, 64)]
    # Per prompt a block: title band, header row, 3 rows of 64 px; a label column and 2 columns of 64 px.
    layouts = [grid_layout((64, 64), ["weight 0", "weight 1"], [f.label for f in files], prompt_title(p))
               for p in prompts]
    tops = [0, layouts[0].height]
    with Image.open(run / "grid.png") as png:
        grid = png.convert("RGB")
        assert "X Type: LoRA weight, X Values: \"0, 1\", Y Type: LoRA file" in png.info["parameters"]
    for layout in layouts:
        assert layout.width == layout.label_w + 2 * 64 and layout.title_h > 0 and layout.header_h > 0
        assert layout.height == layout.title_h + layout.header_h + 3 * 64
    assert grid.size == (layouts[0].width, layouts[0].height + layouts[1].height)

    def cell(i, j, p):
        left, top, right, bottom = layouts[p].cell_box(i, j)
        return grid.crop((left, top + tops[p], right, bottom + tops[p])).tobytes()

    for p, params in enumerate(prompts):
        base = generate_images(pipe, cache, params).images[0].tobytes()
        for i, f in enumerate(files):
            assert cell(i, 0, p) == base  # weight 0: the base model
            lora = generate_images(pipe, cache, params, [LoraSpec(f.path, 1.0)]).images[0].tobytes()
            assert cell(i, 1, p) == lora != base
    assert len({cell(i, 1, 0) for i in range(3)}) == 3  # each epoch's file gives its own image
    for p in range(2):  # the title bands hold text
        assert grid.crop((0, tops[p] + 1, grid.width, tops[p] + layouts[p].title_h)).convert("L").getextrema()[0] < 100

    # LoRA files as sources, explicit prompt and size; `cells` says where each cell is.
    result = make_grid([files[-1].path], weights=[1.0], prompts=["zkstyle, a boat --d 3"], steps=2, width=64,
                       height=64, out=tmp_path / "one.png", progress=False, loras=cache)
    assert result.renders == 1 and result.path.is_file()
    assert result.image.crop(result.cells[(0, 0, 0)]).tobytes() == cell(2, 1, 0)


def test_report_has_curves_best_checkpoint_and_every_image(run):
    text = (run / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(<?([^)>]+)>?\)", text)
    assert {"report_loss.png", "report_val_loss.png", "grid.png"} <= set(images)
    for name in images:
        with Image.open(run / name) as image:
            assert image.format == "PNG" and image.width > 100
    losses = read_scalars(run / "logs", "loss")
    assert [step for step, _ in losses] == [1, 2, 3]  # log_every_n_steps = 1
    assert all(value > 0 for _, value in losses)
    with open(run / "validation.csv") as f:
        rows = [line.split(",") for line in f.read().split()[1:]]
    best_step = min((float(loss), int(step)) for step, _, loss in rows if int(step) > 0)[1]
    best_file = {1: "lora-000001", 2: "lora-000002", 3: "lora"}[best_step]
    assert f"Use **`{best_file}.safetensors`**" in text
    assert "## Dataset" in text and "6 images" in text and "validation_split" in text
    assert "```toml" in text and 'output_name = "lora"' in text


def test_report_without_validation_says_how_to_enable_it(tmp_path):
    (tmp_path / "config.toml").write_text('[train]\noutput_name = "zk"\n[data]\nvalidation_split = 0.0\n')
    (tmp_path / "zk.safetensors").write_bytes(b"not a real file")
    text = write_report(tmp_path, dataset=False).read_text()
    assert "data.validation_split" in text and "report_val_loss.png" not in text
    assert "No training loss" in text and "`zk.safetensors`" in text


def test_cli_grid_and_report(run, pipe, cache, tmp_path, capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr("sdlora.generate.grid.load_pipeline", lambda *args, **kwargs: loaded.append(args) or pipe)
    monkeypatch.setattr("sdlora.generate.grid.LoraCache", lambda p: cache)  # the module's pipeline, loaded once
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    out = tmp_path / "g.png"
    assert main(["grid", str(copy / "lora-000001.safetensors"), str(copy / "lora.safetensors"), "--model",
                 "tiny-sd15", "--weights", "0,1", "--prompt", "a boat --d 5", "--steps", "2", "--width", "64",
                 "--height", "64", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert loaded == [("tiny-sd15", "cpu", torch.float32)]
    with Image.open(out) as grid:
        rows = ["lora-000001\nepoch 1, step 1", "lora\nepoch 3, step 3"]
        params = GenerationParams(prompt="a boat", steps=2, width=64, height=64, seed=5)
        layout = grid_layout((64, 64), ["weight 0", "weight 1"], rows, prompt_title(params))
        assert grid.size == (layout.width, layout.height)
        base = generate_images(pipe, cache, params).images[0]
        assert grid.convert("RGB").crop(layout.cell_box(1, 0)).tobytes() == base.tobytes()
    assert main(["report", str(copy), "--no-grid"]) == 0
    text = (copy / "report.md").read_text()
    assert "## Grid" not in text and "report_loss.png" in text
    assert main(["grid", str(tmp_path / "missing")]) == 1
    assert "no such run folder" in capsys.readouterr().err
    assert main(["grid", str(copy / "lora.safetensors"), "--model", "tiny-sd15"]) == 2  # a file has no config
    assert "no prompts: pass --prompt" in capsys.readouterr().err
    assert len(loaded) == 1  # refused before loading anything
    assert run_config(copy)["sample"]["prompts"] == PROMPTS
    assert [p.prompt for p in sample_prompts(run_config(copy))] == ["zkstyle, a boat", "a tent"]
