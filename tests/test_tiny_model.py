"""The embedded tiny models are the real architectures at small widths, deterministic, loadable by diffusers."""

import importlib.util
from pathlib import Path

import pytest
import torch

from sdlora.models.clip_tokenizer import load_clip_tokenizer
from sdlora.models.loading import detect_arch, encode_prompt, load_base_model, tokenize
from sdlora.models.tiny import build_tiny_model

PROMPTS = [
    "a photo of a cat",
    "Hello, World!! it's 3.14 -- café naïve 日本語 🎨 (masterpiece:1.2), <lora:x:0.8>",
    "zkstyle, a lighthouse   on a cliff,\tnight",
    "",
]


def _open_clip_tokenizer():
    # Import open_clip's tokenizer.py alone: the package __init__ needs torchvision, which we do not install.
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open-clip-torch not installed (make test installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_matches_open_clip(prompt):
    reference = _open_clip_tokenizer()
    ours = load_clip_tokenizer()
    expected = [reference.sot_token_id] + reference.encode(prompt) + [reference.eot_token_id]
    assert ours(prompt).input_ids == expected
    assert len(ours.get_vocab()) == 49408 and ours.model_max_length == 77


@pytest.mark.parametrize("name, arch", [("tiny-sd15", "sd1"), ("tiny-sdxl", "sdxl")])
def test_tiny_model_forward_shapes(name, arch):
    base = load_base_model(name)
    assert base.arch == arch
    ids = tokenize(base.tokenizers, ["zkstyle, a cat", "a boat"])
    states, pooled = encode_prompt(arch, base.text_encoders, ids)
    cross_dim = base.unet.config.cross_attention_dim
    assert states.shape == (2, 77, cross_dim)
    latents = base.vae.encode(torch.zeros(2, 3, 64, 64)).latent_dist.mode()
    assert latents.shape == (2, 4, 8, 8)
    added = None
    if arch == "sdxl":
        assert base.text_encoders[1].config.hidden_size + base.text_encoders[0].config.hidden_size == cross_dim
        assert pooled.shape == (2, base.text_encoders[1].config.projection_dim)
        added = {"text_embeds": pooled, "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)}
    else:
        assert pooled is None
    out = base.unet(latents, torch.tensor([10, 500]), states, added_cond_kwargs=added).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_tiny_model_is_deterministic_and_a_diffusers_folder(tmp_path, sd15_path):
    from safetensors.torch import load_file

    again = build_tiny_model("tiny-sd15", tmp_path / "again")
    for part in ("unet", "vae", "text_encoder"):
        a = load_file(next((sd15_path / part).glob("*.safetensors")))
        b = load_file(next((again / part).glob("*.safetensors")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (again / "model_index.json").is_file() and (again / "tokenizer" / "tokenizer_config.json").is_file()


def test_detect_arch():
    assert detect_arch({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}, {}) == "sdxl"
    assert detect_arch({}, {"cross_attention_dim": 1024}) == "sd2"
    assert detect_arch({}, {"cross_attention_dim": 768}) == "sd1"
