"""DoRA and PiSSA: trained through peft, exported so that every loader rebuilds the model that was trained.

The reference in each test is the model as peft runs it during training; the exported file, loaded into our
generator (kohya file) or into diffusers (peft file), must give the same UNet and text-encoder outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdlora.adapters.export import load_lora_layers, save_kohya_lora, save_peft_lora
from sdlora.adapters.lora import inject_lora, lora_layers, pissa_as_lora, set_lora_layers, trainable_parameters
from sdlora.adapters.tools import read_lora
from sdlora.config import load_config
from sdlora.errors import ConfigError, LoraFileError
from sdlora.generate.pipeline import LoraCache, LoraSpec, load_pipeline
from sdlora.models.loading import encode_prompt, load_base_model, tokenize
from sdlora.train.recipe import train

pytestmark = pytest.mark.usefixtures("single_thread_plain_kernels")


def _inputs(base):
    torch.manual_seed(0)
    latents, timestep = torch.randn(1, 4, 8, 8), torch.tensor([500])
    ids = tokenize(base.tokenizers, ["zkstyle, a boat"])
    return latents, timestep, ids


def _outputs(unet, text_encoder, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    latents, timestep, ids = inputs
    with torch.no_grad():
        states, _ = encode_prompt("sd1", [text_encoder], ids)
        return unet(latents, timestep, states).sample, states


def _trained_like(*overrides: str):
    """The tiny SD1 model with adapters as after training: every factor (and DoRA magnitude) moved off its start."""
    base = load_base_model("tiny-sd15")
    cfg = load_config(None, ["lora.rank=4", "lora.alpha=2.0", *overrides])
    starts = {}
    for name, model in (("unet", base.unet), ("text_encoder", base.text_encoders[0])):
        inject_lora(model, name, cfg.lora)
        starts[name] = lora_layers(model)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in trainable_parameters(model).values():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))  # B starts at zero
    return base, starts


def _layers(base) -> dict:
    return {"unet": lora_layers(base.unet), "text_encoder": lora_layers(base.text_encoders[0])}


def _loaded_outputs(path: Path, inputs, fuse: bool = False):
    """UNet and text-encoder outputs of a fresh pipeline with `path` loaded by our generator's LoraCache."""
    pipe = load_pipeline("tiny-sd15")
    LoraCache(pipe).activate([LoraSpec(path)])
    if fuse:
        pipe.fuse_lora()
    return _outputs(pipe.unet, pipe.text_encoder, inputs)


def _assert_outputs_equal(got, expected, atol=1e-5):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=atol, rtol=1e-4)


def test_dora_learns_only_adapter_and_magnitude():
    base = load_base_model("tiny-sd15")
    unet = base.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    cfg = load_config(None, ["lora.method=dora", "lora.rank=4", "lora.alpha=4.0", "lora.targets=all"])
    inject_lora(unet, "unet", cfg.lora)
    params = trainable_parameters(unet)
    magnitudes = {n: p.detach().clone() for n, p in params.items() if "lora_magnitude_vector" in n}
    assert magnitudes and all(p.dtype == torch.float32 for p in params.values())
    from diffusers import DDPMScheduler

    from sdlora.train.loss import compute_loss

    scheduler = DDPMScheduler.from_config(base.scheduler_config)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        states, _ = encode_prompt("sd1", base.text_encoders, tokenize(base.tokenizers, ["zkstyle, a boat", "a tree"]))
    losses = []
    for _ in range(25):
        loss = compute_loss(unet, scheduler, latents, states, None, None, None, torch.Generator().manual_seed(1),
                            cfg.train, torch.float32)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses
    assert any(not torch.equal(params[n], m) for n, m in magnitudes.items()), "DoRA magnitudes did not train"
    after = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_dora_kohya_file_loads_exactly_in_our_generator_and_fuses(tmp_path):
    base, _ = _trained_like("lora.method=dora", "lora.targets=all")
    inputs = _inputs(base)
    expected = _outputs(base.unet, base.text_encoders[0], inputs)
    path = save_kohya_lora(_layers(base), "sd1", tmp_path / "dora.safetensors", {}, torch.float32,
                           dict(base.unet.config))
    with safe_open(str(path), "pt") as f:
        scales = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".dora_scale")}
        ups = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".lora_up.weight")}
    assert len(scales) == len(ups)
    for key, scale in scales.items():  # ComfyUI's output-axis layout: [out, 1] / [out, 1, 1, 1]
        up = ups[key.replace(".dora_scale", ".lora_up.weight")]
        assert scale.shape == (up.shape[0],) + (1,) * (up.dim() - 1), key
    assert any(s.dim() == 4 for s in scales.values()), "no convolution was adapted"
    _assert_outputs_equal(_loaded_outputs(path, inputs), expected)
    _assert_outputs_equal(_loaded_outputs(path, inputs, fuse=True), expected, atol=1e-4)


def test_dora_merges_into_the_base_model(tmp_path):
    from sdlora.generate.merge import merge_into_base

    base, _ = _trained_like("lora.method=dora")
    inputs = _inputs(base)
    path = save_kohya_lora(_layers(base), "sd1", tmp_path / "dora.safetensors", {"ss_base_model_version": "sd_v1"},
                           torch.float32)
    merged = load_base_model(str(merge_into_base("tiny-sd15", [(path, 1.0)], tmp_path / "merged", torch.float32)))
    _assert_outputs_equal(_outputs(merged.unet, merged.text_encoders[0], inputs),
                          _outputs(base.unet, base.text_encoders[0], inputs), atol=1e-4)


def test_dora_peft_file_loads_exactly_in_diffusers(tmp_path):
    base, _ = _trained_like("lora.method=dora")
    inputs = _inputs(base)
    expected = _outputs(base.unet, base.text_encoders[0], inputs)
    folder = tmp_path / "peft"
    save_peft_lora(_layers(base), folder, torch.float32)
    pipe = load_pipeline("tiny-sd15")
    pipe.load_lora_weights(str(folder))
    assert pipe.unet.peft_config["default_0"].use_dora
    _assert_outputs_equal(_outputs(pipe.unet, pipe.text_encoder, inputs), expected)


def test_dora_file_continues_training_only_as_dora(tmp_path):
    base, _ = _trained_like("lora.method=dora")
    path = save_kohya_lora(_layers(base), "sd1", tmp_path / "dora.safetensors", {"ss_base_model_version": "sd_v1"},
                           torch.float32)
    fresh = load_base_model("tiny-sd15")
    modules = {"unet": [n for n, _ in fresh.unet.named_modules()],
               "text_encoder": [n for n, _ in fresh.text_encoders[0].named_modules()]}
    layers, _ = load_lora_layers(path, modules)
    cfg = load_config(None, ["lora.rank=4", "lora.alpha=2.0", "lora.method=dora"])
    inject_lora(fresh.unet, "unet", cfg.lora)
    inject_lora(fresh.text_encoders[0], "text_encoder", cfg.lora)
    set_lora_layers(fresh.unet, layers["unet"])
    set_lora_layers(fresh.text_encoders[0], layers["text_encoder"])
    inputs = _inputs(base)
    _assert_outputs_equal(_outputs(fresh.unet, fresh.text_encoders[0], inputs),
                          _outputs(base.unet, base.text_encoders[0], inputs))
    plain = load_base_model("tiny-sd15")
    inject_lora(plain.unet, "unet", load_config(None, ["lora.rank=4"]).lora)
    with pytest.raises(ValueError, match="the file is DoRA but the adapter is plain LoRA"):
        set_lora_layers(plain.unet, layers["unet"])
    with pytest.raises(LoraFileError, match="DoRA"):
        read_lora(path)  # merge/resize cannot keep DoRA's normalisation


def test_input_axis_dora_is_refused_in_one_line(tmp_path):
    base, _ = _trained_like("lora.method=dora")
    path = save_kohya_lora(_layers(base), "sd1", tmp_path / "dora.safetensors", {}, torch.float32)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key in [k for k in tensors if k.endswith(".dora_scale")]:  # LyCORIS' default: one scale per input channel
        down = tensors[key.replace(".dora_scale", ".lora_down.weight")]
        tensors[key] = torch.ones(1, down.shape[1])
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "input_axis.safetensors"), {"ss_base_model_version": "sd_v1"})
    pipe = load_pipeline("tiny-sd15")
    with pytest.raises(LoraFileError, match="per input channel"):
        LoraCache(pipe).load(tmp_path / "input_axis.safetensors")


def test_pissa_on_a_convolution_is_one_line_naming_the_fix():
    unet = load_base_model("tiny-sd15").unet  # SD1's proj_in / proj_out are 1x1 convs, in "attn_mlp"
    with pytest.raises(ConfigError, match=r"proj_in is a convolution; use lora.targets = \"attn\"") as error:
        inject_lora(unet, "unet", load_config(None, ["lora.init=pissa", "lora.targets=attn_mlp"]).lora)
    assert "\n" not in str(error.value)


def test_pissa_starts_at_the_base_model_and_exports_against_the_original_weights(tmp_path):
    original = load_base_model("tiny-sd15")
    inputs = _inputs(original)
    before = _outputs(original.unet, original.text_encoders[0], inputs)
    base, starts = _trained_like("lora.init=pissa")
    untouched = load_base_model("tiny-sd15")
    for name, model in (("unet", untouched.unet), ("text_encoder", untouched.text_encoders[0])):
        # at initialisation the residual base plus the adapter is the original model
        inject_lora(model, name, load_config(None, ["lora.rank=4", "lora.alpha=2.0", "lora.init=pissa"]).lora)
    _assert_outputs_equal(_outputs(untouched.unet, untouched.text_encoders[0], inputs), before, atol=1e-4)
    expected = _outputs(base.unet, base.text_encoders[0], inputs)
    layers = {name: pissa_as_lora(trained, starts[name]) for name, trained in _layers(base).items()}
    assert {w.rank for m in layers.values() for w in m.values()} == {8}
    path = save_kohya_lora(layers, "sd1", tmp_path / "pissa.safetensors", {}, torch.float32)
    _assert_outputs_equal(_loaded_outputs(path, inputs), expected, atol=1e-4)


@pytest.mark.parametrize("overrides, rank, args", [
    (["lora.method=dora"], "4", {"dora_wd": True}),
    (["lora.init=pissa"], "8", {"init": "pissa"}),
])
def test_train_writes_the_method_into_file_and_metadata(dataset, tmp_path, overrides, rank, args):
    cfg = load_config(None, [
        f'data.dirs=["{dataset.as_posix()}"]', "data.resolution=64", "data.min_bucket_reso=64",
        "data.max_bucket_reso=128", "lora.rank=4", "lora.alpha=4.0", "train.batch_size=2", "train.max_train_steps=3",
        "train.learning_rate=1e-3", "train.save_every_n_epochs=0", f'train.output_dir="{tmp_path.as_posix()}"',
        "train.report=false", "export.dtype=fp32", *overrides])
    path = train(cfg)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        downs = [f.get_tensor(k) for k in keys if k.endswith(".lora_down.weight")]
    assert meta["ss_network_dim"] == rank and {d.shape[0] for d in downs} == {int(rank)}
    assert args.items() <= json.loads(meta["ss_network_args"]).items()
    assert any(k.endswith(".dora_scale") for k in keys) == ("dora_wd" in args)


@pytest.mark.parametrize("override", ["lora.init=pissa", "lora.method=adalora"])
def test_methods_that_cannot_continue_a_lora_file_say_so_before_loading(dataset, tmp_path, override):
    from sdlora.errors import TrainingError

    cfg = load_config(None, [f'data.dirs=["{dataset.as_posix()}"]', "data.resolution=64", "data.min_bucket_reso=64",
                             "lora.rank=4", f'train.output_dir="{tmp_path.as_posix()}"', override])
    with pytest.raises(TrainingError, match="cannot continue an existing LoRA file"):
        train(cfg, init_lora=tmp_path / "any.safetensors")
