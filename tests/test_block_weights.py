"""kohya's per-block ranks, alphas and learning rates (lora.block_dims ... up_lr_weight): each module's block is the one
sd-scripts gives it, the file holds each block's rank and alpha, each block's parameters learn at the UNet's rate
times its weight, and a run with them trains, resumes and exports a file diffusers loads whole.

The reference for blocks and preset weights is sd-scripts' networks/lora.py (get_block_index, get_block_lr_weight),
transcribed below from its source and applied to the names of the exported file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_export import assert_diffusers_applies, captured_messages

from sdlora.adapters.export import kohya_module_name, load_lora_layers, save_kohya_lora
from sdlora.adapters.lora import ADAPTER, inject_lora, lora_layers, target_module_names, trainable_parameters
from sdlora.adapters.methods import adapters_for
from sdlora.config import KOHYA_BLOCKS, load_config
from sdlora.errors import ConfigError, TrainingError
from sdlora.models.ldm_names import kohya_block, unet_layout_from_config
from sdlora.models.loading import load_base_model
from sdlora.train import plan
from sdlora.train.optimizer import make_optimizer
from sdlora.train.recipe import train

pytestmark = pytest.mark.usefixtures("single_thread_plain_kernels")

SDXL = {"tiny-sd15": False, "tiny-sdxl": True}


def kohya_block_index(lora_name: str, is_sdxl: bool) -> int:
    """sd-scripts networks/lora.py get_block_index, of a module's name in a kohya file."""
    if not is_sdxl:
        m = re.search(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_", lora_name)
        if m:
            i, j = int(m[2]), int(m[4])
            idx = 3 * i + (2 if m[3] in ("upsamplers", "downsamplers") else j)
            return 1 + idx if m[1] == "down" else 12 + 1 + idx
        return 12 if "mid_block_" in lora_name else -1
    name = lora_name[len("lora_unet_"):]
    number = int(name.split("_")[2]) if name.startswith(("input_blocks_", "middle_block_", "output_blocks_")) else 0
    starts = {"time_embed_": 0, "label_emb_": 0, "input_blocks_": 1 + number, "middle_block_": 10 + number,
              "output_blocks_": 13 + number, "out_": 22}
    return next((index for start, index in starts.items() if name.startswith(start)), -1)


def kohya_preset(name: str, n: int) -> list[float]:
    """sd-scripts networks/lora.py get_block_lr_weight's get_list, for a preset without "+"."""
    return {"cosine": [math.sin(math.pi * (i / (n - 1)) / 2) for i in reversed(range(n))],
            "sine": [math.sin(math.pi * (i / (n - 1)) / 2) for i in range(n)],
            "linear": [i / (n - 1) for i in range(n)],
            "reverse_linear": [i / (n - 1) for i in reversed(range(n))],
            "zeros": [0.0] * n}[name]


def blocks_of(model: str):
    return KOHYA_BLOCKS["sdxl" if SDXL[model] else "sd1"]


def injected(model: str, *overrides: str):
    """A fresh tiny base model with LoRA on its UNet and first text encoder, and the config."""
    cfg = load_config(None, ["lora.rank=3", "lora.alpha=1.5", *overrides])
    base = load_base_model(model)
    trained = {"unet": base.unet, "text_encoder": base.text_encoders[0]}
    for name, module in trained.items():
        inject_lora(module, name, cfg.lora)
    return base, trained, cfg


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_each_module_is_in_kohyas_block(model):
    unet = load_base_model(model).unet
    layout, sdxl = unet_layout_from_config(unet.config), SDXL[model]
    names = target_module_names(unet, "unet", "all")
    found = {}
    for name in names:
        kohya = kohya_module_name("unet", name, "sdxl" if sdxl else "sd1", layout)
        found[kohya] = blocks_of(model).names[kohya_block_index(kohya, sdxl)]
        assert kohya_block(name, layout, sdxl) == found[kohya], kohya
    spots = ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": "IN04",
              "lora_unet_middle_block_1_proj_in": "MID01", "lora_unet_middle_block_2_in_layers_2": "MID02",
              "lora_unet_output_blocks_2_2_conv": "OUT02", "lora_unet_output_blocks_8_0_out_layers_3": "OUT08"}
             if sdxl else
             {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": "IN04",
              "lora_unet_down_blocks_0_downsamplers_0_conv": "IN03", "lora_unet_mid_block_attentions_0_proj_in": "MID",
              "lora_unet_up_blocks_0_upsamplers_0_conv": "OUT02",
              "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2": "OUT11"})
    assert {k: found[k] for k in spots} == spots


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_file_holds_each_blocks_rank_and_alpha(model, tmp_path):
    names = blocks_of(model).names
    dims = [1 + i % 4 for i in range(len(names))]
    alphas = [0.5 * (i + 1) for i in range(len(names))]
    conv_dims = [2 + i % 3 for i in range(len(names))]
    conv_alphas = [float(i + 2) for i in range(len(names))]
    off = names.index("IN04")  # an attention level: Linear, 1x1 and 3x3 modules
    dims[off] = 0
    base, trained, cfg = injected(model, "lora.targets=all", f"lora.block_dims={dims}", f"lora.block_alphas={alphas}",
                                  f"lora.conv_block_dims={conv_dims}", f"lora.conv_block_alphas={conv_alphas}")
    layers = {name: lora_layers(module) for name, module in trained.items()}
    path = save_kohya_lora(layers, base.arch, tmp_path / "lora.safetensors", {}, torch.float32,
                           dict(base.unet.config))
    tensors = load_file(str(path))
    files = {key.removesuffix(".alpha") for key in tensors if key.endswith(".alpha")}
    seen = set()
    for module in files:
        down, alpha = tensors[f"{module}.lora_down.weight"], float(tensors[f"{module}.alpha"])
        if module.startswith("lora_te"):
            assert (down.shape[0], alpha) == (3, 1.5), module  # text encoders keep lora.rank / lora.alpha
            continue
        block = kohya_block_index(module, SDXL[model])
        conv = down.dim() == 4 and down.shape[-1] == 3
        assert (down.shape[0], alpha) == ((conv_dims[block], conv_alphas[block]) if conv
                                          else (dims[block], alphas[block])), module
        seen.add((block, conv))
    assert (off, False) not in seen and (off, True) in seen  # dim 0: no Linear / 1x1 module, its 3x3 convs stay
    expected = {kohya for kohya, conv in unet_modules(model).items()
                if kohya_block_index(kohya, SDXL[model]) != off or conv}
    assert {m for m in files if m.startswith("lora_unet")} == expected


def unet_modules(model: str, targets: str = "all") -> dict[str, bool]:
    """{kohya name: whether a 3x3 convolution} of the UNet modules lora.targets adapts, from a fresh model."""
    unet = load_base_model(model).unet
    layout, arch = unet_layout_from_config(unet.config), "sdxl" if SDXL[model] else "sd1"
    return {kohya_module_name("unet", name, arch, layout): unet.get_submodule(name).weight.shape[2:] == (3, 3)
            for name in target_module_names(unet, "unet", targets)}


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_lycoris_modules_take_their_blocks_rank_and_alpha(method):
    names = blocks_of("tiny-sd15").names
    dims = [2 + i % 3 for i in range(len(names))]
    alphas = [float(i + 1) for i in range(len(names))]
    cfg = load_config(None, [f"lora.method={method}", "lora.rank=4", f"lora.block_dims={dims}",
                             f"lora.block_alphas={alphas}"])
    unet = load_base_model("tiny-sd15").unet
    layout = unet_layout_from_config(unet.config)
    adapters_for(cfg.lora, 1).inject(unet, "unet")
    layers = {n: m for n, m in unet.named_modules() if hasattr(m, "r") and ADAPTER in getattr(m, "r", {})}
    assert layers
    for name, layer in layers.items():
        block = names.index(kohya_block(name, layout, False))
        assert (layer.r[ADAPTER], layer.alpha[ADAPTER]) == (dims[block], alphas[block]), name


def test_each_blocks_parameters_learn_at_the_unets_rate_times_its_weight():
    names = blocks_of("tiny-sd15").names
    up = [1.0, 0.05, 2.0, 0.5, 1.0, 1.5, 0.0, 1.0, 3.0, 1.0, 1.0, 0.25]  # 0.05 is under the threshold: 0
    base, trained, cfg = injected("tiny-sd15", 'lora.down_lr_weight="reverse_linear"', "lora.mid_lr_weight=[0.5]",
                                  f"lora.up_lr_weight={up}", "lora.block_lr_zero_threshold=0.1",
                                  "train.loraplus_lr_ratio=16.0", "train.unet_lr=1e-3", "train.text_encoder_lr=5e-5")
    weights = dict(zip(names, kohya_preset("reverse_linear", 12) + [0.5] + [w if w > 0.1 else 0 for w in up]))
    layout = unet_layout_from_config(base.unet.config)
    adapted = {kohya_block(n, layout, False) for n in lora_layers(base.unet)}
    attention = {names[kohya_block_index(kohya, False)] for kohya in unet_modules("tiny-sd15", "attn")}
    assert adapted == {b for b, w in weights.items() if w} & attention
    optimizer = make_optimizer(cfg.train, trained, fused=False, lora=cfg.lora)
    groups = {g["name"]: g for g in optimizer.param_groups}
    want = {"text_encoder": 5e-5, "text_encoder_up": 80e-5}
    for block in adapted:
        want |= {f"unet_{block}": 1e-3 * weights[block], f"unet_{block}_up": 16e-3 * weights[block]}
    assert {name: g["lr"] for name, g in groups.items()} == pytest.approx(want)
    for name, module in trained.items():  # every trained parameter in one group, LoRA+ ups in the "_up" ones
        params = trainable_parameters(module)
        in_groups = [id(p) for g in optimizer.param_groups if g["name"].startswith(name) for p in g["params"]]
        assert sorted(in_groups) == sorted(id(p) for p in params.values())
        ups = {id(p) for n, p in params.items() if ".lora_B." in n}
        assert {id(p) for g in optimizer.param_groups if g["name"].endswith("_up") and g["name"].startswith(name)
                for p in g["params"]} == ups
    again = make_optimizer(cfg.train, trained, fused=False, lora=cfg.lora)  # resume needs the same groups
    assert [(g["name"], len(g["params"])) for g in again.param_groups] == [
        (g["name"], len(g["params"])) for g in optimizer.param_groups]


@pytest.fixture(scope="module")
def sdxl_mid_weights():
    """tiny-sdxl with LoRA on every target and mid_lr_weight = [0.5, 2.0, 0.0], as (trained models, config)."""
    _, trained, cfg = injected("tiny-sdxl", "lora.targets=all", "lora.mid_lr_weight=[0.5, 2.0, 0.0]")
    return trained, cfg


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "prodigy", "adafactor", "adamw_schedulefree"])
def test_every_optimizer_keeps_the_blocks_rates(sdxl_mid_weights, optimizer):
    trained, cfg = sdxl_mid_weights
    try:
        made = make_optimizer(dataclasses.replace(cfg.train, optimizer=optimizer), trained, fused=False, lora=cfg.lora)
    except TrainingError as e:  # an optional package that is not installed
        pytest.skip(str(e))
    rates = {g["name"]: g["lr"] for g in made.param_groups}
    lr = cfg.train.learning_rate
    assert "unet_MID02" not in rates and rates["unet_MID00"] == pytest.approx(0.5 * lr)
    assert rates["unet_MID01"] == pytest.approx(2 * lr) and rates["unet_OUT00"] == rates["text_encoder"] == lr


def test_planner_counts_the_adapters_training_attaches():
    overrides = ["lora.targets=all", "lora.block_dims=[" + ", ".join(["2", "0"] * 12 + ["8"]) + "]"]
    base, trained, _ = injected("tiny-sd15", *overrides)
    cfg = load_config(None, ['model.base_model="tiny-sd15"', "lora.rank=3", "lora.alpha=1.5", *overrides])
    assert plan.trace(cfg).lora_params == sum(p.numel() for m in trained.values() for p in m.parameters()
                                              if p.requires_grad)


def test_a_run_resumes_and_exports_a_file_diffusers_loads_whole(dataset, tmp_path, sd15_path):
    import diffusers

    dims = [4] * 25
    dims[4] = 0

    def run(out, *extra):
        return load_config(None, [
            f'data.dirs=["{dataset.as_posix()}"]', "data.resolution=64", "data.min_bucket_reso=64",
            "data.max_bucket_reso=128", "lora.rank=4", "lora.alpha=4.0", "train.batch_size=2",
            "train.max_train_steps=3", "train.learning_rate=1e-3", "train.save_every_n_epochs=0",
            f'train.output_dir="{(tmp_path / out).as_posix()}"', "train.report=false", "export.dtype=fp32",
            "lora.targets=attn_mlp", f"lora.block_dims={dims}", "lora.block_alphas=[" + ", ".join(["2.0"] * 25) + "]",
            'lora.up_lr_weight="sine+0.5"', "lora.mid_lr_weight=[0.0]", "train.loraplus_lr_ratio=4.0", *extra])

    straight = train(run("a", "train.checkpoint_every_n_steps=2", "train.save_last_k=0"))
    resumed = train(run("b"), resume=str(tmp_path / "a" / "checkpoint-2"))
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(straight), "pt") as f:
        args = json.loads(f.metadata()["ss_network_args"])
    assert args["block_dims"] == ",".join(map(str, dims)) and args["up_lr_weight"] == "sine+0.5"
    assert args["mid_lr_weight"] == "0" and args["block_alphas"] == ",".join(["2"] * 25)
    modules = {k.removesuffix(".alpha") for k in a if k.endswith(".alpha")}
    assert not [m for m in modules if kohya_block_index(m, False) in (4, 12)]  # IN04 dim 0, MID rate 0
    assert {float(a[f"{m}.alpha"]) for m in modules if m.startswith("lora_unet")} == {2.0}

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd15_path)
    pipe.set_progress_bar_config(disable=True)
    with captured_messages() as messages:
        pipe.load_lora_weights(str(straight.parent), weight_name=straight.name)
    bad = [m for m in messages if any(w in m.lower() for w in ("unexpected", "missing", "not loaded", "no lora"))]
    assert not bad, bad
    layers, _ = load_lora_layers(straight, {c: [n for n, _ in getattr(pipe, c).named_modules()]
                                            for c in ("unet", "text_encoder")})
    assert_diffusers_applies(pipe, layers, torch.float32)
    assert np.isfinite(pipe("a cat", num_inference_steps=1, height=64, width=64, output_type="np").images).all()


@pytest.mark.parametrize("overrides, message", [
    (["lora.block_dims=[4, 4]"], "lora.block_dims: 2 values; give one per block: 25 for SD 1.x/2.x, 23 for SDXL"),
    (['lora.down_lr_weight="square"'], "lora.down_lr_weight: 'square' is not one of cosine, sine, linear"),
    (["lora.method=adalora", "lora.mid_lr_weight=[0.5]"], "lora.mid_lr_weight: AdaLoRA learns each module's rank"),
    (["lora.conv_block_dims=" + str([4] * 25)], "lora.conv_block_dims: the 3x3 convolutions are adapted with "
                                                "lora.targets = \"all\" only"),
    (["lora.block_dims=" + str([4] * 25), "lora.mid_lr_weight=[1, 1, 1]"], "the lists are sized for different"),
    (["lora.block_lr_zero_threshold=0.5"], "lora.block_lr_zero_threshold: a finite number >= 0 that needs"),
    (["lora.block_alphas=" + str([0.0] * 25)], "lora.block_alphas: 0.0 is out of range"),
    (["lora.train_unet=false", "lora.up_lr_weight=\"zeros+1\""], "needs lora.train_unet = true"),
])
def test_bad_settings_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_lists_for_the_other_model_family_are_refused_at_injection():
    cfg = load_config(None, ["lora.block_dims=" + str([4] * 23)])  # SDXL's 23 blocks
    with pytest.raises(ConfigError, match=r"lora.block_dims: 23 values, but the base model is SD 1.x, whose kohya "
                                          r"blocks are 25 \(IN00-OUT11\)"):
        inject_lora(load_base_model("tiny-sd15").unet, "unet", cfg.lora)
