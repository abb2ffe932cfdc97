"""The training objective: the denoising loss of a batch (epsilon or v-prediction, Min-SNR, offset noise, masks),
and its options from kohya's sd-scripts: the timestep range and sampling, multi-resolution noise, input perturbation,
L1 / pseudo-Huber losses, debiased estimation.
"""

from __future__ import annotations

import math
import random

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
    if t.multires_noise_iterations:
        noise = pyramid_noise(noise, t.multires_noise_iterations, t.multires_noise_discount, generator)
    if timesteps is None:
        timesteps = sample_timesteps(t, noise_scheduler.config.num_train_timesteps, b, generator)
    timesteps = timesteps.to(latents.device)
    model_noise = noise
    if t.ip_noise_gamma:
        # Input perturbation (arXiv 2301.11706): the input is noised a little more than the target says, which
        # counters the gap between training on true images and sampling from the model's own predictions.
        model_noise = noise + t.ip_noise_gamma * torch.randn(latents.shape, **rng).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, model_noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    added = None
    if time_ids is not None:
        added = {"text_embeds": pooled.to(weight_dtype), "time_ids": time_ids.to(latents.device, weight_dtype)}
    pred = unet(noisy.to(weight_dtype), timesteps, states.to(weight_dtype), added_cond_kwargs=added).sample
    loss = elementwise_loss(pred.float(), target.float(), t, timesteps, noise_scheduler)  # [B, C, h, w]
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
    if t.debiased_estimation:
        loss = loss * debiased_weight(noise_scheduler, timesteps)
    return loss.mean()


def sample_timesteps(t: TrainConfig, num_train_timesteps: int, b: int, generator: torch.Generator) -> torch.Tensor:
    """`b` training timesteps in [train.min_timestep, train.max_timestep), drawn as train.timestep_sampling says.

    "uniform" draws integers uniformly (kohya's get_timesteps); the other schemes draw u in [0, 1] with diffusers'
    `compute_density_for_timestep_sampling` (SD3's logit-normal and mode densities) and take the timestep at that
    fraction of the range.
    """
    low, high = t.min_timestep, num_train_timesteps if t.max_timestep is None else t.max_timestep
    if t.timestep_sampling == "uniform":
        return torch.randint(low, high, (b,), generator=generator, device=generator.device)
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(t.timestep_sampling, b, t.logit_mean, t.logit_std, t.mode_scale,
                                              device=generator.device, generator=generator)
    # A mode_scale far from 0 bends u slightly outside [0, 1]; such draws land on the range's ends.
    return (low + u * (high - low)).long().clamp(low, high - 1)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """Multi-resolution noise as kohya's `pyramid_noise_like` makes it: `noise` plus `iterations` layers of noise
    drawn at 1 / r**i of the size (r random in [2, 4) per layer, stopping at 1 pixel), upsampled bilinearly and
    scaled by discount**i, then rescaled to unit standard deviation. Low frequencies get noise the plain Gaussian
    hardly has, so the model learns overall brightness and composition (wandb.ai/johnowhitaker/multires_noise).
    """
    # The layer sizes are needed on the host: drawing the ratios on a GPU generator would make the host wait for
    # the device every step, so they come from Python's generator seeded by the step's (as kohya draws them).
    ratios = random.Random(generator.initial_seed())
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = ratios.random() * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        layer = torch.randn((b, c, hn, wn), generator=generator, device=generator.device).to(noise.device)
        noise = noise + F.interpolate(layer, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def huber_threshold(t: TrainConfig, timesteps: torch.Tensor, noise_scheduler) -> torch.Tensor:
    """The pseudo-Huber threshold per sample, [B], as kohya's `get_huber_threshold_if_needed` (huber_scale 1):
    "constant" huber_c; "exponential" huber_c ** (timestep / num_train_timesteps), from 1 at timestep 0 down to
    huber_c; "snr" (1 - huber_c) / (1 + sigma)**2 + huber_c with sigma = sqrt((1 - alpha_bar) / alpha_bar), near 1
    where there is little noise (L2-like on details) and near huber_c where there is much."""
    c = t.huber_c
    if t.huber_schedule == "constant":
        return torch.full(timesteps.shape, c, device=timesteps.device)
    if t.huber_schedule == "exponential":
        alpha = -math.log(c) / noise_scheduler.config.num_train_timesteps
        return torch.exp(-alpha * timesteps.float())
    from diffusers.training_utils import compute_snr

    sigmas = compute_snr(noise_scheduler, timesteps) ** -0.5
    return (1 - c) / (1 + sigmas) ** 2 + c


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, t: TrainConfig, timesteps: torch.Tensor,
                     noise_scheduler) -> torch.Tensor:
    """The loss of every element, [B, C, h, w], as train.loss_type says (kohya's `conditional_loss`): squared or
    absolute error, or the pseudo-Huber 2c (sqrt(d**2 + c**2) - c) ("huber") and 2 (sqrt(d**2 + c**2) - c)
    ("smooth_l1") with c from `huber_threshold`. torch's huber_loss is the piecewise Huber, not this smooth one."""
    if t.loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if t.loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = huber_threshold(t, timesteps, noise_scheduler).to(pred.device).view(-1, 1, 1, 1)
    pseudo = torch.sqrt((pred - target) ** 2 + c**2) - c
    return 2 * c * pseudo if t.loss_type == "huber" else 2 * pseudo


def debiased_weight(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """kohya's `apply_debiased_estimation` weight per sample (arXiv 2310.08442): 1 / sqrt(SNR), or 1 / (SNR + 1)
    for v-prediction; the SNR capped at 1000, which it reaches at timestep 0."""
    from diffusers.training_utils import compute_snr

    snr = torch.clamp(compute_snr(noise_scheduler, timesteps), max=1000)
    return 1 / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else 1 / torch.sqrt(snr)
