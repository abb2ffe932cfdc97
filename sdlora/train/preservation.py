"""Base-prediction preservation (train.preservation_weight): keep what the base model does on prompts without the
trigger word, with no image set, by pulling the adapted model's prediction toward the base model's own on the same
noisy latents (kohya's diff output preservation, OneTrainer's prior prediction).

The base prediction comes from the very modules being trained with their adapters switched off, so no second model
sits in memory; the cost is one more text encoding and two more UNet passes (one without gradients) per micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from sdlora.config import Config, TrainConfig
from sdlora.data.dataset import trigger_of, without_trigger
from sdlora.train.loss import sample_timesteps


@contextlib.contextmanager
def adapters_off(modules: list[torch.nn.Module]) -> Iterator[None]:
    """The peft adapter layers in `modules` switched off, as `PeftModel.disable_adapter` does for a wrapped model
    (sdlora injects adapters without that wrapper); they are switched back on, trainable, afterwards."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def preservation_prompts(captions: list[str], step: int, cfg: Config) -> list[str]:
    """One preservation prompt per image of the batch: train.preservation_prompts in turn, else each caption
    without the trigger word (data.class_word in its place)."""
    prompts = cfg.train.preservation_prompts
    if prompts:
        return [prompts[(step * len(captions) + i) % len(prompts)] for i in range(len(captions))]
    return [without_trigger(c, trigger_of(cfg.data), cfg.data.class_word) for c in captions]


def preservation_loss(unet: torch.nn.Module, noise_scheduler, latents: torch.Tensor,
                      adapted: tuple[torch.Tensor, torch.Tensor | None], base: tuple[torch.Tensor, torch.Tensor | None],
                      time_ids: torch.Tensor | None, generator: torch.Generator, weight_dtype: torch.dtype,
                      trained: list[torch.nn.Module], t: TrainConfig) -> torch.Tensor:
    """The mean squared distance between the adapted UNet's prediction and the base's (the adapters of `trained`
    off) on `latents` noised at fresh timesteps, drawn as training draws them (train.timestep_sampling and range).

    Args:
        adapted, base: (cross-attention states, SDXL pooled embeds) of the preservation prompts as the adapted and
            the base text encoders give them (the same when the encoders are not trained).
    """
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
    timesteps = sample_timesteps(t, noise_scheduler.config.num_train_timesteps, latents.shape[0],
                                 generator).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps).to(weight_dtype)

    def predict(states: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        added = None
        if time_ids is not None and pooled is not None:  # SDXL
            added = {"text_embeds": pooled.to(weight_dtype), "time_ids": time_ids.to(latents.device, weight_dtype)}
        return unet(noisy, timesteps, states.to(weight_dtype), added_cond_kwargs=added).sample.float()

    with torch.no_grad(), adapters_off(trained):
        target = predict(*base)
    return F.mse_loss(predict(*adapted), target)
