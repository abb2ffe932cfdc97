"""CLIP similarity of grid images (sdlora.ui.similarity) with a tiny random CLIP built from a config: the numbers mean
nothing, but loading, embedding, the cosines, the per-(file, weight) table, similarity.csv, the report section, the
`sdlora grid --clip` plumbing and the grid image in TensorBoard are the real code paths.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdlora.cli import main
from sdlora.errors import ClipError
from sdlora.generate.grid import GridResult, LoraFile, grid_layout, label_grid, log_grid, stack_vertically
from sdlora.generate.pipeline import GenerationParams
from sdlora.ui.report import write_report
from sdlora.ui.similarity import clip_scores, grid_similarity, load_clip, markdown_table, measure_grid, read_similarity

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A random CLIP at tiny widths saved as a CLIP folder: safetensors, the real CLIP tokenizer, a processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from sdlora.models.clip_tokenizer import load_clip_tokenizer

    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=49408, max_position_embeddings=77),
                        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    load_clip_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(size=32, crop_size=32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip(clip_dir):
    return load_clip(clip_dir, device="cpu")


def _image(colour: str, size: int = 32, mark: int = 0) -> Image.Image:
    image = Image.new("RGB", (size, size), colour)
    if mark:  # a square, so images of one colour differ
        image.paste("white", (mark, mark, mark + size // 4, mark + size // 4))
    return image


def test_scores_are_cosines_and_deterministic(clip):
    images = [_image(c) for c in COLOURS[:3]]
    prompts = ["zkstyle, a red boat", "a green tent", "a blue sky " * 30]  # the last is cut at 77 tokens
    references = [_image("yellow"), images[1], _image("purple", mark=4)]
    scores = clip_scores(clip, images, prompts, references)
    again = clip_scores(clip, images, prompts, references)
    assert [(s.clip_t, s.clip_i, s.reference) for s in scores] == [(s.clip_t, s.clip_i, s.reference) for s in again]
    for s in scores:
        assert -1 <= s.clip_t <= 1 and -1 <= s.clip_i <= 1 and all(-1 <= r <= 1 for r in s.reference)
        assert s.clip_i == pytest.approx(sum(s.reference) / 3, abs=1e-6)
    assert scores[1].reference[1] == pytest.approx(1.0, abs=1e-5)  # the image itself is one of the references
    assert clip_scores(clip, [images[1]], ["x"], [images[1]])[0].clip_i == pytest.approx(1.0, abs=1e-5)
    assert math.isnan(clip_scores(clip, images[:1], prompts[:1])[0].clip_i)  # no references: no CLIP-I
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        clip_scores(clip, images[:2], prompts[:1])

    # CLIP-T by hand from the model's own feature functions.
    model = clip.model

    def features(output):  # a tensor in transformers 4.x, an output object in 5.x
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    with torch.no_grad():
        tokens = clip.tokenizer([prompts[0]], return_tensors="pt")
        text = features(model.get_text_features(**tokens))[0]
        pixels = clip.processor(images=[images[0]], return_tensors="pt")["pixel_values"]
        image = features(model.get_image_features(pixel_values=pixels))[0]
    assert scores[0].clip_t == pytest.approx(float(torch.cosine_similarity(text, image, dim=0)), abs=1e-5)


def test_not_a_clip_folder_is_one_line(tmp_path, clip_dir):
    cases = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "sd": tmp_path / "sd"}
    cases["empty"].mkdir()
    cases["sd"].mkdir()
    (cases["sd"] / "config.json").write_text('{"model_type": "unet"}')
    (cases["sd"] / "model.safetensors").write_bytes(b"")
    for name, folder in cases.items():
        with pytest.raises(ClipError) as e:
            load_clip(folder)
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"{folder}: not a CLIP model folder"), name
    # Pickle weights only: refused although transformers could read them (written by hand: transformers 5 always
    # saves safetensors).
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(clip_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ClipError, match="no .safetensors weights.*pickle"):
        load_clip(pickled)


@pytest.fixture
def grid_run(tmp_path):
    """A run folder (config.toml with data.dirs, logs/) and a hand-drawn GridResult: 2 files x weights 0, 1 x 2
    prompts, cells as `render_grid` records them, weight 0 the same image for every file."""
    data = tmp_path / "images"
    data.mkdir()
    for k, colour in enumerate(COLOURS[:3]):
        _image(colour, 48).save(data / f"img{k}.png")
        (data / f"img{k}.txt").write_text(f"zkstyle, {colour}")
    run = tmp_path / "run"
    (run / "logs" / "sdlora").mkdir(parents=True)
    (run / "config.toml").write_text(f'[data]\ndirs = ["{data.as_posix()}"]\n[train]\noutput_name = "zk"\n')
    files = [LoraFile(run / "zk-000001.safetensors", epoch=1, step=5), LoraFile(run / "zk.safetensors", step=10,
                                                                                 final=True)]
    for f in files:
        f.path.write_bytes(b"not a real file")
    weights = [0.0, 1.0]
    prompts = [GenerationParams("zkstyle, a boat <lora:zk:1>", width=32, height=32, seed=3),
               GenerationParams("a tent", width=32, height=32)]
    blocks, layouts = [], []
    for p in range(2):
        rows = [[_image("gray", mark=4 + p) if w == 0 else _image(COLOURS[i + 2 * p], mark=4 * i)
                 for w in weights] for i in range(2)]
        cols, labels = [f"weight {w:g}" for w in weights], [f.label for f in files]
        blocks.append(label_grid(rows, cols, labels, prompts[p].prompt))
        layouts.append(grid_layout((32, 32), cols, labels, prompts[p].prompt))
    image, tops = stack_vertically(blocks)
    cells = {}
    for p, (layout, top) in enumerate(zip(layouts, tops)):
        for i in range(2):
            for j in range(2):
                left, upper, right, lower = layout.cell_box(i, j)
                cells[(i, j, p)] = (left, upper + top, right, lower + top)
    return run, GridResult(image=image, parameters="", files=files, weights=weights, prompts=prompts, cells=cells,
                           path=run / "grid.png", renders=6)


def test_grid_table_csv_and_report(clip, grid_run):
    run, result = grid_run
    text = write_report(run, dataset=False).read_text()
    assert "## Similarity" not in text and f"sdlora grid {run} --clip /path/to/clip-model" in text

    rows, path = measure_grid(clip, result, run)
    assert path == run / "similarity.csv"
    assert [(r.file, r.epoch, r.step, r.weight, r.images) for r in rows] == [
        ("zk-000001.safetensors", 1, 5, 0.0, 2), ("zk-000001.safetensors", 1, 5, 1.0, 2),
        ("zk.safetensors", None, 10, 0.0, 2), ("zk.safetensors", None, 10, 1.0, 2)]
    assert (rows[0].clip_t, rows[0].clip_i) == (rows[2].clip_t, rows[2].clip_i)  # weight 0: the base, every file
    for r in rows:
        assert -1 <= r.clip_t <= 1 and -1 <= r.clip_i <= 1
    # The table is the mean of each cell's own scores; prompts without their <lora:...> tags.
    keys = [(1, 1, 0), (1, 1, 1)]
    cells = [result.image.crop(result.cells[k]) for k in keys]
    references = sorted((run.parent / "images").glob("*.png"))
    scores = clip_scores(clip, cells, ["zkstyle, a boat", "a tent"], references)
    assert rows[3].clip_t == pytest.approx((scores[0].clip_t + scores[1].clip_t) / 2, abs=1e-5)
    assert rows[3].clip_i == pytest.approx((scores[0].clip_i + scores[1].clip_i) / 2, abs=1e-5)
    # Without training images (no config.toml): CLIP-I is empty, CLIP-T the same.
    bare = grid_similarity(clip, result)
    assert all(math.isnan(r.clip_i) for r in bare) and bare[3].clip_t == pytest.approx(rows[3].clip_t, abs=1e-6)

    csv_rows = read_similarity(run)
    assert path.read_text().splitlines()[0] == "file,epoch,step,weight,clip_t,clip_i,images"
    assert [(r["file"], r["epoch"], r["weight"]) for r in csv_rows] == [
        ("zk-000001.safetensors", "1", "0"), ("zk-000001.safetensors", "1", "1"), ("zk.safetensors", "", "0"),
        ("zk.safetensors", "", "1")]
    assert float(csv_rows[3]["clip_t"]) == pytest.approx(rows[3].clip_t, abs=1e-4)
    table = markdown_table(csv_rows)
    assert markdown_table(rows) == table and len(table.splitlines()) == 2 + 4
    text = write_report(run, dataset=False).read_text()
    assert "## Similarity (CLIP)" in text and table in text and "--clip /path" not in text


def test_cli_grid_clip_and_tensorboard(clip_dir, grid_run, monkeypatch, capsys, tmp_path):
    run, result = grid_run
    calls = []

    def fake_make_grid(sources, *args, **kwargs):  # the grid's rendering is tested in test_grid_report
        calls.append(sources)
        return result

    monkeypatch.setattr("sdlora.generate.grid.make_grid", fake_make_grid)
    assert main(["grid", str(run), "--clip", str(clip_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(run / "grid.png") and out[-1] == str(run / "similarity.csv")
    assert out[1].startswith("| file | epoch | step | weight | CLIP-T | CLIP-I |") and len(out) == 1 + 6 + 1
    assert len(read_similarity(run)) == 4
    assert main(["grid", str(run), "--clip", str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'}: not a CLIP model folder" in capsys.readouterr().err
    assert len(calls) == 1  # refused before the grid

    # The grid in TensorBoard, in training's log folder, at the last saved step.
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    assert log_grid(result, tmp_path) is None  # no logs/: nothing written
    assert log_grid(result, run) == run / "logs" / "sdlora"
    events = EventAccumulator(str(run / "logs" / "sdlora"), size_guidance={IMAGES: 0})
    events.Reload()
    [logged] = events.Images("grid")
    assert (logged.step, logged.width, logged.height) == (10, result.image.width, result.image.height)


def test_training_end_scores_the_grid_when_the_config_names_a_clip(clip_dir, grid_run, monkeypatch):
    from sdlora.config import load_config
    from sdlora.ui.report import finish_run

    run, result = grid_run
    monkeypatch.setattr("sdlora.ui.report.make_grid", lambda *args, **kwargs: result)  # rendering: test_grid_report
    cfg = load_config(None, [f'data.dirs=["{(run.parent / "images").as_posix()}"]', 'sample.prompts=["a boat"]',
                             f'sample.clip_model="{clip_dir.as_posix()}"'])
    report = finish_run(cfg, run, progress=False)
    assert len(read_similarity(run)) == 4 and "## Similarity (CLIP)" in report.read_text()
