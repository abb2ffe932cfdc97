"""Single-file checkpoints (LDM/A1111 layout): detection, offline loading, writing, pickle and hub refusals."""

import json
import re
import socket
from importlib import resources

import pytest
import torch
from safetensors.torch import load_file

from sdlora.atomic import save_safetensors
from sdlora.errors import ModelError
from sdlora.models import single_file as sf
from sdlora.models.arch import component_names
from sdlora.models.loading import BaseModel, detect_model, encode_prompt, load_base_model, tokenize
from sdlora.models.meta import empty_model

PROMPTS = ["zkstyle, a lighthouse on a cliff", ""]
U = "model.diffusion_model."


@pytest.fixture(scope="module")
def tiny():
    """The tiny models loaded once for the module (tests must not modify them)."""
    return {name: load_base_model(name) for name in ("tiny-sd15", "tiny-sdxl")}


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if anything opens a connection (and tell huggingface_hub it is offline)."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _public_config(model) -> dict:
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("dtype", "torch_dtype")}


def _assert_same_model(a, b, outputs: bool = False):
    """Every tensor equal; with `outputs` also the same tokens, text states, UNet and VAE outputs."""
    assert a.arch == b.arch
    for x, y in zip([a.unet, a.vae, *a.text_encoders], [b.unet, b.vae, *b.text_encoders], strict=True):
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys()
        assert [k for k in sx if not torch.equal(sx[k], sy[k])] == []
        assert _public_config(x) == _public_config(y)
    if not outputs:
        return
    ids_a, ids_b = tokenize(a.tokenizers, PROMPTS), tokenize(b.tokenizers, PROMPTS)
    assert all(torch.equal(p, q) for p, q in zip(ids_a, ids_b, strict=True))
    with torch.no_grad():
        (states_a, pooled_a), (states_b, pooled_b) = (encode_prompt(m.arch, m.text_encoders, ids_a) for m in (a, b))
        assert torch.equal(states_a, states_b) and (pooled_a is None or torch.equal(pooled_a, pooled_b))
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        added = None
        if a.arch == "sdxl":
            added = {"text_embeds": pooled_a, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
        timesteps = torch.tensor([10, 500])
        out_a, out_b = (m.unet(latents, timesteps, states_a, added_cond_kwargs=added).sample for m in (a, b))
        assert torch.equal(out_a, out_b)
        assert torch.equal(a.vae.decode(latents).sample, b.vae.decode(latents).sample)


@pytest.mark.parametrize("name, arch, keys", [
    ("tiny-sd15", "sd1", [U + "input_blocks.3.0.op.weight", U + "output_blocks.2.1.conv.weight",
                          "first_stage_model.encoder.mid.attn_1.q.weight",
                          "cond_stage_model.transformer.text_model.final_layer_norm.weight"]),
    ("tiny-sdxl", "sdxl", [U + "label_emb.0.0.weight", U + "output_blocks.2.2.conv.weight",
                           "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                           "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                           "conditioner.embedders.1.model.text_projection"]),
])
def test_round_trip(tmp_path, no_network, tiny, name, arch, keys):
    base = tiny[name]
    assert detect_model(name) == arch
    path = sf.save_single_file(base, tmp_path / f"{name}.safetensors")
    written = load_file(path)
    assert set(keys) <= set(written) and written[keys[0]].dtype == torch.float32
    assert detect_model(str(path)) == arch
    back = load_base_model(str(path))
    assert back.path == path and back.prediction_type == "epsilon"
    _assert_same_model(base, back, outputs=True)


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_diffusers_reads_our_files(tmp_path, no_network, tiny, name):
    """A pipeline written as one file loads in diffusers' own single-file loader (given the local configs) with
    the same tensors: the layout is the one other tools read, not just one we read back."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from sdlora.generate.pipeline import build_pipeline

    base = tiny[name]
    pipe = build_pipeline(base.arch, base.unet, base.vae, base.text_encoders, base.tokenizers, base.scheduler_config)
    path = sf.save_single_file(pipe, tmp_path / "model.safetensors", arch=base.arch)
    cls, extra = StableDiffusionPipeline, {"safety_checker": None}
    if base.arch == "sdxl":
        cls, extra = StableDiffusionXLPipeline, {}
    other = cls.from_single_file(str(path), config=str(base.path), local_files_only=True, **extra)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if hasattr(pipe, part):
            mine, theirs = getattr(pipe, part).state_dict(), getattr(other, part).state_dict()
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def _tiny_configs(name: str, part: str) -> dict:
    config = json.loads((resources.files("sdlora") / "model_configs" / name / f"{part}.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _tiny_sd2() -> dict:
    """SD 2.x-shaped tiny parts: linear-projection UNet, gelu (OpenCLIP-style) text encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**_tiny_configs("tiny-sd15", "unet"), "use_linear_projection": True,
                                   "attention_head_dim": [2, 4, 4, 4]})
    vae = AutoencoderKL(**_tiny_configs("tiny-sd15", "vae"))
    text = CLIPTextModel(CLIPTextConfig(**{**_tiny_configs("tiny-sd15", "text_encoder"), "hidden_act": "gelu",
                                           "num_hidden_layers": 3}))
    scheduler = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012, "prediction_type": "v_prediction"}
    return {"arch": "sd2", "unet": unet.eval(), "vae": vae.eval(), "text_encoders": [text.eval()],
            "scheduler_config": scheduler}


def test_tiny_sd2_with_real_file_extras(tmp_path, no_network):
    parts = _tiny_sd2()
    tensors, configs = sf.single_file_state_dict(parts)
    assert sf.detect_checkpoint(tensors) == "sd2"
    # Real SD 2.x files also hold OpenCLIP-H's last layer and projection, which SD 2.x does not use.
    layer = {k.replace("resblocks.2.", "resblocks.3."): v.clone() for k, v in tensors.items() if ".resblocks.2." in k}
    extras = {**layer, "cond_stage_model.model.text_projection": torch.ones(32, 32),
              "cond_stage_model.model.logit_scale": torch.tensor(1.0)}
    path = tmp_path / "sd2.safetensors"
    save_safetensors({**tensors, **extras}, path, {sf.CONFIG_METADATA_KEY: json.dumps(configs)})
    back = load_base_model(str(path))
    assert back.arch == "sd2" and back.prediction_type == "v_prediction"
    assert back.tokenizers[0].pad_token == "!"
    expected = BaseModel("sd2", path, parts["unet"], parts["vae"], parts["text_encoders"], back.tokenizers)
    _assert_same_model(expected, back)


def test_foreign_files_use_shipped_configs(tmp_path, monkeypatch, no_network):
    """Files without our metadata (A1111/civitai downloads, pickles) are built from sdlora/model_configs/."""
    tensors, configs = sf.single_file_state_dict(_tiny_sd2())
    path = tmp_path / "foreign.safetensors"
    save_safetensors(tensors, path)
    shipped = r"\(SD 2.x, configs from sdlora/model_configs/sd2\): unet does not fit its config: \d+ shape mismatches"
    with pytest.raises(ModelError, match=shipped):
        load_base_model(str(path))
    monkeypatch.setattr(sf, "shipped_configs", lambda arch: {**configs, "scheduler": {"prediction_type": "epsilon"}})
    assert load_base_model(str(path)).prediction_type == "v_prediction"  # SD 2.x saying nothing: 768-v
    assert load_base_model(str(path), prediction_type="epsilon").prediction_type == "epsilon"
    save_safetensors(tensors, path, {"modelspec.prediction_type": "epsilon"})
    assert load_base_model(str(path)).prediction_type == "epsilon"


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_real_size_configs_match_the_original_layout(arch):
    """The shipped real-size configs give the key counts of the official files, and read back (meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = sf.shipped_configs(arch)
    parts = {"unet": empty_model(UNet2DConditionModel, **sf._public(configs["unet"])),
             "vae": empty_model(AutoencoderKL, **sf._public(configs["vae"])), "scheduler_config": configs["scheduler"],
             "text_encoders": [empty_model(CLIPTextModelWithProjection if c == "text_encoder_2" else CLIPTextModel,
                                           CLIPTextConfig.from_dict(sf._public(configs[c])))
                               for c in component_names(arch)]}
    tensors, _ = sf.single_file_state_dict(parts, arch)
    counts = {"sd1": (686, 248, 196), "sd2": (686, 248, 23 * 12 + 4), "sdxl": (1680, 248, 196 + 389)}[arch]
    assert (sum(k.startswith(U) for k in tensors), sum(k.startswith(sf.VAE_PREFIX) for k in tensors),
            sum(k.startswith(("cond_stage_model.", "conditioner.")) for k in tensors)) == counts
    assert sf.detect_checkpoint(tensors) == arch
    if arch == "sd2":  # the official file's 24th layer and projection are dropped on load
        last = {k.replace("resblocks.22.", "resblocks.23."): v for k, v in tensors.items() if ".resblocks.22." in k}
        tensors.update(last)
        tensors["cond_stage_model.model.text_projection"] = torch.empty(1024, 1024, device="meta")

    def under(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    sf._load_unet(under(U), configs["unet"], arch)
    sf._load_vae_state(sf._ldm_vae_to_diffusers(under(sf.VAE_PREFIX), configs["vae"]), configs["vae"], arch)
    for component, (prefix, layout) in zip(component_names(arch), sf.TEXT_ENCODERS[arch]):
        sf._load_text_encoder(under(prefix), prefix, layout, configs[component], component == "text_encoder_2", arch)


S = (4,)  # any shape where only the key matters
ATTN2 = U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
SD1 = {U + "input_blocks.0.0.weight": (320, 4, 3, 3), ATTN2: (320, 768)}


@pytest.mark.parametrize("shapes, expected", [
    ({**SD1, "cond_stage_model.transformer.text_model.final_layer_norm.weight": S}, "sd1"),
    (SD1, "sd1"),
    ({**SD1, ATTN2: (320, 1024), "cond_stage_model.model.ln_final.weight": S}, "sd2"),
    ({**SD1, ATTN2: (320, 1024)}, "sd2"),
    ({**SD1, "conditioner.embedders.1.model.ln_final.weight": S}, "sdxl"),
    ({**SD1, ATTN2: (320, 2048), U + "label_emb.0.0.weight": S}, "sdxl"),
    ({}, "holds no tensors"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": S}, "looks like a LoRA (lora_unet_"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": S}, "looks like a LoRA (lora_A"),
    ({"encoder.down.0.block.0.conv1.weight": S}, "looks like a VAE alone; pass it as model.vae"),
    ({**SD1, "conditioner.embedders.0.model.ln_final.weight": S}, "SDXL refiner"),
    ({**SD1, U + "input_blocks.0.0.weight": (320, 9, 3, 3)}, "9 input channels"),
    ({"w": (3, 3), "b": (3,)}, "not a Stable Diffusion checkpoint: 2 tensors"),
])
def test_detect_checkpoint(shapes, expected):
    if expected in ("sd1", "sd2", "sdxl"):
        assert sf.detect_checkpoint(shapes) == expected
    else:
        with pytest.raises(ModelError, match=re.escape(expected)):
            sf.detect_checkpoint(shapes, "x.safetensors")


def test_pickle_refused_unless_allowed(tmp_path, monkeypatch, no_network, tiny, capsys):
    base = tiny["tiny-sd15"]
    tensors, configs = sf.single_file_state_dict(base)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors, "global_step": 3}, path)  # the Lightning-era wrapping
    with pytest.raises(ModelError, match="pickle checkpoints can run arbitrary code.*allow_unsafe_pickle"):
        load_base_model(str(path))
    monkeypatch.setattr(sf, "shipped_configs", lambda arch: configs)  # a pickle carries no config metadata
    _assert_same_model(base, load_base_model(str(path), allow_unsafe_pickle=True))

    from sdlora.cli import main

    args = ["generate", "--model", str(path), "--prompt", "a cat", "--width", "64", "--height", "64", "--steps", "1",
            "--out", str(tmp_path / "out")]
    assert main(args) == 1 and "pickle checkpoints can run arbitrary code" in capsys.readouterr().err
    assert main(args + ["--allow-unsafe-pickle"]) == 0 and len(list((tmp_path / "out").glob("*.png"))) == 1


def test_not_a_base_model(tmp_path, no_network):
    lora = tmp_path / "style.safetensors"
    save_safetensors({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 16),
                      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(16, 4)}, lora)
    with pytest.raises(ModelError, match=r"style.safetensors: looks like a LoRA \(lora_unet_"):
        load_base_model(str(lora))
    with pytest.raises(ModelError, match="model.vae looks like a LoRA"):
        load_base_model("tiny-sd15", vae=str(lora))
    noise = tmp_path / "noise.safetensors"
    save_safetensors({"a": torch.randn(3, 3)}, noise)
    with pytest.raises(ModelError, match="not a Stable Diffusion checkpoint: 1 tensors"):
        load_base_model(str(noise))


def test_hub_id_needs_network(monkeypatch, no_network):
    with pytest.raises(ModelError, match="runwayml/stable-diffusion-v1-5: not a local path; hub ids need a network"):
        load_base_model("runwayml/stable-diffusion-v1-5")
    from diffusers import DiffusionPipeline

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(DiffusionPipeline, "download", unreachable)
    with pytest.raises(ModelError, match="not a local path.*ConnectionError: no route to host"):
        load_base_model("owner/name")


def test_single_file_vae(tmp_path, no_network, tiny):
    base = tiny["tiny-sd15"]
    full = sf.save_single_file(base, tmp_path / "model.safetensors")
    other = {k: v + 1.0 for k, v in base.vae.state_dict().items()}
    ldm = tmp_path / "vae-ldm.safetensors"  # how A1111 VAEs ship: LDM keys with no prefix
    save_safetensors(sf.vae_to_ldm(other, dict(base.vae.config), prefix=""), ldm)
    diffusers_keys = tmp_path / "vae-diffusers.safetensors"
    save_safetensors(other, diffusers_keys)
    for model, vae, expected in [("tiny-sd15", ldm, other), (str(full), diffusers_keys, other),
                                 ("tiny-sd15", full, base.vae.state_dict())]:  # a whole checkpoint's VAE
        loaded = load_base_model(model, vae=str(vae)).vae.state_dict()
        assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in loaded)


def test_writer_refuses_unmerged_lora(tmp_path, tiny):
    import copy

    from peft import LoraConfig

    base = tiny["tiny-sd15"]
    unet = copy.deepcopy(base.unet)
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    parts = {"arch": "sd1", "unet": unet, "vae": base.vae, "text_encoders": base.text_encoders}
    with pytest.raises(ModelError, match="merge LoRA adapters first"):
        sf.save_single_file(parts, tmp_path / "merged.safetensors")
    assert not (tmp_path / "merged.safetensors").exists()
