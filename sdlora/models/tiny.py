"""The embedded tiny models: random-init SD1.x- and SDXL-shaped pipelines built from shipped configs.

No weights can be downloaded in tests or the demo, so we build the *real* architectures (UNet2DConditionModel,
CLIPTextModel(WithProjection), AutoencoderKL, the real CLIP tokenizer) at tiny widths, deterministically from a
seed, and save them as ordinary diffusers folders: every later code path (load, train, export, generate) is the
one a real checkpoint takes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from sdlora.models.clip_tokenizer import load_clip_tokenizer

if TYPE_CHECKING:  # torch is imported in the functions that use it, so importing this module stays cheap
    import torch

# Pretrained on the toy world by sdlora.toyworld.pretrain: its fp16 weights ship beside its configs.
TOY_MODELS = ("toy-sd15",)
TINY_MODELS = TOY_MODELS + ("tiny-sd15", "tiny-sdxl")
# The real widths with random weights, from the shipped configs: for GPU benchmarks only (GBs on disk, saved fp16).
FULL_SIZE_MODELS = ("sd15", "sdxl")
DEFAULT_SEED = 0


def tiny_model_path(name: str, seed: int = DEFAULT_SEED) -> Path:
    """Path of the cached tiny model `name`, building it on first use.

    The cache key hashes the shipped configs (and weights) and the seed, so editing one rebuilds the model.
    Set SDLORA_CACHE to move the cache (default ~/.cache/sdlora).
    """
    if name not in TINY_MODELS + FULL_SIZE_MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(TINY_MODELS + FULL_SIZE_MODELS)}")
    digest = hashlib.sha256(f"{seed}".encode())
    for shipped in sorted(config_dir(name).glob("*.json")) + sorted(config_dir(name).glob("*.safetensors")):
        digest.update(shipped.read_bytes())
    cache = Path(os.environ.get("SDLORA_CACHE", Path.home() / ".cache" / "sdlora"))
    out = cache / f"{name}-{digest.hexdigest()[:12]}"
    if not (out / "model_index.json").is_file():
        build_tiny_model(name, out, seed)
    return out


def build_tiny_model(name: str, out_dir: str | Path, seed: int = DEFAULT_SEED) -> Path:
    """Build tiny model `name` from its shipped configs with `seed` and save it as a diffusers folder.

    The folder is written under a temporary name and renamed, so an interrupted build leaves nothing half-made.
    """
    import torch

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    pipe = _build_pipeline(name, seed)
    if name in FULL_SIZE_MODELS:
        pipe.to(torch.float16)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def config_dir(name: str) -> Path:
    return Path(str(resources.files("sdlora") / "model_configs" / name))


def read_config(name: str, part: str) -> dict:
    """The shipped config of one component (`unet`, `vae`, `text_encoder`, `scheduler`, ...) of model `name`."""
    config = json.loads((config_dir(name) / f"{part}.json").read_text())
    if part == "scheduler":
        return config
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_components(name: str, seed: int) -> tuple:
    """(unet, vae, text_encoder) of model `name`, randomly initialised from its shipped configs."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def seeded(offset: int):
        # Each component gets its own seed so adding a component never changes the others' weights.
        torch.manual_seed(seed * 1000 + offset)

    seeded(0)
    unet = UNet2DConditionModel(**read_config(name, "unet"))
    seeded(1)
    vae = AutoencoderKL(**read_config(name, "vae"))
    seeded(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**read_config(name, "text_encoder")))
    return unet, vae, text_encoder


def shipped_weights(name: str, component: str) -> Path:
    return config_dir(name) / f"{component}.safetensors"


def load_shipped_weights(name: str, components: dict[str, torch.nn.Module]) -> None:
    """Load the shipped fp16 weights of a toy model into its components; every key must match the config."""
    from safetensors.torch import load_file

    for component, module in components.items():
        module.load_state_dict(load_file(str(shipped_weights(name, component))), strict=True)


def _build_pipeline(name: str, seed: int):
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    unet, vae, text_encoder = build_components(name, seed)
    if name in TOY_MODELS:
        load_shipped_weights(name, {"unet": unet, "vae": vae, "text_encoder": text_encoder})
    scheduler_config = read_config(name, "scheduler")
    scheduler = getattr(diffusers, scheduler_config.pop("_class_name")).from_config(scheduler_config)
    common = dict(vae=vae, text_encoder=text_encoder, tokenizer=load_clip_tokenizer(), unet=unet, scheduler=scheduler)
    if name.endswith("sdxl"):
        torch.manual_seed(seed * 1000 + 3)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**read_config(name, "text_encoder_2")))
        return diffusers.StableDiffusionXLPipeline(
            **common, text_encoder_2=text_encoder_2, tokenizer_2=load_clip_tokenizer(pad_token="!")
        )
    return diffusers.StableDiffusionPipeline(
        **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
