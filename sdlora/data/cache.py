"""Latent and text-encoder-output caches: encode every image / caption once instead of every step.

Latents use the VAE posterior's mean, not a sample, so cached and uncached training see identical latents
(the posterior's std is tiny for SD VAEs, so nothing is lost). Disk caches sit beside the images in
`.sdlora_cache/`, keyed by the image bytes, bucket, flip and VAE weights: a changed image gets a new entry, and an
image trained at two resolutions (two records, two buckets) has one for each.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from sdlora.atomic import save_safetensors
from sdlora.config import DataConfig
from sdlora.data.dataset import ImageRecord, load_image, record_caption, sample_rng
from sdlora.models.loading import BaseModel, encode_prompt, tokenize

logger = logging.getLogger(__name__)

CacheKey = tuple[int, bool]  # (record index, flipped)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] pixels in [-1,1] -> [B,C,H/8,W/8] scaled latents (fp32 VAE: fp16 SD VAEs overflow to NaN)."""
    pixels = pixels.to(vae.device, vae.dtype)
    latents = vae.encode(pixels).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()


def vae_fingerprint(vae) -> str:
    """Identifies the VAE weights, so a cache made with another VAE is never reused."""
    digest = hashlib.sha256(repr(sorted(vae.config.items())).encode())
    with torch.no_grad():
        for p in list(vae.parameters())[:4]:
            digest.update(f"{p.double().sum().item():.10e}".encode())
    return digest.hexdigest()[:16]


def build_latent_cache(records: list[ImageRecord], vae, mode: str,
                       desc: str = "caching latents") -> dict[CacheKey, dict]:
    """Encode every record (and its mirror image when its flip_aug is on) once.

    Returns {(index, flipped): {"latents": [C,h,w], "mask": [1,H,W] or None, "original_size", "crop_top_left",
    "target_size"}} with tensors on the CPU.
    """
    fingerprint = vae_fingerprint(vae) if mode == "disk" else ""
    cache: dict[CacheKey, dict] = {}
    for index, record in enumerate(tqdm(records, desc=desc, unit="img")):
        for flip in (False, True) if record.options.flip_aug else (False,):
            file = _disk_path(record, flip, fingerprint) if mode == "disk" else None
            entry = _read_entry(file) if file is not None and file.is_file() else None
            if entry is None:
                # random_crop is refused with caching, so the crop does not depend on the rng.
                item = load_image(record, flip=flip, rng=random.Random(0), random_crop=False)
                entry = {**item, "latents": encode_latents(vae, item.pop("pixels")[None])[0].cpu()}
                if file is not None:
                    _write_entry(file, entry)
            cache[(index, flip)] = entry
    return cache


def _disk_path(record: ImageRecord, flip: bool, fingerprint: str) -> Path:
    digest = hashlib.sha256(record.path.read_bytes())
    mask_bytes = record.mask_path.read_bytes() if record.mask_path else b""
    digest.update(f"{record.bucket}-{flip}-{fingerprint}".encode() + hashlib.sha256(mask_bytes).digest())
    return record.path.parent / ".sdlora_cache" / f"{record.path.stem}-{digest.hexdigest()[:20]}.safetensors"


def _write_entry(file: Path, entry: dict) -> None:
    tensors = {"latents": entry["latents"].contiguous()}
    for key in ("original_size", "crop_top_left", "target_size"):
        tensors[key] = torch.tensor(entry[key])
    if entry["mask"] is not None:
        tensors["mask"] = entry["mask"].contiguous()
    save_safetensors(tensors, file)


def _read_entry(file: Path) -> dict | None:
    try:
        tensors = load_file(str(file))
    except Exception as e:  # a damaged cache file is re-encoded, never trusted
        logger.warning("%s: unreadable cache entry (%s); re-encoding", file, e)
        return None
    return {
        "latents": tensors["latents"],
        "mask": tensors.get("mask"),
        **{key: tuple(tensors[key].tolist()) for key in ("original_size", "crop_top_left", "target_size")},
    }


@torch.no_grad()
def build_text_cache(base: BaseModel, records: list[ImageRecord], cfg: DataConfig,
                     extra: Iterable[str] = ()) -> dict[str, tuple]:
    """{caption: (states, pooled)} for every distinct caption, and the `extra` prompts; only valid when captions never
    change."""
    cache = {}
    for caption in sorted({record_caption(r, sample_rng(0, 0, 0)) for r in records}.union(extra)):
        ids = tokenize(base.tokenizers, [caption], cfg.max_token_length)
        states, pooled = encode_prompt(base.arch, base.text_encoders, ids)
        cache[caption] = (states[0], None if pooled is None else pooled[0])
    return cache


def from_text_cache(cache: dict, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(states, pooled) of a batch's captions from `build_text_cache`'s cache, on `device`."""
    states = torch.stack([cache[c][0] for c in captions]).to(device)
    pooled = None if cache[captions[0]][1] is None else torch.stack([cache[c][1] for c in captions]).to(device)
    return states, pooled
