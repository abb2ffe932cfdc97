"""Training on the tiny models: learning happens, only adapters change, resume and caching are exact."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdlora.adapters.lora import inject_lora, trainable_parameters
from sdlora.cli import main
from sdlora.config import load_config
from sdlora.data.cache import build_latent_cache
from sdlora.data.dataset import scan_dataset
from sdlora.errors import DatasetError, TrainingError
from sdlora.models.loading import encode_prompt, load_base_model, tokenize
from sdlora.train import checkpoint as ckpt
from sdlora.train.loss import compute_loss
from sdlora.train.recipe import train, with_precision

REPO = Path(__file__).resolve().parents[1]
# Modules that get no gradient by construction: at 64 px the mid block sees a 1x1 latent (self-attention over
# one token gives q and k no gradient), and SDXL reads text encoder 1's penultimate layer, so its last is unused.
NO_GRADIENT = re.compile(r"lora_unet_(mid_block|middle_block_1)_.*attn1_to_[qk]\."
                         r"|lora_te1_text_model_encoder_layers_11_")


def make_cfg(dataset, out, *overrides):
    return load_config(None, [
        f'data.dirs=["{dataset.as_posix()}"]', "data.resolution=64", "data.min_bucket_reso=64",
        "data.max_bucket_reso=128", "lora.rank=4", "lora.alpha=4.0", "train.batch_size=2",
        "train.learning_rate=1e-3", "train.max_train_steps=6", "train.save_every_n_epochs=0",
        "train.log_every_n_steps=1", f'train.output_dir="{Path(out).as_posix()}"', "export.dtype=fp32",
        *overrides,
    ])


def adapter(path):
    return load_file(str(path))


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def test_loss_decreases_and_only_adapters_change():
    base = load_base_model("tiny-sd15")
    unet, te = base.unet, base.text_encoders[0]
    before = {k: v.clone() for k, v in {**unet.state_dict(), **te.state_dict()}.items()}
    cfg = load_config(None, ["lora.rank=8", "lora.alpha=8.0"])
    inject_lora(unet, "unet", cfg.lora)
    inject_lora(te, "text_encoder", cfg.lora)
    params = [*trainable_parameters(unet).values(), *trainable_parameters(te).values()]
    assert all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)
    ids = tokenize(base.tokenizers, ["zkstyle, a boat", "zkstyle, a tree"])
    losses = []
    for _ in range(30):
        states, _ = encode_prompt("sd1", [te], ids)
        loss = compute_loss(unet, _ddpm(base), latents, states, None, None, None,
                            torch.Generator().manual_seed(1), cfg.train, torch.float32)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses
    after = {k.replace(".base_layer", ""): v for k, v in {**unet.state_dict(), **te.state_dict()}.items()
             if "lora_" not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), "base weights changed"


def _ddpm(base):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(base.scheduler_config)


def _tb_losses(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [e.value for e in acc.Scalars("loss")]


def test_train_end_to_end_outputs(dataset, tmp_path):
    cfg = make_cfg(dataset, tmp_path / "run", "train.save_every_n_steps=3", "train.save_last_k=1",
                   'sample.prompts=["zkstyle, a cat --d 3"]', "sample.steps=2", "sample.every_n_steps=3")
    path = train(cfg)
    assert path == tmp_path / "run" / "lora.safetensors"
    tensors = adapter(path)
    assert any(k.startswith("lora_unet_") for k in tensors) and any(k.startswith("lora_te_") for k in tensors)
    ups = {k: v for k, v in tensors.items() if k.endswith("lora_up.weight") and not NO_GRADIENT.match(k)}
    assert all(v.abs().sum() > 0 for v in ups.values()), "an adapter did not train"
    files = sorted(p.name for p in (tmp_path / "run").glob("*.safetensors"))
    assert files == ["lora-step00000003.safetensors", "lora.safetensors"]
    assert [p.name for p in sorted((tmp_path / "run").glob("checkpoint-*"))] == ["checkpoint-6"]
    assert sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.png")) == [
        "step00000003-00.png", "step00000006-00.png"]
    assert load_config(tmp_path / "run" / "config.toml") == with_precision(cfg)  # "auto" recorded as chosen
    assert len(_tb_losses(tmp_path / "run" / "logs" / "sdlora")) == 6


def test_same_seed_same_adapter_and_resume_is_exact(dataset, tmp_path):
    straight = train(make_cfg(dataset, tmp_path / "a", "train.checkpoint_every_n_steps=3", "train.save_last_k=0"))
    again = train(make_cfg(dataset, tmp_path / "b"))
    assert_same(adapter(straight), adapter(again))
    resumed = train(make_cfg(dataset, tmp_path / "c"), resume=str(tmp_path / "a" / "checkpoint-3"))
    assert_same(adapter(straight), adapter(resumed))


def test_resume_after_repeated_kills(dataset, tmp_path):
    """kill -9 the training process three times at random moments (saves happen every step, so some kills land
    mid-save), resume each time; every file left is complete and the result equals an uninterrupted run."""
    import random

    run = tmp_path / "killed"
    args = [sys.executable, "-m", "sdlora.cli", "train", str(_write_cfg(dataset, tmp_path, run)),
            "train.max_train_steps=24", "train.checkpoint_every_n_steps=1", "train.save_every_n_steps=1",
            "train.save_last_k=2"]
    rng = random.Random(0)
    for attempt in range(3):
        newest = ckpt.list_checkpoints(run)[-1].name if attempt else None
        proc = subprocess.Popen(args + (["--resume", "latest"] if attempt else []),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and (
            not ckpt.list_checkpoints(run) or ckpt.list_checkpoints(run)[-1].name == newest
        ):
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.4))
        proc.kill()
        assert proc.wait() != 0, "the run finished before it was killed"
        for path in run.glob("*.safetensors"):
            load_file(str(path))  # a kill never leaves a truncated LoRA
        for folder in ckpt.list_checkpoints(run):
            load_file(str(folder / "adapters.safetensors"))
    resumed = train(make_cfg(dataset, run, "train.max_train_steps=24", "train.save_every_n_steps=1",
                             "train.save_last_k=2"), resume="latest")
    straight = train(make_cfg(dataset, tmp_path / "straight", "train.max_train_steps=24"))
    assert_same(adapter(straight), adapter(resumed))


def _write_cfg(dataset, tmp_path, out):
    from sdlora.config import dump_toml

    path = tmp_path / "cfg.toml"
    path.write_text(dump_toml(make_cfg(dataset, out)))
    return path


def test_cached_latents_equal_uncached(dataset, tmp_path):
    cached = train(make_cfg(dataset, tmp_path / "mem", "data.cache_latents=memory"))
    disk = train(make_cfg(dataset, tmp_path / "disk", "data.cache_latents=disk"))
    assert list(dataset.glob(".sdlora_cache/*.safetensors"))
    disk_again = train(make_cfg(dataset, tmp_path / "disk2", "data.cache_latents=disk"))
    plain = train(make_cfg(dataset, tmp_path / "none", "data.cache_latents=none"))
    # Same latents, so the same training up to float summation order (CPU kernels vary in the last bits).
    assert_same(adapter(cached), adapter(disk), atol=1e-6)
    assert_same(adapter(disk), adapter(disk_again), atol=1e-6)
    # Uncached training encodes a batch at a time, the cache one image at a time: same latents to ~1e-6.
    assert_same(adapter(cached), adapter(plain), atol=1e-4)


def test_disk_cache_holds_exactly_the_memory_latents(dataset, sd15_path):
    cfg = make_cfg(dataset, "unused", "data.flip_aug=true")
    records = scan_dataset(cfg.data)
    vae = load_base_model(str(sd15_path)).vae
    memory = build_latent_cache(records, vae, "memory")  # mirrored too: the records' flip_aug
    written = build_latent_cache(records, vae, "disk")
    read_back = build_latent_cache(records, vae, "disk")
    assert len(memory) == 2 * len(records)
    for key, entry in memory.items():
        for other in (written[key], read_back[key]):
            assert torch.equal(entry["latents"], other["latents"])
            assert entry["target_size"] == other["target_size"]


def test_text_encoder_cache_equals_frozen_encoder(dataset, tmp_path):
    frozen = train(make_cfg(dataset, tmp_path / "frozen", "lora.train_text_encoder=false"))
    cached = train(make_cfg(dataset, tmp_path / "cached", "lora.train_text_encoder=false",
                            "data.cache_text_encoder_outputs=true"))
    assert not any(k.startswith("lora_te") for k in adapter(frozen))
    assert_same(adapter(frozen), adapter(cached), atol=1e-6)


def test_auto_precision_is_bf16_where_the_gpu_has_it(monkeypatch):
    cfg = load_config(None, [])
    assert cfg.train.mixed_precision == "auto"

    def chosen(cuda, bf16):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
        return with_precision(cfg).train.mixed_precision

    assert [chosen(False, False), chosen(True, False), chosen(True, True)] == ["no", "fp16", "bf16"]
    explicit = load_config(None, ["train.mixed_precision=fp16"])
    assert with_precision(explicit) is explicit


@pytest.mark.smoke
def test_text_encoder_learns_under_gradient_checkpointing(dataset, tmp_path):
    path = train(make_cfg(dataset, tmp_path / "gc", "train.gradient_checkpointing=true", "train.max_train_steps=2"))
    ups = [v for k, v in adapter(path).items()
           if k.startswith("lora_te_") and k.endswith("lora_up.weight") and not NO_GRADIENT.match(k)]
    assert ups and all(v.abs().sum() > 0 for v in ups)


def test_sdxl_trains_both_text_encoders(dataset, tmp_path):
    path = train(make_cfg(dataset, tmp_path / "xl", "model.base_model=tiny-sdxl", "train.max_train_steps=8"))
    tensors = adapter(path)
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        ups = [v for k, v in tensors.items()
               if k.startswith(prefix) and k.endswith("lora_up.weight") and not NO_GRADIENT.match(k)]
        assert ups and all(v.abs().sum() > 0 for v in ups), prefix
    losses = _tb_losses(tmp_path / "xl" / "logs" / "sdlora")
    assert len(losses) == 8 and all(loss == loss for loss in losses)


@pytest.mark.parametrize("overrides", [
    ["train.gradient_accumulation_steps=2", "train.max_train_steps=3"],
    ["train.optimizer=adafactor", "train.lr_scheduler=cosine", "train.lr_warmup_steps=2"],
    ["train.min_snr_gamma=5.0", "train.noise_offset=0.05", "train.loraplus_lr_ratio=4.0", "lora.use_rslora=true"],
    ["model.prediction_type=v_prediction", "train.zero_terminal_snr=true", "lora.targets=all"],
    ["data.flip_aug=true", "data.shuffle_caption=true", "data.keep_tokens=1", "data.caption_dropout=0.2",
     "train.masked_loss=true", "data.cache_latents=none", "data.random_crop=true"],
])
def test_training_options_run(dataset, tmp_path, overrides):
    path = train(make_cfg(dataset, tmp_path / "opt", *overrides))
    losses = _tb_losses(tmp_path / "opt" / "logs" / "sdlora")
    assert losses and all(0 < loss < 10 for loss in losses)
    assert all(torch.isfinite(v).all() for v in adapter(path).values())


def test_cli_reports_bad_dataset_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sdlora.cli", "train", str(REPO / "configs" / "tiny.toml"),
         f'data.dirs=["{(tmp_path / "nope").as_posix()}"]'],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "nope" in result.stderr
    bad = subprocess.run([sys.executable, "-m", "sdlora.cli", "train", str(REPO / "configs" / "tiny.toml"),
                          "lora.rnak=4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "lora.rnak" in bad.stderr and "Traceback" not in bad.stderr


def test_dataset_problem_found_by_the_doctor_stops_training_before_the_model_loads(dataset, tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    shutil.copytree(dataset, folder)
    first = sorted(folder.glob("*.png"))[0]
    Image.new("L", (8, 8), 255).save(first.with_name(first.stem + "_mask.png"))  # wrong size: fails only on decode
    import sdlora.train.recipe as train_module

    monkeypatch.setattr(train_module, "load_base_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(DatasetError, match=rf"{first.stem}_mask\.png.*sdlora doctor"):
        train(make_cfg(folder, tmp_path / "out", "train.masked_loss=true"))


def _nan_at(monkeypatch, bad_calls):
    """Make compute_loss return NaN on the given (1-based) calls; one call per step at gradient_accumulation 1."""
    import sdlora.train.recipe as train_module

    real, calls = train_module.compute_loss, []

    def compute_loss(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) in bad_calls else loss

    monkeypatch.setattr(train_module, "compute_loss", compute_loss)


@pytest.fixture(params=["host", "device"])
def skip_path(request, monkeypatch):
    """Both ways a NaN step is skipped: on the host (foreach AdamW on a CPU: the flag is read every step) and on
    the device (fused AdamW, what a GPU run gets: the update is skipped in the kernel, flags are read at checks)."""
    if request.param == "device":
        import sdlora.train.recipe as train_module

        real = train_module.make_optimizer
        monkeypatch.setattr(train_module, "make_optimizer",
                            lambda t, trained, fused, **kwargs: real(t, trained, fused=True, **kwargs))
    return request.param


def test_nonfinite_step_is_skipped_and_leaves_the_weights_untouched(dataset, tmp_path, monkeypatch, skip_path):
    two_steps = train(make_cfg(dataset, tmp_path / "two", "train.max_train_steps=2"))
    _nan_at(monkeypatch, {3})
    third_skipped = train(make_cfg(dataset, tmp_path / "skipped", "train.max_train_steps=3"))
    assert_same(adapter(two_steps), adapter(third_skipped))


def test_persistent_nan_stops_with_the_cause_and_keeps_good_checkpoints(dataset, tmp_path, monkeypatch,
                                                                      skip_path):
    _nan_at(monkeypatch, set(range(3, 100)))
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"NaN/Inf for 3 steps in a row \(steps 3-5\).*learning_rate"):
        train(make_cfg(dataset, out, "train.max_train_steps=20", "train.max_nonfinite_steps=3",
                       "train.checkpoint_every_n_steps=2"))
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert [p.name for p in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    for folder in checkpoints:
        assert all(torch.isfinite(v).all() for v in load_file(str(folder / "adapters.safetensors")).values())


def test_nonfinite_flags_reach_the_host_only_at_check_points_with_a_fused_optimizer(dataset, tmp_path, monkeypatch,
                                                                                    skip_path, caplog):
    import sdlora.train.deferred as deferred

    reads = []
    real = deferred.SkippedSteps.settle

    def settle(self):
        if self.pending:
            reads.append([step for step, _, _ in self.pending])
        return real(self)

    monkeypatch.setattr(deferred.SkippedSteps, "settle", settle)
    _nan_at(monkeypatch, {4})
    train(make_cfg(dataset, tmp_path / "run", "train.max_train_steps=12", "train.log_every_n_steps=5"))
    if skip_path == "device":  # log steps 5 and 10, and the last step
        assert reads == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12]]
    else:
        assert reads == [[step] for step in range(1, 13)]
    assert "step 4: non-finite loss or gradient, the update was skipped" in caplog.text
    assert len(_tb_losses(tmp_path / "run" / "logs" / "sdlora")) == 3  # steps 5, 10, 12


def test_image_decoding_workers_train_and_resume_like_the_main_process(dataset, tmp_path):
    uncached = ['data.cache_latents="none"', "train.max_train_steps=4"]
    straight = train(make_cfg(dataset, tmp_path / "a", *uncached))
    workers = [*uncached, "data.num_workers=2", "train.checkpoint_every_n_steps=2"]
    train(make_cfg(dataset, tmp_path / "b", *workers, "train.max_train_steps=2"))  # stops mid-epoch (3 batches)
    resumed = train(make_cfg(dataset, tmp_path / "b", *workers), resume="latest")
    assert_same(adapter(straight), adapter(resumed))


def test_full_disk_stops_training_with_one_line_and_keeps_the_last_checkpoint(dataset, tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    import sdlora.atomic
    from sdlora.cli import main

    out = tmp_path / "run"
    config = _write_cfg(dataset, tmp_path, out)
    assert main(["train", str(config), "train.max_train_steps=2", "train.checkpoint_every_n_steps=2"]) == 0
    before = load_file(str(out / "checkpoint-2" / "adapters.safetensors"))
    full = namedtuple("Usage", "total used free")(10**12, 10**12, 0)
    monkeypatch.setattr(sdlora.atomic.shutil, "disk_usage", lambda _: full)
    capsys.readouterr()
    code = main(["train", str(config), "train.max_train_steps=4", "train.checkpoint_every_n_steps=2",
                 "--resume", "latest"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "not enough disk space" in err[-1] and "Traceback" not in "\n".join(err)
    assert_same(before, load_file(str(out / "checkpoint-2" / "adapters.safetensors")))
    assert not (out / "checkpoint-4").exists() and not list(out.glob(".checkpoint-*"))


def test_shards_cover_the_epoch_once_per_process_group():
    from types import SimpleNamespace

    from sdlora.train.recipe import _shard

    batches = [[0, 1], [2, 3], [4, 5], [6, 7]]
    shards = [_shard(batches, SimpleNamespace(num_processes=2, process_index=rank)) for rank in (0, 1)]
    assert shards == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    odd = [_shard(batches[:3], SimpleNamespace(num_processes=2, process_index=rank)) for rank in (0, 1)]
    assert len(odd[0]) == len(odd[1]) == 2  # padded by cycling: every rank steps the same number of times


def test_two_processes_train_one_lora(dataset, tmp_path):
    """torchrun with 2 CPU processes (gloo): both finish, each step sees both shards, one set of files."""
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sdlora.cli",
         "train", str(_write_cfg(dataset, tmp_path, out)), "train.max_train_steps=3", "train.report=false"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes: 2" in result.stderr
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["lora.safetensors"]
    assert json.loads((out / "train_stats.json").read_text())["images_per_step"] == 2 * 2
    assert result.stdout.count("LoRA written to") == 1


def test_on_step_reports_every_step_with_the_logged_loss_and_can_stop(dataset, tmp_path):
    seen = []

    def on_step(info):
        seen.append(info)
        return info["step"] < 3  # False at step 3: stop

    out = tmp_path / "stopped"
    path = train(make_cfg(dataset, out, "train.max_train_steps=10", "train.log_every_n_steps=2"), on_step=on_step)
    assert [i["step"] for i in seen] == [1, 2, 3] and all(i["max_steps"] == 10 for i in seen)
    assert [i["loss"] is not None for i in seen] == [False, True, False]  # the logged mean, at log steps only
    assert seen[1]["loss"] > 0 and all(i["lr"] == 1e-3 for i in seen)
    assert path.is_file() and load_file(str(path))  # the LoRA as it was at the stop
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-3"]  # resumable from there


def test_loraplus_param_groups_have_the_intended_learning_rates():
    from sdlora.train.optimizer import make_optimizer

    base = load_base_model("tiny-sd15")
    cfg = load_config(None, ["lora.method=dora", "train.loraplus_lr_ratio=16.0", "train.unet_lr=1e-4",
                             "train.text_encoder_lr=5e-5"])
    trained = {"unet": base.unet, "text_encoder": base.text_encoders[0]}
    for name, model in trained.items():
        inject_lora(model, name, cfg.lora)
    groups = {g["name"]: g for g in make_optimizer(cfg.train, trained, fused=False).param_groups}
    assert {name: g["lr"] for name, g in groups.items()} == pytest.approx(
        {"unet": 1e-4, "unet_up": 16e-4, "text_encoder": 5e-5, "text_encoder_up": 80e-5})
    for name, model in trained.items():
        params = trainable_parameters(model)
        ups = {id(p) for n, p in params.items() if ".lora_B." in n}
        assert {id(p) for p in groups[f"{name}_up"]["params"]} == ups  # B only; A and DoRA's magnitude at the base lr
        assert {id(p) for p in groups[name]["params"]} == {id(p) for p in params.values()} - ups


# ----------------------------------------------------------------------------------------------------------------
# --init-lora: continuing others' files
# ----------------------------------------------------------------------------------------------------------------


def _dynamic_rank_file(path: Path) -> Path:
    """A LoRA such as kohya's resize_lora.py (dynamic ranks) and LoCon (conv_dim) write: every module its own rank
    and alpha, the convs another rank than the linear layers, UNet and text encoder."""
    from test_lora_tools import SD1, random_layers

    from sdlora.adapters.export import save_kohya_lora
    from sdlora.adapters.lora import LoraWeights

    layers = random_layers(load_base_model("tiny-sd15"), "all", 4, 1.0, 0, only=("down_blocks.1.", "layers.0."))
    for component in layers.values():
        for i, (name, w) in enumerate(component.items()):
            rank = 3 if w.down.dim() == 4 and w.down.shape[-1] == 3 else 1 + i % 4
            component[name] = LoraWeights(w.down[:rank], w.up[:, :rank], rank * (0.5 + i % 3))
    return save_kohya_lora(layers, "sd1", path, SD1, torch.float32)


@pytest.mark.smoke
def test_init_lora_keeps_each_modules_rank_and_alpha(dataset, tmp_path):
    from test_lora_tools import file_deltas

    start = _dynamic_rank_file(tmp_path / "dynamic.safetensors")
    # A learning rate that cannot move the weights: the export is then the file it started from.
    out = train(make_cfg(dataset, tmp_path / "run", "lora.rank=8", "lora.targets=attn", "train.max_train_steps=1",
                         "train.learning_rate=1e-12"), init_lora=start)
    before, after = load_file(str(start)), load_file(str(out))
    downs = {k: v.shape for k, v in before.items() if k.endswith("lora_down.weight")}
    assert len({shape[0] for shape in downs.values()}) == 4  # ranks 1-4 on linear layers, 3 on the 3x3 convs
    assert {k: after[k].shape for k in downs} == downs and all(after[k] == before[k] for k in before if ".alpha" in k)
    start_deltas, out_deltas = file_deltas(start), file_deltas(out)
    for name, delta in out_deltas.items():
        # The file's modules as they were; the config's other targets start at zero (lora_B = 0).
        torch.testing.assert_close(delta, start_deltas.get(name, torch.zeros_like(delta)), atol=1e-6, rtol=1e-5)
    assert set(start_deltas) < set(out_deltas)


def _toml(path: Path, dataset, *lines: str) -> Path:
    path.write_text(f'[data]\ndirs = ["{dataset.as_posix()}"]\nresolution = 64\nmin_bucket_reso = 64\n'
                    f'[train]\noutput_dir = "{(path.parent / "out").as_posix()}"\nmax_train_steps = 1\n'
                    + "\n".join(lines))
    return path


def test_init_lora_that_cannot_continue_is_refused_in_one_line_before_the_model_loads(dataset, tmp_path, capsys,
                                                                                      monkeypatch):
    from safetensors.torch import save_file

    import sdlora.train.recipe as train_module

    start = load_file(str(_dynamic_rank_file(tmp_path / "dynamic.safetensors")))
    down = next(k for k in start if k.startswith("lora_unet_") and k.endswith("lora_down.weight"))
    unet_only = {k: v for k, v in start.items() if k.startswith("lora_unet_")}
    files = {
        "dora": ({**unet_only, down.replace("lora_down.weight", "dora_scale"): torch.ones(32, 1)}, [],
                 'set lora.method = "dora"'),
        "text encoder": (start, ["lora.train_text_encoder=false"], "set lora.train_text_encoder = true"),
        "no pair": ({k: v for k, v in unet_only.items() if k != down}, [], "has no down weight"),
        "loha": ({"lora_unet_x.hada_w1_a": torch.ones(2, 2)}, [], "LoHa"),
    }
    monkeypatch.setattr(train_module, "load_base_model", lambda *a, **k: pytest.fail("model loaded"))
    config = _toml(tmp_path / "run.toml", dataset)
    capsys.readouterr()  # what building the file printed
    for name, (tensors, overrides, message) in files.items():
        path = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        save_file(tensors, str(path))
        assert main(["train", str(config), *overrides, "--init-lora", str(path)]) == 1, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("sdlora: error: ") and message in err and path.name in err


def test_init_lora_for_another_model_is_one_line(dataset, tmp_path, capsys):
    from safetensors.torch import save_file

    stray = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "stray.safetensors"
    save_file({f"{stray}.lora_down.weight": torch.ones(2, 32), f"{stray}.lora_up.weight": torch.ones(32, 2)},
              str(path))
    assert main(["train", str(_toml(tmp_path / "run.toml", dataset)), "--init-lora", str(path)]) == 1
    last = capsys.readouterr().err.splitlines()[-1]  # in-process, after transformers' loading bars
    assert last.startswith("sdlora: error: ") and "stray.safetensors" in last and stray in last
