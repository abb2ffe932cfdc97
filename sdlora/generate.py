"""Image generation with diffusers pipelines: samplers, LoRA files with weights, A1111-compatible PNG metadata."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from .atomic import atomic_path

# Our sampler names -> (diffusers scheduler class, extra config, the name A1111 writes in PNG metadata).
SAMPLERS = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}, "DPM++ 2M Karras"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = 1
    sampler: str = "euler"


def make_scheduler(sampler: str, scheduler_config: dict):
    """A diffusers scheduler for `sampler`, built from the base model's scheduler config (betas, prediction type)."""
    import diffusers

    class_name, extra, _ = SAMPLERS[sampler]
    return getattr(diffusers, class_name).from_config({**scheduler_config, **extra})


def build_pipeline(arch: str, unet, vae, text_encoders: list, tokenizers: list, scheduler_config: dict, sampler="euler"):
    """A StableDiffusion(XL)Pipeline around already-loaded modules (no copies), e.g. the ones being trained."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = make_scheduler(sampler, scheduler_config)
    if arch == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1], tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0], unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def load_pipeline(base_model: str, device: str = "cpu", dtype: torch.dtype = torch.float32, vae: str = ""):
    """Load a base model (folder or tiny model name) as a pipeline on `device`."""
    from .models import load_base_model

    base = load_base_model(base_model, vae=vae)
    pipe = build_pipeline(base.arch, base.unet, base.vae, base.text_encoders, base.tokenizers, base.scheduler_config)
    pipe.sdlora_arch = base.arch
    pipe.sdlora_scheduler_config = base.scheduler_config
    return pipe.to(device, dtype)


def apply_loras(pipe, loras: list[tuple[str | Path, float]]) -> list[str]:
    """Load LoRA files as named peft adapters and activate them with their weights (diffusers blending).

    Returns the adapter names. A weight of 0 leaves the base model's output unchanged.
    """
    names = []
    for i, (path, _) in enumerate(loras):
        name = f"lora{i}_{Path(path).stem}".replace(".", "_")
        pipe.load_lora_weights(str(path), adapter_name=name)
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[float(w) for _, w in loras])
    return names


def generate(pipe, params: GenerationParams, sampler_config: dict | None = None) -> Image.Image:
    """Render one image; the same params and seed give the same image."""
    config = sampler_config if sampler_config is not None else getattr(pipe, "sdlora_scheduler_config", pipe.scheduler.config)
    pipe.scheduler = make_scheduler(params.sampler, dict(config))
    generator = torch.Generator("cpu").manual_seed(params.seed)
    return pipe(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt or None,
        num_inference_steps=params.steps,
        guidance_scale=params.cfg,
        width=params.width,
        height=params.height,
        generator=generator,
    ).images[0]


def parse_sample_prompt(line: str, defaults: GenerationParams) -> GenerationParams:
    """A kohya sample-prompt line: `prompt --n negative --w 512 --h 768 --d seed --l cfg --s steps`."""
    parts = line.split(" --")
    params = replace(defaults, prompt=parts[0].strip())
    fields = {"n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
              "l": ("cfg", float), "s": ("steps", int)}
    for part in parts[1:]:
        flag, _, value = part.partition(" ")
        if flag in fields:
            name, kind = fields[flag]
            params = replace(params, **{name: kind(value.strip())})
    return params


def a1111_parameters(params: GenerationParams, model_name: str = "", model_hash: str = "",
                     lora_hashes: dict[str, str] | None = None) -> str:
    """The PNG `parameters` text A1111 writes, which model sites parse to credit models and LoRAs."""
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    fields = [
        f"Steps: {params.steps}", f"Sampler: {SAMPLERS[params.sampler][2]}", f"CFG scale: {params.cfg:g}",
        f"Seed: {params.seed}", f"Size: {params.width}x{params.height}",
    ]
    if model_hash:
        fields.append(f"Model hash: {model_hash[:10]}")
    if model_name:
        fields.append(f"Model: {model_name}")
    if lora_hashes:
        fields.append('Lora hashes: "' + ", ".join(f"{n}: {h[:12]}" for n, h in lora_hashes.items()) + '"')
    lines.append(", ".join(fields))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    """Save atomically with the A1111 `parameters` text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)

