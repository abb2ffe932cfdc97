"""Validation loss: the denoising loss on held-out images at fixed timesteps and fixed noise.

Training loss jumps with every random timestep, so it cannot say which saved epoch is best. Here every
evaluation uses the same images, captions, timesteps and noise, so two evaluations of the same weights give the
same number and evaluations at different steps (or of different runs) are comparable.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlora.atomic import write_text
from sdlora.config import Config, TrainConfig
from sdlora.data.cache import encode_latents
from sdlora.data.dataset import ImageRecord, load_image, record_caption, scan_dataset
from sdlora.errors import DatasetError
from sdlora.models.loading import BaseModel, encode_prompt, sdxl_time_ids, tokenize

logger = logging.getLogger(__name__)

# Spread over the schedule: low timesteps judge detail, high ones composition. Fixed, so runs compare.
TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
CSV_NAME = "validation.csv"


@dataclass
class ValidationItem:
    """One held-out image, encoded once: latents, token ids, SDXL size conditioning, optional mask."""

    latents: torch.Tensor  # [C, h, w], fp32, CPU
    input_ids: list[torch.Tensor]  # one [1, 77 * chunks] tensor per tokenizer (data.max_token_length)
    time_ids: torch.Tensor | None  # [1, 6] for SDXL
    mask: torch.Tensor | None  # [1, H, W]


def split_records(records: list[ImageRecord], cfg: Config) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(training, validation) records: `data.validation_dirs` when given, else a seeded `validation_split` share.

    Raises:
        DatasetError: from scanning `validation_dirs`.
        DatasetError: also when the split would leave no training image.
    """
    d = cfg.data
    if d.validation_dirs:
        return records, scan_dataset(dataclasses.replace(d, dirs=d.validation_dirs, subsets=[], repeats=1))
    if not d.validation_split:
        return records, []
    images = list(dict.fromkeys(r.path for r in records))  # an image at two resolutions is held out at both
    n_val = max(1, round(len(images) * d.validation_split))
    if n_val >= len(images):
        raise DatasetError(f"data.validation_split = {d.validation_split} leaves no training image "
                         f"({len(images)} images); lower it or add images")
    held_out = {images[i] for i in random.Random(cfg.train.seed).sample(range(len(images)), n_val)}
    return [r for r in records if r.path not in held_out], [r for r in records if r.path in held_out]


@torch.no_grad()
def prepare_validation(records: list[ImageRecord], base: BaseModel, cfg: Config) -> list[ValidationItem]:
    """Encode the held-out images once (VAE mean, centre crop, no flip) and tokenize their captions as written
    (with the caption prefix, never shuffled or dropped)."""
    items = []
    for record in records:
        image = load_image(record, flip=False, rng=random.Random(0), random_crop=False)
        caption = record_caption(record, random.Random(0), as_written=True)
        time_ids = None
        if base.arch == "sdxl":
            time_ids = sdxl_time_ids([image["original_size"]], [image["crop_top_left"]], [image["target_size"]])
        mask = image["mask"] if cfg.train.masked_loss else None
        if cfg.train.masked_loss and mask is None:
            mask = torch.ones_like(image["pixels"][:1])
        items.append(ValidationItem(
            latents=encode_latents(base.vae, image["pixels"][None])[0].cpu(),
            input_ids=tokenize(base.tokenizers, [caption], cfg.data.max_token_length),
            time_ids=time_ids,
            mask=mask,
        ))
    return items


@torch.no_grad()
def validation_loss(items: list[ValidationItem], unet, encoders, arch: str, noise_scheduler, t: TrainConfig,
                    weight_dtype, compute_loss) -> float:
    """Mean plain MSE over every item at TIMESTEP_FRACTIONS: the default objective, whatever train's loss options
    (loss type, weightings, extra noise) say, so values compare between runs trained with different ones.

    The noise for item i comes from a generator seeded with (train.seed, i), so it never changes between
    evaluations. Modules are switched to eval mode (LoRA dropout off) and back.
    """
    plain = TrainConfig()
    n_train = noise_scheduler.config.num_train_timesteps
    device = next(unet.parameters()).device
    timesteps = torch.tensor([int(f * n_train) for f in TIMESTEP_FRACTIONS], device=device)
    k = len(timesteps)
    modules = [unet, *encoders]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        total = 0.0
        for i, item in enumerate(items):
            states, pooled = encode_prompt(arch, encoders, [ids.to(device) for ids in item.input_ids])
            latents = item.latents.to(device)[None].expand(k, -1, -1, -1)
            loss = compute_loss(
                unet, noise_scheduler, latents, states.expand(k, -1, -1),
                None if pooled is None else pooled.expand(k, -1),
                None if item.time_ids is None else item.time_ids.expand(k, -1),
                None if item.mask is None else item.mask[None].expand(k, -1, -1, -1),
                torch.Generator().manual_seed(t.seed * 1_000_003 + i), plain, weight_dtype, timesteps=timesteps,
            )
            total += float(loss)
    finally:
        for m, was in zip(modules, was_training):
            m.train(was)
    return total / len(items)


def read_history(folder: Path, up_to_step: int) -> list[dict]:
    """Rows of an earlier run's validation.csv up to `up_to_step` (a resumed run continues its history)."""
    path = folder / CSV_NAME
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = [{"step": int(r["step"]), "epoch": int(r["epoch"]), "val_loss": float(r["val_loss"])}
                for r in csv.DictReader(f)]
    return [r for r in rows if r["step"] <= up_to_step]


def write_history(folder: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["step", "epoch", "val_loss"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(folder / CSV_NAME, buffer.getvalue())


def best(rows: list[dict]) -> dict | None:
    """The row with the lowest validation loss (the earliest on ties), ignoring the untrained step 0."""
    trained = [r for r in rows if r["step"] > 0]
    return min(trained, key=lambda r: (r["val_loss"], r["step"])) if trained else None


def stalled(rows: list[dict], patience: int, min_delta: float = 0.0) -> bool:
    """Early stopping's test: none of the last `patience` validations (after the untrained step 0) is lower than the
    best before them by more than `min_delta`. False while there are too few, or with patience 0 (off)."""
    trained = [r for r in rows if r["step"] > 0]
    if not patience or len(trained) <= patience:
        return False
    before = min(r["val_loss"] for r in trained[:-patience])
    return all(r["val_loss"] >= before - min_delta for r in trained[-patience:])
