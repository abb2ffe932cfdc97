"""Memory planner: saved-tensor accounting on meta models, the estimate's structure, and the plan it picks."""

import dataclasses
from pathlib import Path

import pytest
import torch

from sdlora.config import load_config
from sdlora.errors import PlanError
from sdlora.train import plan


def cfg_for(*overrides):
    return load_config(None, ['data.dirs=["unused"]', "data.resolution=64", "data.min_bucket_reso=64",
                              "train.mixed_precision=fp16", *overrides])


def test_trace_counts_each_saved_activation_once_and_no_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(2, 8)
    saved, _ = plan._trace(model, lambda: model(x))
    # Linear 1 saves its input x (2x8 fp32), ReLU its output (2x16), which Linear 2 saves again (not recounted);
    # the weights autograd also saves are parameters and are not activations.
    assert saved == (2 * 8 + 2 * 16) * 4


def test_attention_is_counted_as_flash_kernels_store_it():
    small = plan.trace(cfg_for('model.base_model="sd15"', "data.resolution=256"))
    large = plan.trace(cfg_for('model.base_model="sd15"', "data.resolution=512"))
    # 4x the pixels: activations grow ~4x when attention is linear in tokens (an attention matrix would be 16x;
    # the 77 text tokens' keys and values do not grow at all).
    assert 3.5 < large.unet_saved / small.unet_saved <= 4.0
    assert small.unet_saved_checkpointed < small.unet_saved and 0 < small.unet_unit < small.unet_saved


def test_estimate_follows_the_settings(sd15_path):
    base = cfg_for(f'model.base_model="{sd15_path}"', "train.batch_size=1")
    traced = plan.trace(base)

    def est(**train):
        return plan.estimate(dataclasses.replace(base, train=dataclasses.replace(base.train, **train)), traced)

    one, four = est(), est(batch_size=4)
    assert four.activations == pytest.approx(4 * one.activations)
    assert est(gradient_checkpointing=True, batch_size=4).total < four.total
    assert est(mixed_precision="no").unet == 2 * one.unet
    # The tiny model's LoRA factors are all smaller than bitsandbytes quantizes: 8-bit AdamW saves nothing there.
    assert traced.lora_params_8bit == 0 and est(optimizer="adamw8bit").adapter == one.adapter
    assert traced.lora_params == sum(  # the same adapter training attaches
        p.numel() for p in _injected(sd15_path, base) if p.requires_grad)


def test_8bit_state_is_counted_only_for_tensors_bitsandbytes_quantizes():
    from sdlora import bnb_import

    bnb = bnb_import.load()

    small, large = (torch.nn.Parameter(torch.zeros(n)) for n in (plan.BNB_MIN_8BIT_SIZE - 1, plan.BNB_MIN_8BIT_SIZE))
    optimizer = bnb.optim.AdamW8bit([small, large])
    small.grad, large.grad = torch.ones_like(small), torch.ones_like(large)
    optimizer.step()
    assert optimizer.state[small]["state1"].dtype == torch.float32
    assert optimizer.state[large]["state1"].dtype == torch.uint8
    # Full-size SD1.5, rank 4 on UNet attention: the factors of 320- and 768-wide layers stay 32-bit.
    cfg = cfg_for('model.base_model="sd15"', "lora.rank=4", "lora.alpha=4", "lora.train_text_encoder=false")
    traced = plan.trace(cfg)
    assert 0 < traced.lora_params_8bit < traced.lora_params
    as_is = plan.estimate(cfg, traced).adapter
    eight = plan.estimate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optimizer="adamw8bit")), traced)
    assert eight.adapter == as_is - 6 * traced.lora_params_8bit


def _injected(path, cfg):
    from sdlora.adapters.methods import adapters_for
    from sdlora.models.arch import component_names
    from sdlora.models.loading import load_base_model

    base = load_base_model(str(path))
    adapters = adapters_for(cfg.lora, total_steps=1)
    params = []
    adapters.inject(base.unet, "unet")
    params += list(base.unet.parameters())
    for name, encoder in zip(component_names(base.arch), base.text_encoders):
        adapters.inject(encoder, name)
        params += list(encoder.parameters())
    return params


def test_plan_takes_the_cheapest_changes_until_it_fits():
    # Full-size SD1.5 from the shipped configs (meta device: no weights are built).
    cfg = cfg_for('model.base_model="sd15"', "data.resolution=512", "train.batch_size=8",
                  "lora.train_text_encoder=false", "lora.rank=4", "lora.alpha=4")
    traced = plan.trace(cfg)
    as_is = plan.estimate(cfg, traced)
    assert 2.5 < plan.estimate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=1)),
                               traced).total / plan.GB < 6.0  # published peers: 4.1-5.5 GB at batch 1
    chosen, result, reasons = plan.plan(cfg, 6.0, traced)
    assert result.total <= 6.0 * plan.GB < as_is.total
    assert chosen.train.batch_size * chosen.train.gradient_accumulation_steps == 8  # same effective batch
    assert reasons[0].startswith("cache text-encoder outputs") and any("checkpointing" in r for r in reasons)
    with pytest.raises(PlanError, match="even with every memory saving"):
        plan.plan(cfg, 1.0, traced)


def test_plan_quantizes_the_base_before_shrinking_the_batch():
    cfg = cfg_for('model.base_model="sd15"', "data.resolution=512", "train.batch_size=2",
                  "lora.train_text_encoder=false", "lora.rank=4", "lora.alpha=4")
    traced = plan.trace(cfg)
    saved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_text_encoder_outputs=True),
                                train=dataclasses.replace(cfg.train, gradient_checkpointing=True,
                                                          optimizer="adamw8bit"))
    without = plan.estimate(saved, traced).total
    nf4 = plan.estimate(dataclasses.replace(saved, model=dataclasses.replace(saved.model, quantize_base="nf4")),
                        traced).total
    assert nf4 < without - 0.3 * plan.GB  # SD1.5's UNet Linear weights: ~0.6 GB in fp16, a quarter of it in NF4
    budget = (without + nf4) / 2 / plan.GB
    chosen, result, reasons = plan.plan(cfg, budget, traced)
    assert chosen.model.quantize_base == "nf4" and chosen.train.batch_size == 2
    assert reasons[-1].startswith("NF4 base") and result.total <= budget * plan.GB
    # 8-bit AdamW was tried before NF4 and saved a few MB; once the NF4 base fits, it is dropped again. What stays
    # is needed: without checkpointing or NF4 the config would not fit.
    assert chosen.train.optimizer == "adamw" and not any("8-bit" in r for r in reasons)
    for table, key, before in (("train", "gradient_checkpointing", False), ("model", "quantize_base", "none")):
        less = dataclasses.replace(chosen, **{table: dataclasses.replace(getattr(chosen, table), **{key: before})})
        assert plan.estimate(less, traced).total > budget * plan.GB


def test_check_before_training_and_vram_parsing(sd15_path):
    cfg = cfg_for(f'model.base_model="{sd15_path}"')
    need = plan.estimate(cfg).total
    assert plan.check_fits(cfg, need * 1.01) is None
    assert "may run out of memory" in plan.check_fits(cfg, need / 1.05)
    with pytest.raises(PlanError, match="sdlora plan CONFIG --vram"):
        plan.check_fits(cfg, need / 2)
    assert plan.parse_vram("8GB") == 8.0 and plan.parse_vram("8 GiB") == pytest.approx(8.589934592)
    for bad in ("", "0", "-2GB", "eight"):
        with pytest.raises(PlanError):
            plan.parse_vram(bad)


def test_adalora_counts_its_rank_allocator(sd15_path):
    cfg = cfg_for(f'model.base_model="{sd15_path}"', "lora.method=adalora", "lora.rank=4", "lora.adalora_init_rank=8")
    traced = plan.trace(cfg)
    assert plan.estimate(cfg, traced).adapter == traced.lora_params * (plan.OPTIMIZER_BYTES["adamw"] + 12)


def test_train_with_vram_applies_the_plan_and_trains(dataset, tmp_path, capsys):
    from sdlora.cli import main

    out = tmp_path / "run"
    config = tmp_path / "fit.toml"
    config.write_text(f'[data]\ndirs = ["{dataset.as_posix()}"]\nresolution = 64\nmin_bucket_reso = 64\n'
                      'max_bucket_reso = 64\n[lora]\nrank = 4\ntrain_text_encoder = false\n'
                      f'[train]\nmixed_precision = "no"\nmax_train_steps = 1\nsave_every_n_epochs = 0\n'
                      f'output_dir = "{out.as_posix()}"\n')
    cfg = load_config(config)
    traced = plan.trace(cfg)
    cached = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_text_encoder_outputs=True))
    between = (plan.estimate(cfg, traced).total + plan.estimate(cached, traced).total) / 2 / plan.GB
    assert main(["train", str(config), "--vram", f"{between:.6f}GB"]) == 0
    printed = capsys.readouterr().out
    assert "- cache text-encoder outputs" in printed and "checkpointing" not in printed
    assert load_config(out / "config.toml").data.cache_text_encoder_outputs  # the run used the planned settings
    if not torch.cuda.is_available():
        assert main(["train", str(config), "--vram", "auto"]) == 1
        assert "--vram auto needs a CUDA GPU" in capsys.readouterr().err


def test_the_sd15_preset_fits_a_4gb_card_with_the_plan():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "sd15_style.toml", ['model.base_model="sd15"'])
    chosen, result, reasons = plan.plan(cfg, 4.0)
    assert result.total <= 4.0 * plan.GB and reasons  # as configured it needs more
    assert chosen.train.batch_size * chosen.train.gradient_accumulation_steps == cfg.train.batch_size


def test_a_config_that_fits_drops_the_savings_that_slow_it():
    cfg = cfg_for('model.base_model="sd15"', "data.resolution=512", "train.batch_size=1", "lora.rank=4",
                  "lora.alpha=4", "lora.train_text_encoder=false", "train.gradient_checkpointing=true",
                  "train.optimizer=adamw8bit", 'model.quantize_base="nf4"')
    traced = plan.trace(cfg)
    chosen, result, reasons = plan.plan(cfg, 80.0, traced)
    assert (chosen.train.gradient_checkpointing, chosen.model.quantize_base, chosen.train.optimizer) == (
        False, "none", "adamw")
    assert reasons[0].startswith("gradient checkpointing off") and len(reasons) == 3
    # Room (with the headroom kept when relaxing) for the unquantized base, a few hundred MB, but not for the
    # activations without checkpointing (GBs) or AdamW's 32-bit state (MBs): only the base changes.
    full = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantize_base="none"))
    budget = (plan.estimate(full, traced).total + 1e5) / (1 - plan.RELAX_HEADROOM) / plan.GB
    chosen, result, reasons = plan.plan(cfg, budget, traced)
    assert (chosen.train.gradient_checkpointing, chosen.model.quantize_base, chosen.train.optimizer) == (
        True, "none", "adamw8bit")
    assert reasons == ["no quantized base: there is room for the UNet's own weights (faster steps)"]
