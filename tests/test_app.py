"""The Gradio app: folder safety, PNG parameters back into the fields, the X/Y grid, the same image from the CLI
and the app, and the running app driven through gradio_client."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_generate import trained_loras

from sdlora.cli import main
from sdlora.config import load_config
from sdlora.errors import PathError
from sdlora.generate.grid import label_grid
from sdlora.ui.app.engine import Engine
from sdlora.ui.app.generate import SLOTS, read_png_parameters, run_generate, run_grid
from sdlora.ui.app.page import launch
from sdlora.ui.app.settings import AppSettings, lora_choices, model_choices, resolve_inside, resolve_model

COMMON = ("tiny-sd15", "zkstyle, a boat", "", "euler", 2, 7.0, 64, 64)  # model ... height; then seed
ALPHA, BETA = "alpha/alpha.safetensors", "beta/beta.safetensors"


def slots(*entries) -> list:
    """UI slot values (on, name, weight) for the given (name, weight) pairs, the rest switched off."""
    values = []
    for i in range(SLOTS):
        values += [True, *entries[i]] if i < len(entries) else [False, None, 1.0]
    return values


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    shutil.copytree(trained_loras(tmp_path_factory), root / "loras")  # our own copy: tests add files to it
    return AppSettings(models_dir=root / "models", lora_dir=root / "loras", out_dir=root / "out")


@pytest.fixture(scope="module")
def engine(settings):
    return Engine(settings)


@pytest.mark.parametrize("name", ["../x.safetensors", "a/../../x", "/etc/passwd", "..", "", "C:\\x",
                                  "a/..\\..\\x", "link/escape.safetensors", "escape.safetensors"])
def test_names_outside_the_folder_are_refused(tmp_path, name):
    root = tmp_path / "loras"
    (root / "a").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "escape.safetensors").write_bytes(b"")
    (root / "link").symlink_to(outside)
    (root / "escape.safetensors").symlink_to(outside / "escape.safetensors")
    with pytest.raises(PathError):
        resolve_inside(root, name)


def test_names_inside_the_folder_resolve(tmp_path):
    (tmp_path / "a").mkdir()
    assert resolve_inside(tmp_path, "a/x.safetensors") == (tmp_path / "a" / "x.safetensors").resolve()
    assert resolve_inside(tmp_path, "a\\x.safetensors") == (tmp_path / "a" / "x.safetensors").resolve()


def test_model_and_lora_lists(settings, tmp_path):
    models = tmp_path / "models"
    (models / "sd15").mkdir(parents=True)
    (models / "sd15" / "model_index.json").write_text("{}")
    (models / "notes").mkdir()
    (models / "one.safetensors").write_bytes(b"")
    local = AppSettings(models_dir=models, lora_dir=settings.lora_dir, out_dir=tmp_path / "out")
    assert model_choices(local) == ["toy-sd15", "tiny-sd15", "tiny-sdxl", "one.safetensors", "sd15"]
    assert resolve_model(local, "sd15") == str((models / "sd15").resolve())
    assert resolve_model(local, "tiny-sdxl") == "tiny-sdxl"
    for bad in ("notes", "../models/sd15", "/etc"):
        with pytest.raises(PathError):
            resolve_model(local, bad)
    assert lora_choices(settings)[:2] == [ALPHA, BETA]


def test_cli_and_app_give_the_same_image(engine, settings, tmp_path):
    gallery, seed, info = run_generate(engine, *COMMON, 11, 1, *slots((ALPHA, 0.8), (BETA, 0.5)))
    assert seed == 11 and len(gallery) == 1 and "saved" in info
    lora_dir = settings.lora_dir
    assert main(["generate", "--model", "tiny-sd15", "--lora", f"{lora_dir / ALPHA}:0.8", "--lora",
                 f"{lora_dir / BETA}:0.5", "--prompt", "zkstyle, a boat", "--steps", "2", "--width", "64",
                 "--height", "64", "--seed", "11", "--out", str(tmp_path)]) == 0
    with Image.open(gallery[0][0]) as app_png, Image.open(tmp_path / "00001-11.png") as cli_png:
        assert app_png.tobytes() == cli_png.tobytes()
        assert app_png.info["parameters"] == cli_png.info["parameters"]
        assert "<lora:alpha:0.8> <lora:beta:0.5>" in app_png.info["parameters"]


def test_read_parameters_fills_the_fields_and_reproduces_the_image(engine, settings):
    gallery, seed, _ = run_generate(engine, "tiny-sd15", "a tent <lora:beta:0.7>", "dark", "euler_a", 3, 6.5, 72, 64,
                                    -1, 1, *slots((ALPHA, -0.6)))
    values = read_png_parameters(settings, gallery[0][0])
    model, prompt, negative, sampler, steps, cfg, width, height, read_seed, batch, vae, *switches, info = values
    assert (model, prompt, negative, sampler, steps, cfg, width, height, read_seed, batch, vae) == (
        "tiny-sd15", "a tent <lora:beta:0.7> <lora:alpha:-0.6>", "dark", "euler_a", 3, 6.5, 72, 64, seed, 1,
        "model's own")
    assert switches == [False] * SLOTS and "<lora:" in info
    ui_slots = slots((ALPHA, 0.3))
    ui_slots[0::3] = switches  # the form after reading: slot values as they were, switched off
    again, _, _ = run_generate(engine, model, prompt, negative, sampler, steps, cfg, width, height, read_seed, 1,
                               *ui_slots)
    with Image.open(gallery[0][0]) as first, Image.open(again[0][0]) as second:
        assert first.tobytes() == second.tobytes()


def test_batch_size_numbers_seeds_as_a1111_and_the_png_gives_the_batch_back(engine, settings):
    gallery, seed, _ = run_generate(engine, *COMMON, 7, 2, *slots(), batch_size=2)
    assert seed == 7 and [caption for _, caption in gallery] == [f"seed {s}" for s in (7, 8, 9, 10)]
    with Image.open(gallery[3][0]) as png:
        assert "Seed: 10, Size: 64x64, Model: tiny-sd15, Batch size: 2, Batch pos: 1" in png.info["parameters"]
        batched = np.asarray(png.convert("RGB"), dtype=np.int16)
    single, _, _ = run_generate(engine, *COMMON, 10, 1, *slots())
    with Image.open(single[0][0]) as png:  # the same seed alone: the same picture, up to a batch's float rounding
        assert np.abs(batched - np.asarray(png.convert("RGB"), dtype=np.int16)).max() <= 2
        assert "Batch" not in png.info["parameters"]
    values = read_png_parameters(settings, gallery[3][0])
    assert values[8:10] == (9, 2)  # the batch's first seed: batch position 1 draws the image again
    again, _, _ = run_generate(engine, *COMMON, values[8], 1, *slots(), batch_size=values[9])
    with Image.open(again[1][0]) as first, Image.open(gallery[3][0]) as second:
        assert first.tobytes() == second.tobytes()
    with pytest.raises(gr.Error, match="batch size 65"):
        run_generate(engine, *COMMON, 7, 1, *slots(), batch_size=65)
    out = settings.out_dir.parent / "cli-batch"
    assert main(["generate", "--model", "tiny-sd15", "--prompt", "zkstyle, a boat", "--steps", "2", "--width", "64",
                 "--height", "64", "--seed", "9", "--batch-size", "2", "--out", str(out)]) == 0
    with Image.open(out / "00002-10.png") as cli_png, Image.open(gallery[3][0]) as app_png:  # the same batch
        assert cli_png.tobytes() == app_png.tobytes() and cli_png.info["parameters"] == app_png.info["parameters"]


def test_read_parameters_of_a_plain_png_changes_nothing(settings, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.warns(UserWarning, match="no A1111 'parameters'"):
        values = read_png_parameters(settings, str(tmp_path / "plain.png"))
    assert all(v == gr.skip() for v in values[:-1])


def test_xy_grid(engine, settings):
    path, info = run_grid(engine, *COMMON, 3, ALPHA, "0, 1", "seed", "3, 4", *slots())
    with Image.open(path) as grid:
        assert grid.width > 2 * 64 and grid.height > 2 * 64
        assert "X Type: LoRA weight (alpha)" in grid.info["parameters"]
        cell = grid.crop((grid.width - 128, grid.height - 128, grid.width - 64, grid.height - 64))  # weight 0, seed 3
    base, _, _ = run_generate(engine, *COMMON, 3, 1, *slots())
    with Image.open(base[0][0]) as image:
        assert cell.tobytes() == image.convert("RGB").tobytes()
    path, _ = run_grid(engine, *COMMON, 3, ALPHA, "-1", "prompt", "a boat\na tent", *slots((BETA, 0.5)))
    assert Path(path).is_file()
    with pytest.raises(gr.Error, match="weights"):
        run_grid(engine, *COMMON, 3, ALPHA, "zero, one", "seed", "1", *slots())


def _cell(path, row, col, rows, cols, size=64):
    """The image at (row, col) of a grid whose cells sit in the bottom-right corner."""
    with Image.open(path) as grid:
        left, top = grid.width - (cols - col) * size, grid.height - (rows - row) * size
        return grid.crop((left, top, left + size, top + size)).convert("RGB").tobytes()


def _generated(engine, *loras):
    images, _, _ = run_generate(engine, *COMMON, 3, 1, *slots(*loras))
    with Image.open(images[0][0]) as image:
        return image.convert("RGB").tobytes()


def test_xy_grid_over_lora_files_and_a_second_lora(engine):
    # Y = LoRA files (a run's epochs): each row applies the X weights to its own file.
    path, _ = run_grid(engine, *COMMON, 3, ALPHA, "0, 1", "LoRA file", f"{ALPHA}\n{BETA}", *slots())
    assert _cell(path, 1, 1, 2, 2) == _generated(engine, (BETA, 1.0))
    assert _cell(path, 0, 0, 2, 2) == _cell(path, 1, 0, 2, 2) == _generated(engine)  # weight 0: the base
    # Y = a second LoRA's weights, on top of the X LoRA's.
    path, _ = run_grid(engine, *COMMON, 3, ALPHA, "0, 1", "second LoRA weight", f"{BETA}: 0, 0.5", *slots())
    assert _cell(path, 0, 0, 2, 2) == _generated(engine)
    assert _cell(path, 1, 1, 2, 2) == _generated(engine, (ALPHA, 1.0), (BETA, 0.5))
    with pytest.raises(gr.Error, match="name, a colon"):
        run_grid(engine, *COMMON, 3, ALPHA, "0", "second LoRA weight", "0.5", *slots())


def test_label_grid_wraps_long_labels():
    cells = [[Image.new("RGB", (64, 64), c) for c in ("red", "blue")] for _ in range(2)]
    grid = label_grid(cells, ["alpha: 0", "alpha: 1"], ["a very long prompt " * 8, "seed 2"])
    assert grid.height > 128 and grid.width > 128
    assert grid.getpixel((grid.width - 1, grid.height - 1)) == (0, 0, 255)


def test_errors_become_messages_and_the_app_goes_on(engine, settings):
    with pytest.raises(gr.Error, match="multiple of 8"):
        run_generate(engine, "tiny-sd15", "x", "", "euler", 2, 7.0, 100, 64, 1, 1, *slots())
    with pytest.raises(gr.Error, match="only names inside"):
        run_generate(engine, *COMMON, 1, 1, *slots(("../../etc/passwd", 1.0)))
    broken = settings.lora_dir / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    try:
        with pytest.raises(gr.Error, match="broken.safetensors"):
            run_generate(engine, *COMMON, 1, 1, *slots(("broken.safetensors", 1.0)))
    finally:
        broken.unlink()
    gallery, _, _ = run_generate(engine, *COMMON, 1, 1, *slots((ALPHA, 1.0)))
    assert Path(gallery[0][0]).is_file()


def test_a_stray_module_is_a_message_in_the_page_or_refused_with_strict(engine, settings):
    from test_generate import STRAY, _with_stray_module

    stray, _ = _with_stray_module(settings.lora_dir / ALPHA, settings.lora_dir, "uniform")
    try:
        with pytest.warns(UserWarning, match=f"stray_uniform.safetensors: 1 of .* {STRAY}; they are left out"):
            gallery, _, _ = run_generate(engine, *COMMON, 1, 1, *slots((stray.name, 1.0)))
        assert Path(gallery[0][0]).is_file()
        strict = Engine(AppSettings(**{**vars(settings), "strict": True}))
        with pytest.raises(gr.Error, match=f"{STRAY}; refused"):
            run_generate(strict, *COMMON, 1, 1, *slots((stray.name, 1.0)))
    finally:
        for path in settings.lora_dir.glob("*_uniform.safetensors"):
            path.unlink()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.smoke
def test_running_app_through_gradio_client(settings):
    from gradio_client import Client

    demo = launch(settings, port=_free_port(), block=False)
    try:
        assert demo.server_name == "127.0.0.1"  # local only unless --listen / --share
        jobs = [fn for fn in demo.fns.values() if fn.api_name in ("generate", "grid", "train", "resume")]
        assert len(jobs) == 4 and {fn.concurrency_id for fn in jobs} == {"model"}  # one queue for model work ...
        assert demo._queue.default_concurrency_limit == 1  # ... running one job at a time
        (stop,) = [fn for fn in demo.fns.values() if fn.api_name == "stop_train"]
        assert not stop.queue and stop.concurrency_id != "model"  # Stop does not wait behind the training
        client = Client(demo.local_url, verbose=False)
        gallery, seed, info = client.predict(*COMMON, 5, 2, *slots((ALPHA, 0.8), (BETA, 0.5)), api_name="/generate")
        assert seed == 5 and len(gallery) == 2
        saved = sorted(settings.out_dir.glob("*-5.png"))[-1]
        with Image.open(gallery[0]["image"]) as served, Image.open(saved) as png:
            assert served.tobytes() == png.tobytes()
            assert 'Lora hashes: "alpha: ' in png.info["parameters"] and ", beta: " in png.info["parameters"]
        with pytest.raises(Exception, match="not in the list of choices"):
            client.predict(*COMMON, 5, 1, *slots(("../../etc/passwd", 1.0)), api_name="/generate")
        # A LoRA added while the app runs appears after Refresh.
        shutil.copy(settings.lora_dir / ALPHA, settings.lora_dir / "gamma.safetensors")
        client.predict(*[None] * (SLOTS + 2), "tiny-sd15", api_name="/refresh")
        gallery, _, _ = client.predict(*COMMON, 5, 1, *slots(("gamma.safetensors", 0.8)), api_name="/generate")
        with Image.open(gallery[0]["image"]) as gamma, Image.open(saved) as alpha_beta:
            assert gamma.size == (64, 64) and gamma.tobytes() != alpha_beta.tobytes()
    finally:
        demo.close()
        (settings.lora_dir / "gamma.safetensors").unlink(missing_ok=True)


def test_train_tab(tmp_path):
    from sdlora.ui.app.train import preset_choices, preset_values, run_train

    local = _train_settings(tmp_path)
    engine = Engine(local)
    assert preset_choices(local) == ["mini.toml"]
    assert preset_values(local, "mini.toml") == ("imgs", "", 4, 1e-4, 5, "lora", "", "", False, False)
    info, plot, samples = run_train(engine, "mini.toml", "imgs", "fresh", "zkstyle", 4, 1e-3, 1)
    assert "fresh.safetensors" in info and lora_choices(local) == ["fresh/fresh.safetensors"]
    run_train(engine, "mini.toml", "imgs", "weighted", "", 4, 1e-3, 1, "dora")
    assert any(k.endswith(".dora_scale") for k in load_file(str(local.lora_dir / "weighted" / "weighted.safetensors")))
    assert "stopped" not in info and plot is not None and samples == []  # the preset renders no samples
    run_train(engine, "mini.toml", "imgs", "kept", "zkstyle", 4, 1e-3, 1, "lora", "imgs", "", True, True)
    with safe_open(str(local.lora_dir / "kept" / "kept.safetensors"), "pt") as f:
        # the reg folder's 2 images and 2 drawn class images; their captions lose the trigger word
        assert f.metadata()["ss_num_reg_images"] == "4"
    assert all("zkstyle" not in p.read_text() for p in (local.lora_dir / "kept" / "class_images").glob("*.txt"))
    assert load_config(local.lora_dir / "kept" / "config.toml").train.preservation_weight == 1.0
    with pytest.raises(gr.Error, match="not a folder"):
        run_train(engine, "mini.toml", "imgs", "bad-reg", "", 4, 1e-3, 1, "lora", "missing")
    for dataset, name, message in (("imgs", "fresh", "exists"), ("../imgs", "other", "only names inside"),
                                   ("imgs", "../evil", "LoRA name"), ("missing", "other", "not a folder")):
        with pytest.raises(gr.Error, match=message):
            run_train(engine, "mini.toml", dataset, name, "", 4, 1e-3, 1)


def _train_settings(tmp_path, preset_extra: str = "") -> AppSettings:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mini.toml").write_text(
        '[data]\ndirs = ["imgs"]\nresolution = 64\nmin_bucket_reso = 64\nmax_bucket_reso = 64\n'
        'cache_latents = "none"\n[lora]\nrank = 4\n[train]\nbatch_size = 2\nmax_train_steps = 5\n'
        'save_every_n_epochs = 0\n' + preset_extra)
    (tmp_path / "imgs").mkdir()
    for src in sorted((Path(__file__).resolve().parents[1] / "sample_images").glob("*.png"))[:2]:
        shutil.copy(src, tmp_path / "imgs" / src.name)
        shutil.copy(src.with_suffix(".txt"), tmp_path / "imgs" / src.with_suffix(".txt").name)
    return AppSettings(models_dir=tmp_path / "models", lora_dir=tmp_path / "loras", out_dir=tmp_path / "out",
                       data_dir=tmp_path, configs_dir=tmp_path / "configs")


def test_train_tab_stop_loss_curve_and_samples(tmp_path):
    from sdlora.ui.app.train import run_train, stop_train

    local = _train_settings(tmp_path, 'log_every_n_steps = 2\n'  # the loss reaches the app at log steps
                                      '[sample]\nprompts = ["zkstyle, a boat --d 3"]\nsteps = 2\ngrid_weights = []\n')
    engine = Engine(local)
    assert stop_train(engine) == "No training is running."
    calls = []

    def progress(value, desc=""):  # what gr.Progress gets; Stop pressed (from another thread) during step 2
        calls.append((value, desc))
        if value == (2, 1000):
            assert "Stopping" in stop_train(engine)

    info, plot, samples = run_train(engine, "mini.toml", "imgs", "halted", "zkstyle", 4, 1e-3, 1000, progress=progress)
    run = local.lora_dir / "halted"
    assert "stopped at step 2 of 1000" in info and str(run / "halted.safetensors") in info
    assert (run / "halted.safetensors").is_file() and (run / "checkpoint-2").is_dir()
    assert [c[0] for c in calls] == [0, (1, 1000), (2, 1000)] and "loss" in calls[-1][1]
    assert plot.size[0] > 100 and (run / "loss.png").is_file()  # the loss curve, also kept in the run folder
    assert len(samples) == 1 and samples[0][0].size == (64, 64) and "step00000002" in samples[0][1]
    assert not engine.training and not engine.stop.is_set()  # the next run starts fresh


def test_train_tab_fits_the_preset_to_the_gpu(tmp_path, monkeypatch):
    import dataclasses

    import sdlora.train.plan
    from sdlora.config import load_config
    from sdlora.ui.app.train import run_train

    local = _train_settings(tmp_path)
    preset = load_config(local.configs_dir / "mini.toml", ["lora.rank=4", "lora.alpha=4.0"])  # as the tab sets it
    cached = dataclasses.replace(preset, data=dataclasses.replace(preset.data, cache_latents="memory"))
    plan = sdlora.train.plan
    between = (plan.estimate(preset).total + plan.estimate(cached).total) / 2 / plan.GB
    monkeypatch.setattr(sdlora.train.plan, "gpu_memory_gb", lambda: between)  # a card just too small for the preset
    info, _, _ = run_train(Engine(local), "mini.toml", "imgs", "fitted", "zkstyle", 4, 1e-3, 2)
    assert "trained in" in info and "fitted to the GPU's" in info and "cache latents" in info
    assert load_config(local.lora_dir / "fitted" / "config.toml").data.cache_latents == "memory"


def test_training_errors_reach_the_page_as_their_own_message():
    from sdlora.errors import PlanError, TrainingError
    from sdlora.ui.app.engine import user_errors

    for error in (TrainingError("loss or gradients were NaN/Inf; set train.max_grad_norm = 1.0"),
                  PlanError("this config needs about 9.0 GB and the GPU has 8.0 GB")):
        with pytest.raises(gr.Error) as caught, user_errors():
            raise error
        assert caught.value.message == str(error)
    with pytest.raises(gr.Error, match="unexpected KeyError"), user_errors():
        raise KeyError("a bug")


def test_caption_table_round_trip(tmp_path):
    from sdlora.ui.app.captions import load_captions, save_captions

    local = _train_settings(tmp_path)
    folder = tmp_path / "imgs"
    first, second = sorted(p.name for p in folder.glob("*.png"))
    (folder / second).with_suffix(".txt").unlink()  # a missing caption ...
    Image.new("RGB", (8, 8)).save(folder / "c.png")
    (folder / "c.txt").write_bytes(b"caf\xe9")  # ... and one that is not UTF-8: both shown empty
    rows = load_captions(local, "imgs")
    assert [r[0] for r in rows] == [first, second, "c.png"] and rows[0][1] and rows[1][1] == rows[2][1] == ""
    rows[1][1] = "zkstyle, a new caption"
    info = save_captions(local, "imgs", rows)
    assert "saved 1 " in info  # only the edited one: the unreadable c.txt is left as it was
    assert (folder / second).with_suffix(".txt").read_text() == "zkstyle, a new caption\n"
    assert (folder / "c.txt").read_bytes() == b"caf\xe9"
    assert load_captions(local, "imgs")[1][1] == "zkstyle, a new caption"
    (tmp_path / "outside.png").write_bytes(b"")
    for name in ("../outside.png", "sub/x.png", "..\\outside.png", "missing.png"):
        with pytest.raises(gr.Error, match="not an image"):
            save_captions(local, "imgs", [[first, "changed"], [name, "evil"]])
    assert not (tmp_path / "outside.txt").exists() and "changed" not in (folder / first).with_suffix(".txt").read_text()
    with pytest.raises(gr.Error, match="only names inside"):
        load_captions(local, "../")


def test_vae_override(engine, settings):
    from safetensors.torch import save_file

    from sdlora.generate.pipeline import load_pipeline
    from sdlora.ui.app.settings import OWN_VAE, vae_choices

    vae = load_pipeline("tiny-sd15").vae
    settings.models_dir.mkdir(exist_ok=True)
    vae.save_pretrained(settings.models_dir / "tiny-vae")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, settings.models_dir / "tiny-vae.safetensors")
    try:
        assert vae_choices(settings) == [OWN_VAE, "tiny-vae", "tiny-vae.safetensors"]
        assert "tiny-vae.safetensors" not in model_choices(settings)  # a VAE is not a base model
        own = _generated(engine)
        for name in ("tiny-vae", "tiny-vae.safetensors"):
            images, _, info = run_generate(engine, *COMMON, 3, 1, *slots(), vae=name)
            assert engine.vae == name and "base model loading" in info  # cached by (model, VAE)
            with Image.open(images[0][0]) as image:
                assert image.convert("RGB").tobytes() == own
                assert image.info["parameters"].endswith(f"Model: tiny-sd15, VAE: {name}")  # as A1111 writes it
            assert read_png_parameters(settings, images[0][0])[10] == name
        images, _, info = run_generate(engine, *COMMON, 3, 1, *slots(), vae=OWN_VAE)
        assert engine.vae == "" and "base model loading" in info
        assert read_png_parameters(settings, images[0][0])[10] == OWN_VAE
        with pytest.raises(gr.Error, match="not a VAE"):
            run_generate(engine, *COMMON, 3, 1, *slots(), vae="../tiny-vae")
    finally:
        shutil.rmtree(settings.models_dir / "tiny-vae")
        (settings.models_dir / "tiny-vae.safetensors").unlink()


def test_uploads_are_checked_before_anything_is_written(tmp_path):
    from sdlora.ui.app.captions import add_uploads

    local = _train_settings(tmp_path)
    staged = tmp_path / "staged"
    staged.mkdir()
    Image.new("RGB", (16, 16), "red").save(staged / "new.png")
    (staged / "new.txt").write_text("zkstyle, a red square")
    (staged / "broken.png").write_bytes(b"\x89PNG not really")
    (staged / "run.exe").write_bytes(b"MZ")
    for bad, message in (("broken.png", "unreadable"), ("run.exe", "not an image")):
        with pytest.raises(gr.Error, match=message):
            add_uploads(local, "uploaded", [str(staged / "new.png"), str(staged / bad)])
        assert not (tmp_path / "uploaded").exists()  # a bad file stops the whole upload
    rows, info = add_uploads(local, "uploaded", [str(staged / "new.png"), str(staged / "new.txt")])
    assert rows == [["new.png", "zkstyle, a red square"]] and "added 2" in info
    assert (tmp_path / "uploaded" / "new.png").read_bytes() == (staged / "new.png").read_bytes()
    with pytest.raises(gr.Error, match="already in"):
        add_uploads(local, "uploaded", [str(staged / "new.png")])
    with pytest.raises(gr.Error, match="only names inside"):
        add_uploads(local, "../elsewhere", [str(staged / "new.png")])


def test_lora_browser_facts_families_and_switching_on(engine, settings):
    import json

    import torch
    from safetensors.torch import save_file

    from sdlora.ui.app.generate import insert_trigger, lora_details, slot_switch, switch_on
    from sdlora.ui.app.loras import describe_lora, lora_table

    info = describe_lora(settings, ALPHA)
    assert (info.family, info.method, info.rank, info.trained) == ("SD 1.x", "LoRA", "4", "epoch 2, step 2")
    assert info.size == (settings.lora_dir / ALPHA).stat().st_size
    assert info.triggers[0] == "zkstyle" and info.triggers[-1] == "alpha"  # the top caption tag ... the output name
    # An SDXL LoRA (its te1/te2 keys say so) with a trigger phrase and caption tags.
    xl = settings.lora_dir / "xl.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(8, 32),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 8)}, xl,
              metadata={"modelspec.trigger_phrase": "xlstyle",
                        "ss_tag_frequency": json.dumps({"5_xl": {"xlstyle": 9, "a red car": 4, "night": 6}})})
    try:
        rows = {row[0]: row for row in lora_table(settings, "tiny-sd15")}
        assert rows[ALPHA][1:6] == ["SD 1.x", "yes", "LoRA", "4", f"{info.size / 2**20:.1f} MB"]
        assert rows["xl.safetensors"][2] == "no (SDXL)"
        assert rows["xl.safetensors"][7] == "xlstyle, night, a red car"  # the phrase, then tags by frequency
        assert {r[0]: r[2] for r in lora_table(settings, "tiny-sdxl")}[ALPHA] == "no (SD 1.x)"
        # Another family cannot be switched on: its slot box is locked, "switch on" refuses with the fix.
        assert slot_switch(settings, "tiny-sd15", "xl.safetensors").interactive is False
        assert slot_switch(settings, "tiny-sdxl", "xl.safetensors").interactive is True
        with pytest.raises(gr.Error, match="a LoRA for SDXL and the base model is SD 1.x; choose a SDXL base model"):
            switch_on(settings, "tiny-sd15", "xl.safetensors", *[False, None] * SLOTS)
        assert switch_on(settings, "tiny-sd15", ALPHA, True, BETA, False, BETA, False, None, False, None) == [
            True, BETA, True, ALPHA, False, None, False, None]  # the first slot that is off
        assert switch_on(settings, "tiny-sd15", ALPHA, True, BETA, False, ALPHA, *[True, BETA] * 2)[2:4] == [
            True, ALPHA]  # the slot that has it already
        with pytest.raises(gr.Error, match="all 4 LoRA slots are on"):
            switch_on(settings, "tiny-sd15", ALPHA, *[True, BETA] * SLOTS)
        image, text, _, words = lora_details(settings, "tiny-sd15", "xl.safetensors")
        assert image is None and "⚠" in text and "No picture yet" in text and words[0] == "xlstyle"
        assert insert_trigger("a boat", 0, words) == "xlstyle, a boat"
        assert insert_trigger("xlstyle, a boat", 0, words) == "xlstyle, a boat"  # there already
        assert insert_trigger("", 2, words) == "a red car"
    finally:
        xl.unlink()


def test_lora_pictures_samples_beside_the_file_else_the_first_image_made_with_it(engine, settings):
    from sdlora.ui.app.generate import lora_details
    from sdlora.ui.app.loras import lora_preview

    alpha, beta = settings.lora_dir / ALPHA, settings.lora_dir / BETA
    for lora in (alpha, beta):
        lora.with_name(f"{lora.stem}.preview.png").unlink(missing_ok=True)
    assert lora_preview(alpha) is None
    first, _, _ = run_generate(engine, *COMMON, 21, 1, *slots((ALPHA, 0.8), (BETA, 0.0)))
    preview = alpha.with_name("alpha.preview.png")
    assert preview.read_bytes() == Path(first[0][0]).read_bytes()  # as A1111 caches it, with its parameters
    assert lora_preview(beta) is None  # at weight 0 it drew nothing of its own
    run_generate(engine, *COMMON, 22, 1, *slots(("beta/beta.safetensors", 0.5)))
    assert lora_preview(beta) == beta.with_name("beta.preview.png")
    run_generate(engine, *COMMON, 23, 1, *slots((ALPHA, 1.0)))
    assert preview.read_bytes() == Path(first[0][0]).read_bytes()  # the first image stays the picture
    samples = alpha.parent / "samples"
    samples.mkdir(exist_ok=True)
    try:
        for step, color in ((1, "red"), (2, "blue")):
            Image.new("RGB", (64, 64), color).save(samples / f"step{step:08d}-00.png")
        assert lora_preview(alpha) == samples / "step00000002-00.png"  # the run's last samples come first
        image, _, _, _ = lora_details(settings, "tiny-sd15", ALPHA)
        assert image.getpixel((0, 0)) == (0, 0, 255)
    finally:
        shutil.rmtree(samples)


def _advanced(local, **changes) -> list:
    """The Train tab's advanced fields as a preset fills them, with `changes` (keys as in ADVANCED_KEYS, dots as __)."""
    from sdlora.ui.app.train import ADVANCED_KEYS, preset_advanced

    values = dict(zip(ADVANCED_KEYS, preset_advanced(local, "mini.toml")))
    values.update({key.replace("__", "."): value for key, value in changes.items()})
    return [values[key] for key in ADVANCED_KEYS]


def test_advanced_options_are_validated_as_the_cli_does_and_saved_as_a_preset_sdlora_train_runs(tmp_path):
    from sdlora.errors import ConfigError
    from sdlora.ui.app.train import (
        advanced_changes,
        preset_advanced,
        preset_choices,
        preset_values,
        run_train,
        save_preset,
        train_config,
    )

    local = _train_settings(tmp_path)
    fields = ["mini.toml", "imgs", "saved", "zkstyle", 4, 1e-3, 1]
    advanced = _advanced(local, lora__targets="attn_mlp", lora__train_text_encoder=False, lora__init="gaussian",
                         train__loraplus_lr_ratio=4.0, sample__prompts="zkstyle, a boat --d 3\n\n a tent ",
                         train__save_every_n_steps=1.0,  # a whole float, as gr.Number sends it
                         train__ema_decay=0.9, model__clip_skip=2.0, train__min_timestep=100.0,
                         train__max_timestep=900.0, train__new_tokens=" zkw, <q>,", train__embedding_lr=5e-3)
    cfg = train_config(local, *fields, advanced=advanced)
    assert (cfg.lora.targets, cfg.lora.train_text_encoder, cfg.lora.init, cfg.train.loraplus_lr_ratio) == (
        "attn_mlp", False, "gaussian", 4.0)
    assert (cfg.train.ema_decay, cfg.model.clip_skip, cfg.train.min_timestep, cfg.train.max_timestep) == (
        0.9, 2, 100, 900)
    assert (cfg.train.new_tokens, cfg.train.embedding_lr) == (["zkw", "<q>"], 5e-3)
    assert cfg.data.resolution == 64  # the field's text "64"
    assert advanced_changes(_advanced(local, data__resolution=" 64, 128"))["data.resolution"] == [64, 128]
    for empty in (None, 0, 0.0):  # an emptied number field comes from the page as 0
        unset = train_config(local, *fields, advanced=_advanced(
            local, model__clip_skip=empty, train__max_timestep=empty, train__text_encoder_lr=empty,
            train__embedding_lr=empty))
        assert (unset.model.clip_skip, unset.train.max_timestep, unset.train.text_encoder_lr,
                unset.train.embedding_lr) == (None, None, None, None)
    assert cfg.sample.prompts == ["zkstyle, a boat --d 3", "a tent"] and cfg.train.save_every_n_steps == 1
    # A bad value is refused with the CLI's own line (the same config code), through the app's error path.
    for key, bad, override in (("train__batch_size", 0.0, "train.batch_size=0"),
                               ("data__resolution", 64.5, "data.resolution=64.5"),
                               ("train__ema_decay", 1.0, "train.ema_decay=1.0")):
        with pytest.raises(ConfigError) as cli:
            load_config(None, [override])
        with pytest.raises(gr.Error) as app:
            run_train(Engine(local), *fields, advanced=_advanced(local, **{key: bad}))
        assert app.value.message == str(cli.value)
    info, presets = save_preset(local, "mine", *fields, advanced=advanced)
    path = local.configs_dir / "mine.toml"
    assert presets == ["mine.toml", "mini.toml"] == preset_choices(local) and str(path) in info
    assert load_config(path) == cfg  # the preset is the config the tab made
    assert preset_values(local, "mine.toml")[:5] == ("imgs", "zkstyle", 4, 1e-3, 1)  # the folder as the tab names it
    assert preset_advanced(local, "mine.toml") == tuple(
        {"zkstyle, a boat --d 3\n\n a tent ": "zkstyle, a boat --d 3\na tent", " zkw, <q>,": "zkw, <q>"}.get(v, v)
        if isinstance(v, str) else v for v in advanced)
    for name, message in (("mine", "exists"), ("../evil", "preset name"), ("", "preset name")):
        with pytest.raises(gr.Error, match=message):
            save_preset(local, name, *fields, advanced=advanced)
    assert main(["train", str(path)]) == 0  # `sdlora train` runs it, into the LoRA folder
    lora = local.lora_dir / "saved" / "saved.safetensors"
    assert lora.is_file() and not any(k.startswith("lora_te") for k in load_file(str(lora)))  # no text encoder
    assert {k for k in load_file(str(lora)) if k.startswith("bundle_emb.")} == {  # the new words, no encoder LoRA
        "bundle_emb.zkw.string_to_param.*", "bundle_emb.<q>.string_to_param.*"}
    assert len(list((local.lora_dir / "saved" / "samples").glob("*.png"))) == 2


def test_resume_a_stopped_run_from_the_app(tmp_path):
    from sdlora.ui.app.train import resumable_runs, run_resume, run_train, stop_train

    local = _train_settings(tmp_path, "log_every_n_steps = 1\n")
    engine = Engine(local)
    calls = []

    def progress(value, desc=""):
        calls.append(value)
        if value == (2, 4) and not engine.stop.is_set():
            stop_train(engine)

    assert resumable_runs(local) == []
    info, _, _ = run_train(engine, "mini.toml", "imgs", "halted", "zkstyle", 4, 1e-3, 4, progress=progress)
    assert "stopped at step 2 of 4" in info and resumable_runs(local) == [("halted: step 2 of 4", "halted")]
    calls.clear()
    info, plot, _ = run_resume(engine, "halted", progress=lambda value, desc="": calls.append(value))
    assert info.startswith("resumed halted, trained in") and calls == [0, (3, 4), (4, 4)]  # on from step 3
    assert plot is not None and (local.lora_dir / "halted" / "halted.safetensors").is_file()
    for run in ("../halted", "missing", ""):
        with pytest.raises(gr.Error, match="not a run with a checkpoint"):
            run_resume(engine, run)


def test_captions_of_kohya_repeat_folders(tmp_path):
    from sdlora.ui.app.captions import load_captions, save_captions

    local = _train_settings(tmp_path)
    for folder in ("10_cat", "3_dog"):
        (tmp_path / "kohya" / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "kohya" / folder / "a.png")
    (tmp_path / "kohya" / "10_cat" / "a.txt").write_text("a cat\n")
    rows = load_captions(local, "kohya")
    assert rows == [["10_cat/a.png", "a cat"], ["3_dog/a.png", ""]]
    assert "saved 1 " in save_captions(local, "kohya", [["10_cat/a.png", "a cat"], ["3_dog/a.png", "a dog"]])
    assert (tmp_path / "kohya" / "3_dog" / "a.txt").read_text() == "a dog\n"
    for name in ("10_cat/../../imgs/x.png", "other/a.png", "10_cat"):
        with pytest.raises(gr.Error, match="not an image"):
            save_captions(local, "kohya", [[name, "evil"]])
