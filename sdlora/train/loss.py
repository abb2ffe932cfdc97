"""The training objective: the denoising loss of a batch (epsilon or v-prediction, Min-SNR, offset noise, masks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdlora.config import TrainConfig


def compute_loss(unet, noise_scheduler, latents, states, pooled, time_ids, mask, generator, t: TrainConfig,
                 weight_dtype, timesteps: torch.Tensor | None = None,
                 loss_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The denoising loss of one batch: noise the latents at random timesteps (or the given ones, for validation)
    and regress the target; `loss_weights` [B] weigh each image's loss.

    The random draws happen where `generator` lives: training passes one on the training device, so no CPU tensor
    has to be copied over (a copy of pageable memory would make the host wait for the GPU every step).
    """
    b, rng = latents.shape[0], {"generator": generator, "device": generator.device}
    noise = torch.randn(latents.shape, **rng).to(latents.device)
    if t.noise_offset:
        # Offset noise: a per-channel constant lets the model shift overall brightness (crosslabs.org, 2023).
        noise = noise + t.noise_offset * torch.randn((b, latents.shape[1], 1, 1), **rng).to(latents.device)
    if timesteps is None:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), **rng)
    timesteps = timesteps.to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    added = None
    if time_ids is not None:
        added = {"text_embeds": pooled.to(weight_dtype), "time_ids": time_ids.to(latents.device, weight_dtype)}
    pred = unet(noisy.to(weight_dtype), timesteps, states.to(weight_dtype), added_cond_kwargs=added).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")  # [B, C, h, w]
    if mask is not None:
        # Mask images are at pixel resolution; the loss lives on the latent grid.
        mask = F.interpolate(mask.to(loss.device, loss.dtype), size=loss.shape[-2:], mode="area")
        loss = loss * mask
    loss = loss.mean(dim=(1, 2, 3))  # [B]
    if loss_weights is not None:  # per image: train.prior_loss_weight on regularization images
        loss = loss * loss_weights.to(loss.device)
    if t.min_snr_gamma:
        # Min-SNR weighting (arXiv 2303.09556): cap the weight of low-noise timesteps at gamma.
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=t.min_snr_gamma)
        weight = weight / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weight / snr
        loss = loss * weight
    return loss.mean()
