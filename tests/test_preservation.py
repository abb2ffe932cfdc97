"""Keeping what the base model knows: regularization images (kohya's pairing and loss weight), auto class images,
base-prediction preservation, and early stopping on the validation loss."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import assert_same, make_cfg

from sdlora.config import DataConfig, LoraConfig, load_config
from sdlora.data.dataset import ImageRecord, pair_regularization, scan_dataset, without_trigger
from sdlora.data.doctor import diagnose, format_report
from sdlora.data.loader import load_batch
from sdlora.errors import ConfigError
from sdlora.models.loading import load_base_model
from sdlora.train.preservation import adapters_off, preservation_prompts
from sdlora.train.recipe import train
from sdlora.train.validation import best, stalled

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("single_thread_plain_kernels")


def record(name: str, repeats: int = 1, bucket=(64, 64), caption: str = "a red circle") -> ImageRecord:
    return ImageRecord(Path(name), caption, repeats, bucket, bucket, None, "imgs")


def plain_copies(folder: Path, count: int, size=None) -> Path:
    """`count` sample images with their captions minus the trigger word: a regularization folder."""
    folder.mkdir(parents=True)
    for src in sorted((REPO / "sample_images").glob("*.png"))[:count]:
        image = Image.open(src)
        (image.resize(size) if size else image).save(folder / src.name)
        caption = src.with_suffix(".txt").read_text(encoding="utf-8")
        (folder / src.with_suffix(".txt").name).write_text(without_trigger(caption, "zkstyle"), encoding="utf-8")
    return folder


# --- regularization images --------------------------------------------------------------------------------------


def test_reg_images_are_repeated_to_match_the_training_images_as_kohya_does():
    train_set = [record(f"t{i}", repeats=2) for i in range(6)]  # 12 with repeats
    few = pair_regularization(train_set, [record(f"r{i}") for i in range(5)])
    assert [r.repeats for r in few] == [3, 3, 2, 2, 2] and all(r.is_reg for r in few)
    folder_repeats = pair_regularization(train_set, [record("a", repeats=5), record("b", repeats=5)])
    assert [r.repeats for r in folder_repeats] == [6, 6]  # the folders' repeats first, then one more each in turn
    many = pair_regularization(train_set, [record(f"r{i}") for i in range(20)])
    assert [r.path.name for r in many] == [f"r{i}" for i in range(12)]  # the rest are never used
    assert pair_regularization(train_set, []) == []


def test_the_trigger_word_is_replaced_as_a_tag_or_a_word():
    assert without_trigger("zkstyle, a red circle, on white", "zkstyle") == "a red circle, on white"
    assert without_trigger("a photo of sks dog, smiling", "sks", "") == "a photo of dog, smiling"
    assert without_trigger("ZKstyle painting of a cat", "zkstyle", "watercolor") == "watercolor painting of a cat"
    assert without_trigger("zkstyles, zkstyle-two", "zkstyle") == "zkstyles, zkstyle-two"  # whole words only


def test_reg_captions_get_no_trigger_prefix_and_their_loss_weight(dataset, tmp_path):
    reg = plain_copies(tmp_path / "reg", 2)
    cfg = make_cfg(dataset, tmp_path / "run", f'data.reg_dirs=["{reg.as_posix()}"]', "data.caption_prefix=zkstyle",
                   "train.prior_loss_weight=0.25")
    records = scan_dataset(cfg.data) + pair_regularization(scan_dataset(cfg.data),
                                                           scan_dataset(dataclasses.replace(cfg.data, dirs=[str(reg)])))
    tokenizers = load_base_model("tiny-sd15").tokenizers
    batch = load_batch(records, [0, len(records) - 1], cfg, 0, 0, None, tokenizers)
    assert batch["captions"][0].startswith("zkstyle, ") and "zkstyle" not in batch["captions"][1]
    assert batch["loss_weights"].tolist() == [1.0, 0.25]
    assert "loss_weights" not in load_batch(records, [0, 1], cfg, 0, 0, None, tokenizers)


def test_training_with_reg_images_records_them_as_kohya_does(dataset, tmp_path):
    reg = plain_copies(tmp_path / "3_plain", 4)
    path = train(make_cfg(dataset, tmp_path / "run", f'data.reg_dirs=["{reg.as_posix()}"]'))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_train_images"] == "6" and meta["ss_num_reg_images"] == "12"  # 4 images x 3 repeats
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"3_plain": {"n_repeats": 3, "img_count": 4}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"imgs": {"n_repeats": 1, "img_count": 6}}
    assert meta["ss_prior_loss_weight"] == "1.0"


def test_the_doctor_checks_a_reg_set(dataset, tmp_path):
    reg = plain_copies(tmp_path / "reg", 8)
    (reg / sorted(reg.glob("*.txt"))[0].name).write_text("zkstyle, a red circle", encoding="utf-8")
    Image.fromarray(np.full((64, 256, 3), 200, np.uint8)).save(reg / "wide.png")
    report = diagnose(DataConfig(dirs=[str(dataset)], reg_dirs=[str(reg)], caption_prefix="zkstyle",
                                 resolution=128, min_bucket_reso=64, max_bucket_reso=256, bucket_step=64))
    by_check = {f.check: f for f in report.findings}
    assert by_check["reg-count"].severity == "warning" and "9 regularization images" in str(by_check["reg-count"])
    assert by_check["reg-trigger"].path == sorted(reg.glob("*.txt"))[0]
    assert "256x64 bucket" in str(by_check["reg-bucket"]) and "no training image" in str(by_check["reg-bucket"])
    assert len(report.reg_records) == 9 and len(report.records) == 6
    assert format_report(report).startswith("6 images (6 with repeats) + 9 regularization images")


def test_reg_settings_are_checked_at_load():
    with pytest.raises(ConfigError, match=r"data.class_images_per_image: .*set data.trigger_word"):
        load_config(None, ["data.class_images_per_image=1"])
    with pytest.raises(ConfigError, match=r"train.preservation_weight: .*train.preservation_prompts"):
        load_config(None, ["train.preservation_weight=1.0"])
    with pytest.raises(ConfigError, match=r"train.early_stopping_patience: needs validation images"):
        load_config(None, ["train.early_stopping_patience=3"])
    with pytest.raises(ConfigError, match="train.prior_loss_weight"):
        load_config(None, ["train.prior_loss_weight=-1.0"])


# --- auto class images ------------------------------------------------------------------------------------------


def test_class_images_are_drawn_once_from_the_captions_without_the_trigger(dataset, tmp_path, monkeypatch):
    shared = tmp_path / "class"
    overrides = ["data.caption_prefix=zkstyle", "data.class_images_per_image=1", "sample.steps=2",
                 f'data.class_images_dir="{shared.as_posix()}"']
    first = train(make_cfg(dataset, tmp_path / "a", *overrides))
    drawn = sorted(shared.glob("*.png"))
    assert len(drawn) == 6 and all(p.with_suffix(".txt").is_file() for p in drawn)
    captions = {p.with_suffix(".txt").read_text(encoding="utf-8") for p in drawn}
    expected = {without_trigger(p.read_text(encoding="utf-8"), "zkstyle") for p in dataset.glob("*.txt")}
    assert captions == expected
    assert "Steps: 2" in Image.open(drawn[0]).text["parameters"]  # A1111's parameters, readable by any tool
    with safe_open(str(first), "pt") as f:
        assert f.metadata()["ss_num_reg_images"] == "6"

    import sdlora.train.class_images as class_images

    monkeypatch.setattr(class_images, "load_pipeline", lambda *a, **k: pytest.fail("cached images were drawn again"))
    again = train(make_cfg(dataset, tmp_path / "b", *overrides))
    assert_same(load_file(str(first)), load_file(str(again)))
    assert sorted(shared.glob("*.png")) == drawn


# --- base-prediction preservation -------------------------------------------------------------------------------


def test_adapters_off_gives_the_base_model_and_back(sd15_path):
    from sdlora.adapters.lora import inject_lora

    base = load_base_model("tiny-sd15")
    unet = base.unet.eval()
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    states = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = unet(sample, 10, states).sample
        inject_lora(unet, "unet", LoraConfig(rank=4, alpha=4.0, targets="attn"))
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(2))
        adapted = unet(sample, 10, states).sample
        with adapters_off([unet]):
            off = unet(sample, 10, states).sample
        again = unet(sample, 10, states).sample
    assert not torch.equal(adapted, plain)
    torch.testing.assert_close(off, plain, rtol=0, atol=0)
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)
    assert all(p.requires_grad for n, p in unet.named_parameters() if "lora_" in n)


def test_preservation_prompts_are_the_captions_without_the_trigger_or_the_list_in_turn():
    cfg = load_config(None, ["data.caption_prefix=zkstyle", "data.class_word=drawing", "train.preservation_weight=1.0"])
    assert preservation_prompts(["zkstyle, a red circle", "zkstyle a cat"], 0, cfg) == ["drawing, a red circle",
                                                                                      "drawing a cat"]
    listed = load_config(None, ['train.preservation_prompts=["p0", "p1", "p2"]', "train.preservation_weight=1.0"])
    assert preservation_prompts(["a", "b"], 0, listed) == ["p0", "p1"]
    assert preservation_prompts(["a", "b"], 1, listed) == ["p2", "p0"]


@pytest.mark.parametrize("cached_text", [False, True])
def test_preservation_trains_and_resumes_exactly(dataset, tmp_path, cached_text):
    overrides = ["data.caption_prefix=zkstyle", "train.preservation_weight=1.0", "train.save_last_k=0"]
    if cached_text:
        overrides += ["lora.train_text_encoder=false", "data.cache_text_encoder_outputs=true"]
    straight = train(make_cfg(dataset, tmp_path / "a", *overrides, "train.checkpoint_every_n_steps=3"))
    plain = train(make_cfg(dataset, tmp_path / "p", *overrides[:0]))
    assert not all(torch.equal(a, b) for a, b in zip(load_file(str(straight)).values(),
                                                     load_file(str(plain)).values()))
    resumed = train(make_cfg(dataset, tmp_path / "c", *overrides), resume=str(tmp_path / "a" / "checkpoint-3"))
    assert_same(load_file(str(straight)), load_file(str(resumed)))


# --- early stopping ---------------------------------------------------------------------------------------------


def rows(*losses: float) -> list[dict]:
    return [{"step": i, "epoch": 0, "val_loss": v} for i, v in enumerate(losses)]


def test_stalled_counts_validations_without_a_lower_loss():
    assert not stalled(rows(9, 5, 4, 3), patience=2)
    assert stalled(rows(9, 5, 4, 4.5, 4.2), patience=2)
    assert not stalled(rows(9, 5, 4, 4.5, 3.9), patience=2)
    assert stalled(rows(9, 5, 4, 4.5, 3.95), patience=2, min_delta=0.1)  # not lower by more than min_delta
    assert not stalled(rows(0.1, 5, 6), patience=2)  # step 0 (untrained) does not count, nor too few
    assert not stalled(rows(9, 5, 6, 7, 8), patience=0)


def test_early_stopping_stops_and_exports_the_best_step(dataset, tmp_path):
    """With min_delta larger than any change, the run stops after `patience` validations past the first; the final
    file is the LoRA of the lowest validation loss, which a run saving every step wrote too."""
    common = ["data.validation_split=0.34", "train.validate_every_n_steps=1", "train.max_train_steps=8"]
    every = train(make_cfg(dataset, tmp_path / "every", *common, "train.save_every_n_steps=1", "train.save_last_k=0"))
    stopped = train(make_cfg(dataset, tmp_path / "stop", *common, "train.early_stopping_patience=2",
                             "train.early_stopping_min_delta=100.0"))
    with open(tmp_path / "stop" / "validation.csv", newline="") as f:
        history = [{k: float(v) if k == "val_loss" else int(v) for k, v in r.items()} for r in csv.DictReader(f)]
    assert [r["step"] for r in history] == [0, 1, 2, 3]
    lowest = best(history)
    stats = json.loads((tmp_path / "stop" / "train_stats.json").read_text())
    assert stats["early_stopping"] == {"patience": 2, "last_step": 3, "final_lora_step": lowest["step"]}
    at_best = every.parent / f"lora-step{lowest['step']:08d}.safetensors"
    assert_same(load_file(str(stopped)), load_file(str(at_best)))
    assert not (tmp_path / "stop" / "lora.best.safetensors").exists()
    assert (tmp_path / "stop" / "checkpoint-3").is_dir()
    from sdlora.ui.report import write_report

    text = write_report(tmp_path / "stop", grid=False, dataset=False).read_text()
    assert f"the final LoRA is the one of step {lowest['step']}" in text


def _saved_bytes(run, model: torch.nn.Module) -> int:
    """Bytes of the tensors autograd saves for backward while `run()` builds its graph, but `model`'s weights:
    activation memory, as the planner counts it."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def test_preservation_doubles_the_activations_as_the_memory_planner_counts(sd15_path):
    from diffusers import DDPMScheduler

    from sdlora.adapters.lora import inject_lora
    from sdlora.train import plan
    from sdlora.train.loss import compute_loss
    from sdlora.train.preservation import preservation_loss

    base = load_base_model("tiny-sd15")
    unet = base.unet
    inject_lora(unet, "unet", LoraConfig(rank=4, alpha=4.0, targets="attn"))
    scheduler = DDPMScheduler.from_config(base.scheduler_config)
    cfg = load_config(None, ["train.preservation_weight=1.0", "data.caption_prefix=zkstyle"])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))

    def denoising():
        return compute_loss(unet, scheduler, latents, states, None, None, None, torch.Generator().manual_seed(2),
                            cfg.train, torch.float32)

    def with_preservation():
        prompts = states.flip(0)  # the preservation prompts' states: other tensors than the captions'
        return denoising() + preservation_loss(unet, scheduler, latents, (prompts, None), (prompts, None), None,
                                               torch.Generator().manual_seed(3), torch.float32, [unet], cfg.train)

    assert _saved_bytes(with_preservation, unet) / _saved_bytes(denoising, unet) == pytest.approx(2.0, rel=0.01)
    traced = plan.trace(load_config(None, ['model.base_model="tiny-sd15"']))
    plain_cfg = load_config(None, ['model.base_model="tiny-sd15"'])
    kept_cfg = load_config(None, ['model.base_model="tiny-sd15"', "train.preservation_weight=1.0",
                                  "data.caption_prefix=zkstyle"])
    assert plan.estimate(kept_cfg, traced).activations == 2 * plan.estimate(plain_cfg, traced).activations


def test_doctor_command_checks_reg_folders(dataset, tmp_path, capsys):
    from sdlora.cli import main

    reg = plain_copies(tmp_path / "reg", 2)
    (reg / sorted(reg.glob("*.txt"))[1].name).write_text("a sks circle", encoding="utf-8")
    assert main(["doctor", str(dataset), "--reg", str(reg), "--trigger", "sks"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("6 images (6 with repeats) + 2 regularization images at resolution 512")
    assert f"warning [reg-trigger] {sorted(reg.glob('*.txt'))[1]}: the caption has the trigger word 'sks'" in out


def test_sdxl_preservation_moves_the_adapters_toward_the_base(dataset, tmp_path):
    """SDXL's pooled embeds and size conditioning reach the preservation passes; with a huge preservation weight
    the adapters stay nearer the base (smaller up weights) than without it."""
    common = ["model.base_model=tiny-sdxl", "data.caption_prefix=zkstyle", "train.max_train_steps=4"]
    free = load_file(str(train(make_cfg(dataset, tmp_path / "free", *common))))
    held = load_file(str(train(make_cfg(dataset, tmp_path / "held", *common, "train.preservation_weight=1000.0"))))
    ups = [k for k in free if k.startswith("lora_unet_") and k.endswith("lora_up.weight")]
    assert sum(held[k].norm() for k in ups) < sum(free[k].norm() for k in ups)
