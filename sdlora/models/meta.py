"""Models built from configs on PyTorch's meta device: real shapes and no weights, for estimates that must not load
anything (`sdlora plan`'s memory, `sdlora bench`'s FLOPs) and for loaders that fill every weight right away."""

from __future__ import annotations

from typing import Any

import torch

from sdlora.models.clip_tokenizer import CLIP_POSITIONS


def empty_model(cls, *args, **kwargs) -> torch.nn.Module:
    """`cls(*args, **kwargs)` with parameters on the meta device: no random init of weights replaced right away."""
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights

    with init_empty_weights(), no_init_weights():  # meta tensors, and skip the (slow on meta) init functions
        return cls(*args, **kwargs)


def meta_models(arch: str, configs: dict, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """{"unet", "vae", "te1"[, "te2"]} of `arch` from its diffusers configs, frozen, in `dtype` (the VAE in fp32,
    as training keeps it)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def public(c):
        return {k: v for k, v in c.items() if not k.startswith("_")}

    models = {"unet": empty_model(UNet2DConditionModel.from_config, public(configs["unet"])),
              "vae": empty_model(AutoencoderKL.from_config, public(configs["vae"])),
              "te1": empty_model(CLIPTextModel, CLIPTextConfig(**public(configs["text_encoder"])))}
    if arch == "sdxl":
        models["te2"] = empty_model(CLIPTextModelWithProjection, CLIPTextConfig(**public(configs["text_encoder_2"])))
    for name, m in models.items():
        m.requires_grad_(False).to(torch.float32 if name == "vae" else dtype)
    return models


def meta_unet_inputs(unet, resolution: int, dtype: torch.dtype) -> tuple:
    """(latents, timestep, text states, SDXL added conditions or None) for one image at `resolution`, on the meta
    device: what the UNet's forward pass takes, with the real shapes and no data."""
    c = unet.config
    meta: dict[str, Any] = dict(device="meta", dtype=dtype)
    side = resolution // 8
    latents = torch.empty(1, c.in_channels, side, side, **meta)
    states = torch.empty(1, CLIP_POSITIONS, c.cross_attention_dim, **meta)
    added = None
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        added = {"text_embeds": torch.empty(1, pooled, **meta), "time_ids": torch.empty(1, 6, **meta)}
    return latents, torch.empty(1, dtype=torch.long, device="meta"), states, added
