"""Batches for the training loop: collated from cached latents or decoded images, in worker processes when
images are decoded, and copied to the device without stalling it.

A plain `.to("cuda")` of a pageable CPU tensor waits until the GPU has finished everything queued before it, so a
few small copies per step (token ids, SDXL size conditioning, latents) would stop the host from running ahead of
the GPU. Batches are therefore pinned and copied with `non_blocking=True`, which queues the copy behind the
running step instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from sdlora.config import Config
from sdlora.data.dataset import ImageRecord, load_image, record_caption, sample_rng
from sdlora.models.loading import sdxl_time_ids, tokenize


def load_batch(records: list[ImageRecord], indices: list[int], cfg: Config, epoch: int, position: int,
               latent_cache, tokenizers) -> dict:
    """Collate one batch: latents (cached) or pixels, token ids, SDXL size conditioning, optional masks, and the loss
    weights of regularization images when the batch has any.

    Every random choice (flip, caption shuffle/dropout) comes from (seed, epoch, position), so a batch is the
    same whichever process loads it and whenever.
    """
    items, captions = [], []
    for i, index in enumerate(indices):
        rng = sample_rng(cfg.train.seed, epoch, position * 1024 + i)
        options = records[index].options  # its subset's flip, crop and caption options
        flip = options.flip_aug and rng.random() < 0.5
        if latent_cache is not None:
            items.append(latent_cache[(index, flip)])
        else:
            items.append(load_image(records[index], flip=flip, rng=rng, random_crop=options.random_crop))
        captions.append(record_caption(records[index], rng))
    key = "latents" if latent_cache is not None else "pixels"
    batch = {
        key: torch.stack([item[key] for item in items]),
        "captions": captions,
        "input_ids": tokenize(tokenizers, captions, cfg.data.max_token_length),
        "time_ids": sdxl_time_ids([item["original_size"] for item in items],
                                  [item["crop_top_left"] for item in items],
                                  [item["target_size"] for item in items]),
    }
    if any(records[index].is_reg for index in indices):  # kohya's loss_weights: prior_loss_weight on reg images
        batch["loss_weights"] = torch.tensor([cfg.train.prior_loss_weight if records[index].is_reg else 1.0
                                              for index in indices])
    if cfg.train.masked_loss:
        batch["mask"] = torch.stack([item["mask"] if item["mask"] is not None else torch.ones_like(item[key][:1])
                                     for item in items])
    return batch


class _Batches(torch.utils.data.Dataset):
    """One epoch's batches by position, for DataLoader workers (each worker decodes whole batches)."""

    def __init__(self, records, batches, cfg, epoch, tokenizers):
        self.records, self.batches, self.cfg, self.epoch, self.tokenizers = records, batches, cfg, epoch, tokenizers

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, position: int) -> dict:
        return load_batch(self.records, self.batches[position], self.cfg, self.epoch, position, None, self.tokenizers)


def epoch_loader(records: list[ImageRecord], batches: list[list[int]], first: int, cfg: Config, epoch: int,
                 latent_cache, tokenizers, device: torch.device) -> Iterator[dict]:
    """The epoch's batches from position `first` on, in order, on `device`.

    Cached latents are collated in this process (indexing a dict); decoding images uses `data.num_workers`
    processes, which prepare the next batches while the device trains on this one.
    """
    pin = device.type == "cuda"
    source: Iterable[dict]
    if latent_cache is not None or cfg.data.num_workers == 0:
        source = (load_batch(records, batches[p], cfg, epoch, p, latent_cache, tokenizers)
                  for p in range(first, len(batches)))
    else:
        source = torch.utils.data.DataLoader(
            _Batches(records, batches, cfg, epoch, tokenizers),
            batch_size=None,  # items are whole batches already
            sampler=range(first, len(batches)),
            num_workers=cfg.data.num_workers,
            pin_memory=pin,
            prefetch_factor=2,
        )
    for batch in source:
        yield to_device(batch, device, pin)


def to_device(value, device: torch.device, pin: bool):
    """`value` (tensors in dicts/lists) on `device`; with `pin`, through pinned memory without a host sync."""
    if isinstance(value, torch.Tensor):
        if pin and value.device.type == "cpu" and not value.is_pinned():
            value = value.pin_memory()
        return value.to(device, non_blocking=pin)
    if isinstance(value, dict):
        return {k: to_device(v, device, pin) for k, v in value.items()}
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [to_device(v, device, pin) for v in value]
    return value
