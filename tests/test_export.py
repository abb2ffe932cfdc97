"""Export to the community (kohya) and diffusers formats, import back, metadata and hashes, file safety.

The load tests use diffusers itself as the reference loader: the exported file goes into a fresh pipeline via
`load_lora_weights`, and the delta peft applies per module must equal (alpha / r) * up @ down from our layers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import pickle
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from sdlora.adapters.export import (
    RunInfo,
    build_metadata,
    from_kohya_state_dict,
    load_lora_layers,
    save_kohya_lora,
    save_peft_lora,
    to_kohya_state_dict,
    to_peft_state_dict,
)
from sdlora.adapters.files import KOHYA_PREFIXES, detect_arch, file_hashes, inspect_lora, read_lora_file
from sdlora.adapters.lora import LoraWeights, inject_lora, lora_layers
from sdlora.config import Config, LoraConfig
from sdlora.errors import LoraFileError
from sdlora.models.ldm_names import SDXL_BASE_LAYOUT, unet_layout_from_config, unet_layout_from_names, unet_path_to_ldm

ARCH = {"tiny-sd15": "sd1", "tiny-sdxl": "sdxl"}
COMPONENTS = {"tiny-sd15": ("unet", "text_encoder"), "tiny-sdxl": ("unet", "text_encoder", "text_encoder_2")}
TARGETS = ("attn", "attn_mlp", "all")
RANK, ALPHA = 4, 2.0  # alpha != rank so a lost or doubled scale shows


pytestmark = pytest.mark.usefixtures("single_thread_plain_kernels")


@pytest.fixture(scope="module")
def pipes(sd15_path, sdxl_path):
    import diffusers

    out = {}
    for name, path in (("tiny-sd15", sd15_path), ("tiny-sdxl", sdxl_path)):
        pipe = diffusers.DiffusionPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        out[name] = pipe
    return out


@pytest.fixture(scope="module")
def trained(pipes):
    """trained(model, targets) -> {component: {module: LoraWeights}}: peft-injected copies with random weights."""
    cache = {}

    def make(name: str, targets: str):
        if (name, targets) not in cache:
            generator = torch.Generator().manual_seed(len(cache))
            layers = {}
            for component in COMPONENTS[name]:
                model = copy.deepcopy(getattr(pipes[name], component))
                inject_lora(model, component, LoraConfig(rank=RANK, alpha=ALPHA, targets=targets))
                for param in model.parameters():
                    if param.requires_grad:  # B starts at zero: randomise so every module does something
                        param.data = torch.randn(param.shape, generator=generator) * 0.1
                layers[component] = lora_layers(model)
            cache[name, targets] = layers
        return cache[name, targets]

    return make


def module_names(pipe, name):
    return {c: [n for n, _ in getattr(pipe, c).named_modules()] for c in COMPONENTS[name]}


def run_info(**extra):
    return RunInfo(steps=10, epoch=1, num_train_images=3, training_started_at=1700000000.5,
                   training_finished_at=1700000100.25, **extra)


def generate(pipe):
    generator = torch.Generator().manual_seed(1)
    return pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=generator).images


@contextmanager
def captured_messages():
    """Every log record (diffusers/peft/transformers, any level) and warning raised inside the block."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages += [str(w.message) for w in caught]
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def expected_delta(weights: LoraWeights, dtype=torch.float16) -> torch.Tensor:
    down, up = weights.down.to(dtype).float(), weights.up.to(dtype).float()
    scale = weights.alpha / weights.rank
    if down.dim() == 4:  # conv: up [out, r, 1, 1], down [r, in, kh, kw]
        return scale * torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down)
    return scale * up @ down


def assert_diffusers_applies(pipe, layers, file_dtype=torch.float16):
    """Same LoRA modules, and per module the delta peft applies equals ours (from the fp16-rounded tensors)."""
    from peft.tuners.lora import LoraLayer

    for component, modules in layers.items():
        loaded = {n: m for n, m in getattr(pipe, component).named_modules() if isinstance(m, LoraLayer)}
        assert sorted(loaded) == sorted(modules), component
        for name, module in loaded.items():
            (adapter,) = module.active_adapters
            delta = module.get_delta_weight(adapter)
            want = expected_delta(modules[name], file_dtype)
            torch.testing.assert_close(delta, want, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# diffusers loads the exported file
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_images(pipes):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = generate(pipes[name])
        return cache[name]

    return get


@pytest.mark.parametrize("name, targets", [
    pytest.param(name, targets, marks=[pytest.mark.smoke] if (name, targets) == ("tiny-sd15", "all") else [])
    for name in ("tiny-sd15", "tiny-sdxl") for targets in TARGETS
])
def test_diffusers_loads_kohya_file(pipes, trained, base_images, tmp_path, name, targets):
    pipe, layers, arch = pipes[name], trained(name, targets), ARCH[name]
    path = save_kohya_lora(layers, arch, tmp_path / "lora.safetensors", build_metadata(Config(), arch, run_info()),
                           unet_config=pipe.unet.config)
    base = base_images(name)
    weights = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in COMPONENTS[name]}
    with captured_messages() as messages:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)  # the form every diffusers reads offline
    try:
        # The capture works and diffusers took its kohya conversion path (an info-level line).
        assert any("non-diffusers checkpoint" in m.lower() for m in messages), messages
        bad = [m for m in messages if any(w in m.lower() for w in ("unexpected", "missing", "not loaded", "no lora"))]
        assert not bad, bad
        assert_diffusers_applies(pipe, layers)
        assert np.abs(generate(pipe) - base).max() > 1e-3
    finally:
        pipe.unload_lora_weights()
    for component, state in weights.items():  # unloading restores the base weights bit for bit...
        now = getattr(pipe, component).state_dict()
        assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items()), component
    # ...but the SDXL image can differ in the last bits: on a Xeon with AMX the same weights gave latents 6e-6 apart
    # after a load and unload (a fresh pipeline: bit-identical), so the image is compared to 1e-5.
    assert np.abs(generate(pipe) - base).max() <= 1e-5


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_fused_weights_match(pipes, trained, tmp_path, name):
    """fuse_lora writes W + (alpha / r) * up @ down into every targeted module (convs, LDM-named SDXL too)."""
    pipe, layers, arch = pipes[name], trained(name, "all"), ARCH[name]
    path = save_kohya_lora(layers, arch, tmp_path / "lora.safetensors", {}, unet_config=pipe.unet.config)
    saved = {c: copy.deepcopy(getattr(pipe, c).state_dict()) for c in layers}
    pipe.load_lora_weights(str(path))
    try:
        pipe.fuse_lora(components=list(layers), lora_scale=1.0)
        for component, modules in layers.items():
            fused = getattr(pipe, component).state_dict()
            for module, weights in modules.items():
                delta = fused[f"{module}.base_layer.weight"] - saved[component][f"{module}.weight"]
                torch.testing.assert_close(delta, expected_delta(weights), rtol=1e-3, atol=1e-5, msg=module)
        pipe.unfuse_lora(components=list(layers))
    finally:
        pipe.unload_lora_weights()
        for component, state in saved.items():  # unfusing subtracts in float: put the exact weights back
            getattr(pipe, component).load_state_dict(state)


def test_diffusers_loads_peft_folder(pipes, trained, tmp_path):
    pipe, layers = pipes["tiny-sdxl"], trained("tiny-sdxl", "attn")
    save_peft_lora(layers, tmp_path / "peft", dtype=torch.float32)  # alpha / r is folded into B before rounding
    with captured_messages() as messages:
        pipe.load_lora_weights(str(tmp_path / "peft"))
    try:
        assert not [m for m in messages if "unexpected" in m.lower() or "missing" in m.lower()]
        assert_diffusers_applies(pipe, layers, torch.float32)
    finally:
        pipe.unload_lora_weights()


# ----------------------------------------------------------------------------------------------------------------
# Key names
# ----------------------------------------------------------------------------------------------------------------


def test_sd15_kohya_keys(trained):
    sd = to_kohya_state_dict(trained("tiny-sd15", "attn_mlp"), "sd1")
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    unet = [n for n in names if n.startswith("lora_unet_")]
    te = [n for n in names if n.startswith("lora_te_")]
    assert (len(unet), len(te), len(names)) == (192, 72, 264)
    assert all(n.startswith("lora_te_text_model_encoder_layers_") for n in te)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0" in names
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj" in names
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in names
    # SD1.x proj_in/proj_out are 1x1 convs: kohya and diffusers refuse 2-D tensors for them.
    assert sd["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape == (RANK, 32, 1, 1)
    assert sd["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"].shape == (32, RANK, 1, 1)
    alpha = sd["lora_unet_mid_block_attentions_0_proj_in.alpha"]
    assert alpha.dim() == 0 and alpha.dtype == torch.float32 and alpha.item() == ALPHA
    assert sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].dtype == torch.float16


def test_sdxl_kohya_keys(pipes, trained):
    sd = to_kohya_state_dict(trained("tiny-sdxl", "all"), "sdxl", unet_config=pipes["tiny-sdxl"].unet.config)
    assert all(k.startswith(KOHYA_PREFIXES) for k in sd)
    unet = [k for k in sd if k.startswith("lora_unet_")]
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for k in unet)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in sd)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in sd)
    assert not any(k.startswith("lora_te_") for k in sd)
    for name in (
        "lora_unet_input_blocks_1_0_in_layers_2",  # down_blocks.0.resnets.0.conv1
        "lora_unet_input_blocks_1_0_emb_layers_1",  # .time_emb_proj
        "lora_unet_input_blocks_2_0_out_layers_3",  # down_blocks.0.resnets.1.conv2
        "lora_unet_input_blocks_3_0_op",  # down_blocks.0.downsamplers.0.conv
        "lora_unet_input_blocks_4_0_skip_connection",  # down_blocks.1.resnets.0.conv_shortcut (16 -> 32 channels)
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
        "lora_unet_input_blocks_8_1_proj_out",
        "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_middle_block_2_out_layers_3",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_out_0",
        "lora_unet_output_blocks_2_2_conv",  # up_blocks.0.upsamplers.0.conv after resnet + attention
        "lora_unet_output_blocks_5_2_conv",
        "lora_unet_output_blocks_8_0_skip_connection",
    ):
        assert f"{name}.lora_down.weight" in sd, name
    assert not any("output_blocks_8_2_conv" in k or "input_blocks_9" in k for k in sd)


@pytest.mark.parametrize("path,ldm", [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.2.attentions.1.proj_out", "input_blocks.8.1.proj_out"),
    ("down_blocks.0.resnets.1.time_emb_proj", "input_blocks.2.0.emb_layers.1"),
    ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
    ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
    ("mid_block.resnets.0.conv1", "middle_block.0.in_layers.2"),
    ("up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2", "output_blocks.2.1.transformer_blocks.9.ff.net.2"),
    ("up_blocks.1.attentions.0.proj_in", "output_blocks.3.1.proj_in"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.2.resnets.2.conv_shortcut", "output_blocks.8.0.skip_connection"),
    ("conv_in", "input_blocks.0.0"),
])
def test_sdxl_ldm_names(path, ldm):
    # Real SDXL base names as kohya writes them (sdxl_original_unet) and ComfyUI's unet_to_diffusers maps them.
    assert unet_path_to_ldm(path, SDXL_BASE_LAYOUT) == ldm


def test_real_sdxl_unet_names():
    """The full-size SDXL base UNet (built on the meta device, no weights): counts and diffusers' own conversion."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    from sdlora.adapters.lora import target_module_names

    with torch.device("meta"):  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    assert unet_layout_from_config(unet.config) == SDXL_BASE_LAYOUT
    assert len(target_module_names(unet, "unet", "attn_mlp")) == 722  # kohya's default set on SDXL
    names = target_module_names(unet, "unet", "all")
    lora = LoraWeights(torch.zeros(1, 1), torch.zeros(1, 1), 1.0)
    sd = to_kohya_state_dict({"unet": {n: lora for n in names}}, "sdxl")
    assert "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2.lora_down.weight" in sd
    # diffusers' SGM -> diffusers conversion (what load_lora_weights runs) lands on exactly our modules.
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(dict(sd), unet_config=unet.config)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert {k.rsplit(".lora_", 1)[0] for k in peft} == set(names)
    back = from_kohya_state_dict(sd, {"unet": [n for n, _ in unet.named_modules()]})
    assert sorted(back["unet"]) == sorted(names)


def test_ldm_layout_from_config_and_names(pipes):
    # SD1.x: the first up block has no attention, so its upsampler is output_blocks.2.1.conv (A1111's mapping).
    sd1 = unet_layout_from_config({
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    })
    assert unet_path_to_ldm("up_blocks.0.upsamplers.0.conv", sd1) == "output_blocks.2.1.conv"
    assert unet_path_to_ldm("up_blocks.1.upsamplers.0.conv", sd1) == "output_blocks.5.2.conv"
    assert unet_path_to_ldm("up_blocks.3.attentions.2.proj_out", sd1) == "output_blocks.11.1.proj_out"
    for name, pipe in pipes.items():
        names = [n for n, _ in pipe.unet.named_modules()]
        assert unet_layout_from_names(names) == unet_layout_from_config(pipe.unet.config), name
    assert unet_layout_from_config(pipes["tiny-sdxl"].unet.config) == SDXL_BASE_LAYOUT
    with pytest.raises(ValueError):
        unet_path_to_ldm("down_blocks.0.resnets.0.nonlinearity", SDXL_BASE_LAYOUT)


# ----------------------------------------------------------------------------------------------------------------
# Import: round trips and other key styles
# ----------------------------------------------------------------------------------------------------------------


def assert_layers_equal(got, want, exact=True, file_dtype=torch.float32):
    assert sorted(got) == sorted(want)
    for component in want:
        assert sorted(got[component]) == sorted(want[component]), component
        for name, w in want[component].items():
            g = got[component][name]
            if exact:
                assert torch.equal(g.down, w.down) and torch.equal(g.up, w.up) and g.alpha == w.alpha, name
            else:
                torch.testing.assert_close(expected_delta(g, torch.float32), expected_delta(w, file_dtype), msg=name)


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
@pytest.mark.parametrize("targets", TARGETS)
def test_kohya_round_trip(pipes, trained, name, targets):
    layers = trained(name, targets)
    sd = to_kohya_state_dict(layers, ARCH[name], torch.float32, unet_config=pipes[name].unet.config)
    assert_layers_equal(from_kohya_state_dict(sd, module_names(pipes[name], name)), layers)


def test_peft_file_round_trip(pipes, trained, tmp_path):
    layers = trained("tiny-sd15", "all")
    path = save_peft_lora(layers, tmp_path / "peft", dtype=torch.float32)
    assert path.name == "pytorch_lora_weights.safetensors"
    sd, _ = read_lora_file(path)
    assert all(k.startswith(("unet.", "text_encoder.")) for k in sd)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
    assert any(k.startswith("text_encoder.text_model.encoder.layers.") for k in sd)
    back = from_kohya_state_dict(sd, module_names(pipes["tiny-sd15"], "tiny-sd15"))
    # The format has no alpha: alpha / r is folded into lora_B, the delta is unchanged.
    assert all(w.alpha == RANK for c in back.values() for w in c.values())
    assert_layers_equal(back, layers, exact=False)


def test_other_key_styles(pipes, trained):
    layers = trained("tiny-sd15", "attn")
    names = module_names(pipes["tiny-sd15"], "tiny-sd15")
    peft = to_peft_state_dict(layers, torch.float32)
    # diffusers' non-peft `lora.down`/`lora.up` spelling, with transformers-5 text-encoder paths (no text_model.).
    dotted = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.").replace(".text_model.", "."): v
              for k, v in peft.items()}
    assert_layers_equal(from_kohya_state_dict(dotted, names), layers, exact=False)
    # The old attention-processor format: attn1.processor.to_q_lora.down.weight, to_out_lora for to_out.0.
    old = {}
    for k, v in peft.items():
        if k.startswith("unet."):
            module, _, kind = k.rpartition(".lora_")
            module = module.replace(".to_out.0", ".to_out").replace(".attn1.", ".attn1.processor.").replace(
                ".attn2.", ".attn2.processor.")
            k = f"{module}_lora.{'down' if kind.startswith('A') else 'up'}.weight"
        old[k] = v
    assert_layers_equal(from_kohya_state_dict(old, names), layers, exact=False)


def test_kohya_file_without_alpha_and_with_te1_prefix(pipes, trained):
    layers = trained("tiny-sd15", "attn")
    sd = {k: v for k, v in to_kohya_state_dict(layers, "sd1", torch.float32).items() if not k.endswith(".alpha")}
    sd = {k.replace("lora_te_", "lora_te1_"): v for k, v in sd.items()}  # ComfyUI reads both for CLIP-L
    back = from_kohya_state_dict(sd, module_names(pipes["tiny-sd15"], "tiny-sd15"))
    assert all(w.alpha == RANK for c in back.values() for w in c.values())
    assert len(back["text_encoder"]) == len(layers["text_encoder"])


def test_import_errors(pipes, trained):
    names = module_names(pipes["tiny-sd15"], "tiny-sd15")
    sd = to_kohya_state_dict(trained("tiny-sd15", "attn"), "sd1")
    with pytest.raises(LoraFileError, match="LoHa"):
        from_kohya_state_dict({**sd, "lora_unet_conv_in.hada_w1_a": torch.zeros(1)}, names)
    with pytest.raises(LoraFileError, match="LoKr"):
        from_kohya_state_dict({"lora_unet_conv_in.lokr_w1": torch.zeros(1)}, names)
    with pytest.raises(LoraFileError, match="lora_unet_not_a_module"):
        from_kohya_state_dict({**sd, "lora_unet_not_a_module.lora_down.weight": torch.zeros(1, 1)}, names)
    with pytest.raises(LoraFileError, match="match no module"):  # an SDXL file on an SD1.x model
        from_kohya_state_dict({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 1)},
                              names)
    up_only = {k: v for k, v in sd.items() if "lora_down" not in k}
    with pytest.raises(LoraFileError, match="no down weight"):
        from_kohya_state_dict(up_only, names)


# ----------------------------------------------------------------------------------------------------------------
# Reading files safely
# ----------------------------------------------------------------------------------------------------------------


def test_read_lora_file_refuses_bad_files(tmp_path, trained):
    good = save_kohya_lora(trained("tiny-sd15", "attn"), "sd1", tmp_path / "good.safetensors", {"k": "v"})
    tensors, metadata = read_lora_file(good)
    assert metadata["k"] == "v" and len(tensors) == 3 * (128 + 48)  # attn: 16 x 8 UNet + 12 x 4 TE modules
    data = good.read_bytes()
    cases = {
        "truncated.safetensors": data[: len(data) - 100],
        "random.safetensors": bytes(range(256)) * 4,
        "empty.safetensors": b"",
        "header.safetensors": (20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 64,
        "huge.safetensors": (2**62).to_bytes(8, "little") + b"{}",
        "renamed.safetensors": pickle.dumps({"a": 1}),
        "lora.ckpt": data,
        "lora.pt": data,
    }
    for filename, content in cases.items():
        path = tmp_path / filename
        path.write_bytes(content)
        with pytest.raises(LoraFileError, match=filename.replace(".", r"\.")):
            read_lora_file(path)
    with pytest.raises(LoraFileError, match="pickle"):
        read_lora_file(tmp_path / "lora.ckpt")
    with pytest.raises(LoraFileError, match="no such file"):
        read_lora_file(tmp_path / "missing.safetensors")


def test_load_lora_layers_names_the_file(pipes, trained, tmp_path):
    path = save_kohya_lora(trained("tiny-sdxl", "attn"), "sdxl", tmp_path / "xl.safetensors", {})
    with pytest.raises(LoraFileError, match="xl.safetensors"):
        load_lora_layers(path, module_names(pipes["tiny-sd15"], "tiny-sd15"))
    layers, _ = load_lora_layers(path, module_names(pipes["tiny-sdxl"], "tiny-sdxl"))
    assert_layers_equal(layers, trained("tiny-sdxl", "attn"), exact=False, file_dtype=torch.float16)


def test_detect_arch_and_inspect(trained, tmp_path):
    xl = to_kohya_state_dict(trained("tiny-sdxl", "attn"), "sdxl")
    assert detect_arch(xl) == "sdxl"
    sd1 = to_kohya_state_dict(trained("tiny-sd15", "attn"), "sd1")
    with pytest.raises(LoraFileError):
        detect_arch(sd1)  # tiny widths say nothing
    assert detect_arch(sd1, {"ss_base_model_version": "sd_v1"}) == "sd1"
    context = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    assert detect_arch({context: torch.zeros(4, 1024)}) == "sd2"
    assert detect_arch({context: torch.zeros(4, 768)}) == "sd1"

    layers = copy.deepcopy(trained("tiny-sd15", "attn"))
    first = next(iter(layers["unet"]))
    layers["unet"][first].up.zero_()
    layers["text_encoder"][next(iter(layers["text_encoder"]))].down[0, 0] = float("nan")
    metadata = build_metadata(Config(), "sd1", run_info(tag_frequency={"10_cat": {"cat": 3, "red": 1}}))
    path = save_kohya_lora(layers, "sd1", tmp_path / "x.safetensors", metadata)
    report = inspect_lora(path)
    assert "architecture: sd1" in report and "unet: 128 modules" in report and "text_encoder: 48 modules" in report
    assert "rank 4 alpha 2" in report and "float16" in report and "cat (3)" in report
    assert "NaN/Inf" in report and "all-zero up weight" in report


# ----------------------------------------------------------------------------------------------------------------
# Metadata and hashes
# ----------------------------------------------------------------------------------------------------------------

REQUIRED = (
    "ss_network_module ss_network_dim ss_network_alpha ss_network_args ss_base_model_version ss_v2 ss_resolution "
    "ss_learning_rate ss_unet_lr ss_text_encoder_lr ss_optimizer ss_lr_scheduler ss_max_train_steps ss_steps ss_epoch "
    "ss_num_train_images ss_batch_size_per_device ss_mixed_precision ss_seed ss_training_started_at "
    "ss_training_finished_at ss_output_name ss_sd_model_name ss_tag_frequency ss_dataset_dirs ss_noise_offset "
    "ss_min_snr_gamma ss_clip_skip ss_caption_dropout_rate ss_keep_tokens ss_shuffle_caption "
    "modelspec.sai_model_spec modelspec.architecture modelspec.implementation modelspec.title modelspec.resolution "
    "modelspec.date modelspec.prediction_type"
).split()


@pytest.mark.parametrize("arch,prediction,architecture,version", [
    ("sd1", "epsilon", "stable-diffusion-v1/lora", "sd_v1"),
    ("sd2", "v_prediction", "stable-diffusion-v2-768-v/lora", "sd_v2_768_v"),
    ("sd2", "epsilon", "stable-diffusion-v2-512/lora", "sd_v2"),
    ("sdxl", "epsilon", "stable-diffusion-xl-v1-base/lora", "sdxl_base_v1-0"),
])
def test_build_metadata(arch, prediction, architecture, version):
    cfg = Config()
    cfg.export.author, cfg.export.trigger_phrase = "me", "zkstyle"
    info = run_info(
        prediction_type=prediction,
        sd_model_name="/home/someone/models/base-model.safetensors",
        dataset_dirs={"/data/train/10_cat": {"n_repeats": 10, "img_count": 3}},
        tag_frequency={"C:\\data\\10_cat": {"cat": 3}},
        extra={"ss_note": "hi"},
    )
    meta = build_metadata(cfg, arch, info)
    assert all(isinstance(v, str) for v in meta.values())
    assert set(REQUIRED) <= set(meta)
    for key in ("ss_network_args", "ss_tag_frequency", "ss_dataset_dirs"):
        assert isinstance(json.loads(meta[key]), dict)
    assert not any(s in v for v in meta.values() for s in ("/home", "/data", "C:\\", "\\data"))
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_cat": {"n_repeats": 10, "img_count": 3}}
    assert json.loads(meta["ss_tag_frequency"]) == {"10_cat": {"cat": 3}}
    assert meta["ss_sd_model_name"] == "base-model.safetensors"
    assert meta["modelspec.architecture"] == architecture and meta["ss_base_model_version"] == version
    assert meta["ss_v2"] == str(arch == "sd2")
    assert meta["modelspec.prediction_type"] == ("v" if prediction == "v_prediction" else "epsilon")
    assert meta["modelspec.implementation"] == ("https://github.com/Stability-AI/generative-models"
                                                if arch == "sdxl" else "diffusers")
    assert meta["modelspec.date"] == "2023-11-14T22:15:00+00:00"
    assert meta["modelspec.title"] == "lora" and meta["modelspec.resolution"] == "512x512"
    assert meta["modelspec.author"] == "me" and meta["modelspec.trigger_phrase"] == "zkstyle"
    assert "modelspec.description" not in meta and meta["ss_note"] == "hi"
    assert meta["ss_network_dim"] == "16" and meta["ss_network_alpha"] == "16"
    assert "loraplus_lr_ratio" not in json.loads(meta["ss_network_args"])
    cfg.train.loraplus_lr_ratio = 16.0
    assert json.loads(build_metadata(cfg, arch, info)["ss_network_args"])["loraplus_lr_ratio"] == "16"


def test_build_metadata_rejects_bad_info():
    with pytest.raises(ValueError, match="absolute path"):
        build_metadata(Config(), "sd1", run_info(extra={"ss_source": "/home/me/x"}))
    with pytest.raises(ValueError, match="replace"):
        build_metadata(Config(), "sd1", run_info(extra={"ss_steps": "1"}))


def payload_sha256(path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def test_hashes(trained, tmp_path):
    from safetensors.torch import save

    layers = trained("tiny-sd15", "attn")
    meta = build_metadata(Config(), "sd1", run_info())
    a = save_kohya_lora(layers, "sd1", tmp_path / "a.safetensors", meta)
    b = save_kohya_lora(layers, "sd1", tmp_path / "b.safetensors", {**meta, "modelspec.title": "another title " * 9})
    _, meta_a = read_lora_file(a)
    _, meta_b = read_lora_file(b)
    assert a.read_bytes() != b.read_bytes()
    assert meta_a["sshs_model_hash"] == meta_b["sshs_model_hash"] == payload_sha256(a) == payload_sha256(b)
    # The payload does not depend on metadata: hashing an in-memory serialisation without any gives the same.
    bare = save(to_kohya_state_dict(layers, "sd1"))
    assert hashlib.sha256(bare[8 + int.from_bytes(bare[:8], "little"):]).hexdigest() == meta_a["sshs_model_hash"]
    assert file_hashes(a) == {k: meta_a[k] for k in ("sshs_model_hash", "sshs_legacy_hash")}
    assert meta_a["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]  # file < 1 MiB: A1111 hashes b""


def test_legacy_hash_of_a_large_file(tmp_path):
    # > 1.06 MiB, so A1111's window (0x10000 bytes at 0x100000) lies inside the tensors, after the header.
    g = torch.Generator().manual_seed(0)
    big = {"unet": {"down_blocks.0.attentions.0.proj_in": LoraWeights(torch.randn(8, 40000, generator=g),
                                                                       torch.randn(40000, 8, generator=g), 8.0)}}
    path = save_kohya_lora(big, "sd1", tmp_path / "big.safetensors", {"ss_output_name": "big"})
    data = path.read_bytes()
    assert len(data) > 0x110000
    _, meta = read_lora_file(path)
    assert meta["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert meta["sshs_model_hash"] == payload_sha256(path)
