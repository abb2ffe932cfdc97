"""The Stable Diffusion families sdlora knows, in one place: their ids, what messages call them, their text encoders,
where their real-size configs ship, and the architecture name files record for them (Stability's ModelSpec).

No torch here: `sdlora inspect` and `sdlora doctor` read it and start in a second.
"""

from __future__ import annotations

ARCHS = ("sd1", "sd2", "sdxl")
ARCH_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# The folder of sdlora/model_configs/ with each family's real-size diffusers configs; also the names under which
# `sdlora plan` and `sdlora bench` take the real architectures before any weights are downloaded.
SHIPPED_CONFIGS = {"sd1": "sd15", "sd2": "sd2", "sdxl": "sdxl"}


def component_names(arch: str) -> list[str]:
    """Text-encoder component names in pipeline order."""
    return ["text_encoder", "text_encoder_2"] if arch == "sdxl" else ["text_encoder"]


def modelspec_architecture(arch: str, v_prediction: bool = False) -> str:
    """`modelspec.architecture` (https://github.com/Stability-AI/ModelSpec) of a base model of `arch`, as kohya's
    sai_model_spec.py writes it and A1111/ComfyUI model browsers read it; a LoRA's adds "/lora"."""
    if arch == "sdxl":
        return "stable-diffusion-xl-v1-base"
    if arch == "sd2":
        return "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"
    return "stable-diffusion-v1"
