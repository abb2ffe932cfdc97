"""`sdlora merge-into-base`: LoRA files fused into a base model's weights, written as a model.

The LoRAs are loaded into a diffusers pipeline exactly as `sdlora generate` loads them (`LoraCache`), then diffusers'
own `fuse_lora` merges them (peft's merge), so the merged model renders what the pipeline renders with the LoRAs
switched on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import diffusers
import torch
from tqdm.auto import tqdm

from sdlora.adapters.files import detect_arch, read_lora_file
from sdlora.adapters.tools import require_arch
from sdlora.atomic import atomic_dir
from sdlora.errors import LoraFileError, ModelError
from sdlora.generate.pipeline import LoraCache, LoraSpec, load_pipeline
from sdlora.models.arch import component_names
from sdlora.models.loading import detect_model
from sdlora.models.single_file import PICKLE_SUFFIXES, save_single_file

logger = logging.getLogger(__name__)


def merge_into_base(base_model: str, loras: Sequence[tuple[str | Path, float]], out: str | Path,
                    dtype: torch.dtype = torch.float16, strict: bool = False) -> Path:
    """Write the base model with LoRAs fused into its weights: W + sum_i weight_i * (alpha_i / r_i) * up_i @ down_i
    (a LoHa / LoKr file: weight_i times its delta).

    The LoRAs are loaded into a diffusers pipeline exactly as `sdlora generate` loads them (`LoraCache`), then
    diffusers' `fuse_lora` merges them (peft's merge) and `unload_lora_weights` drops the adapter layers.

    Args:
        base_model: tiny model name, diffusers folder or single-file checkpoint.
        loras: (LoRA file, weight) pairs; weight 0 leaves a file out.
        out: a folder (diffusers layout) or a `.safetensors` file (single-file A1111/ComfyUI layout).
        dtype: dtype of the written weights (the merge itself runs in fp32).
        strict: refuse a LoRA with modules that match nothing in the base model; otherwise they are left out and
            a warning is logged.

    Returns:
        The path written (atomically: a crash leaves no half-written model).

    Raises:
        LoraFileError: an unreadable LoRA, or one for another architecture (one line naming both), or with
            `strict` one that would load only in part.
        ModelError: bad base model or output name.
    """
    out = Path(out)
    if out.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(f"{out}: pickle files are not written; give a folder or a .safetensors file")
    arch = detect_model(base_model)
    for path, _ in loras:  # before loading the model: a wrong file should fail in a second, not after the load
        tensors, metadata = read_lora_file(path)
        try:
            lora_arch = detect_arch(tensors, metadata)
        except LoraFileError:  # nothing tells the architecture: LoraCache lets diffusers match the keys
            continue
        require_arch(path, lora_arch, arch, f"the base model {base_model}")
    totals: dict[Path, float] = {}
    for path, weight in loras:  # a file listed twice counts once, with its weights added (as LoraCache does)
        totals[Path(path).resolve()] = totals.get(Path(path).resolve(), 0.0) + float(weight)
    # Weight 0 must not reach LoraCache: it would disable the adapters, and fuse_lora merges disabled ones too.
    specs = [LoraSpec(path, weight) for path, weight in totals.items() if weight != 0]
    pipe = load_pipeline(base_model)  # CPU, fp32
    cache = LoraCache(pipe, strict, embeddings=False)  # a checkpoint holds no new words: see the note
    for spec in tqdm(specs, desc="loading LoRAs", unit="file"):
        cache.load(spec.path)
    for note in cache.notes.values():
        logger.warning(note)
    if specs:
        cache.activate(specs)
        pipe.fuse_lora(components=list(pipe.get_list_adapters()), lora_scale=1.0)
        pipe.unload_lora_weights()
    record = json.dumps([{"file": spec.path.name, "weight": spec.unet_weight,
                          "sshs_model_hash": cache.model_hash(spec.path)} for spec in specs])
    if out.suffix.lower() == ".safetensors":
        model = {"unet": pipe.unet, "vae": pipe.vae, "scheduler_config": pipe.sdlora_scheduler_config, "arch": arch,
                 "text_encoders": [getattr(pipe, c) for c in component_names(arch)]}
        return save_single_file(model, out, metadata={"sdlora_merged_loras": record}, dtype=dtype)
    pipe.scheduler = _base_scheduler(pipe)
    pipe.to(dtype=dtype)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "sdlora_merged_loras.json").write_text(record + "\n")
    return out


def _base_scheduler(pipe):
    """The base model's own scheduler (load_pipeline swaps in the sampler's), so the folder keeps its config."""

    config = dict(pipe.sdlora_scheduler_config)
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    return cls.from_config(config) if isinstance(cls, type) else pipe.scheduler
