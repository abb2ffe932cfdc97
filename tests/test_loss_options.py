"""The training objective's options (timestep range and sampling, loss types, Huber schedules, debiased estimation,
input perturbation, multi-resolution noise) against their formulas, and validation staying plain MSE."""

import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from sdlora.config import TrainConfig, load_config
from sdlora.train.loss import (
    compute_loss,
    debiased_weight,
    elementwise_loss,
    huber_threshold,
    pyramid_noise,
    sample_timesteps,
)

N_DRAWS = 200_000
# Kolmogorov-Smirnov: the largest CDF gap of N_DRAWS samples exceeds 1.95 / sqrt(N) with probability 0.1 %.
KS_LIMIT = 1.95 / math.sqrt(N_DRAWS)


def train_cfg(*overrides) -> TrainConfig:
    return load_config(None, list(overrides)).train


def scheduler(prediction_type="epsilon"):
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type=prediction_type)


def ks_gap(draws: torch.Tensor, cdf) -> float:
    """The largest gap between the empirical CDF of integer timesteps and `cdf(k)` = P(T <= k), over every k."""
    counts = torch.bincount(draws, minlength=1000).double()
    empirical = counts.cumsum(0) / counts.sum()
    return max(abs(float(empirical[k]) - cdf(k)) for k in range(1000))


def draws(t: TrainConfig) -> torch.Tensor:
    return sample_timesteps(t, 1000, N_DRAWS, torch.Generator().manual_seed(0))


def test_uniform_default_is_randint_over_the_schedule_and_range_is_kept():
    t = TrainConfig()
    assert torch.equal(draws(t), torch.randint(0, 1000, (N_DRAWS,), generator=torch.Generator().manual_seed(0)))
    ranged = draws(train_cfg("train.min_timestep=200", "train.max_timestep=700"))
    assert int(ranged.min()) == 200 and int(ranged.max()) == 699
    assert ks_gap(ranged, lambda k: min(max(k - 199, 0), 500) / 500) < KS_LIMIT


def test_logit_normal_matches_its_distribution():
    t = train_cfg("train.timestep_sampling=logit_normal", "train.logit_mean=0.5", "train.logit_std=0.8")

    def cdf(k):  # T <= k  <=>  u < (k + 1) / 1000  <=>  N(0.5, 0.8) < logit((k + 1) / 1000)
        x = (k + 1) / 1000
        if x >= 1:
            return 1.0
        return 0.5 * (1 + math.erf((math.log(x / (1 - x)) - 0.5) / (0.8 * math.sqrt(2))))

    assert ks_gap(draws(t), cdf) < KS_LIMIT


def test_logit_normal_within_a_range():
    t = train_cfg("train.timestep_sampling=logit_normal", "train.min_timestep=100", "train.max_timestep=500")
    ranged = draws(t)
    assert 100 <= int(ranged.min()) and int(ranged.max()) <= 499
    assert abs(float(ranged.float().median()) - 300) < 2  # the logit-normal's median sits mid-range


@pytest.mark.parametrize("scale", [1.29, -0.5])
def test_mode_matches_its_distribution(scale):
    t = train_cfg("train.timestep_sampling=mode", f"train.mode_scale={scale}")

    def f(u):  # SD3's mode transform of a uniform u; decreasing on [0, 1] for these scales
        return 1 - u - scale * (math.cos(math.pi * u / 2) ** 2 - 1 + u)

    def cdf(k):  # P(f(U) < x) = P(U > f^-1(x)) = 1 - f^-1(x)
        x, lo, hi = (k + 1) / 1000, 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) > x else (lo, mid)
        return 1 - lo

    assert ks_gap(draws(t), cdf) < KS_LIMIT


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_threshold_schedules(schedule):
    sched = scheduler()
    t = train_cfg(f"train.huber_schedule={schedule}", "train.huber_c=0.2")
    steps = torch.tensor([0, 100, 500, 999])
    got = huber_threshold(t, steps, sched)
    alpha_bar = sched.alphas_cumprod[steps]
    expected = {
        "constant": torch.full((4,), 0.2),
        "exponential": torch.tensor([0.2 ** (s / 1000) for s in steps.tolist()]),
        "snr": 0.8 / (1 + torch.sqrt((1 - alpha_bar) / alpha_bar)) ** 2 + 0.2,
    }[schedule]
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
def test_elementwise_losses(loss_type):
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    t = train_cfg(f"train.loss_type={loss_type}", "train.huber_schedule=constant", "train.huber_c=0.3")
    got = elementwise_loss(pred, target, t, torch.tensor([10, 900]), scheduler())
    d, c = pred - target, 0.3
    expected = {"l2": d**2, "l1": d.abs(), "huber": 2 * c * (torch.sqrt(d**2 + c * c) - c),
                "smooth_l1": 2 * (torch.sqrt(d**2 + c * c) - c)}[loss_type]
    torch.testing.assert_close(got, expected)


def test_pseudo_huber_is_quadratic_for_small_errors_and_linear_for_large():
    t = train_cfg("train.loss_type=huber", "train.huber_schedule=constant", "train.huber_c=0.5")
    d = torch.tensor([1e-2, 100.0]).view(2, 1, 1, 1)
    got = elementwise_loss(d, torch.zeros_like(d), t, torch.tensor([0, 0]), scheduler()).flatten()
    assert got[0] == pytest.approx(1e-4, rel=1e-2)  # 2c (sqrt(d^2 + c^2) - c) ~ d^2 for |d| << c
    assert got[1] == pytest.approx(2 * 0.5 * (100 - 0.5), rel=1e-3)  # ~ 2c (|d| - c) for |d| >> c


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_debiased_weight(prediction):
    sched = scheduler(prediction)
    steps = torch.tensor([0, 250, 999])
    alpha_bar = sched.alphas_cumprod[steps].double()
    snr = torch.clamp(alpha_bar / (1 - alpha_bar), max=1000)
    expected = 1 / (snr + 1) if prediction == "v_prediction" else 1 / snr.sqrt()
    torch.testing.assert_close(debiased_weight(sched, steps).double(), expected, rtol=1e-4, atol=0)


class RecordingUNet(torch.nn.Module):
    """Predicts zeros, so the loss is the target's mean square; keeps the noisy input it was given."""

    def forward(self, sample, timesteps, states, added_cond_kwargs=None):
        self.sample, self.timesteps = sample, timesteps
        return SimpleNamespace(sample=torch.zeros_like(sample))


def test_input_perturbation_noises_the_input_not_the_target():
    sched, unet = scheduler(), RecordingUNet()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = train_cfg("train.ip_noise_gamma=0.1")
    loss = compute_loss(unet, sched, latents, torch.zeros(2, 77, 8), None, None, None,
                        torch.Generator().manual_seed(5), t, torch.float32)
    gen = torch.Generator().manual_seed(5)  # the draws in compute_loss's order: noise, timesteps, perturbation
    noise = torch.randn(latents.shape, generator=gen)
    steps = torch.randint(0, 1000, (2,), generator=gen)
    extra = torch.randn(latents.shape, generator=gen)
    assert torch.equal(unet.timesteps, steps)
    torch.testing.assert_close(unet.sample, sched.add_noise(latents, noise + 0.1 * extra, steps))
    torch.testing.assert_close(loss, (noise**2).mean())  # the target is the noise without the perturbation


def test_pyramid_noise_is_kohyas():
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 4, 32, 32, generator=gen)
    got = pyramid_noise(noise.clone(), 6, 0.3, gen)

    ref_gen, ratios = torch.Generator().manual_seed(3), random.Random(3)
    ref = torch.randn(2, 4, 32, 32, generator=ref_gen)
    for i in range(6):  # kohya's pyramid_noise_like, its random.random() and torch.randn from seeded generators
        r = ratios.random() * 2 + 2
        wn, hn = max(1, int(32 / (r**i))), max(1, int(32 / (r**i)))
        ref += F.interpolate(torch.randn(2, 4, wn, hn, generator=ref_gen), size=(32, 32), mode="bilinear") * 0.3**i
        if wn == 1 or hn == 1:
            break
    torch.testing.assert_close(got, ref / ref.std())
    assert float(got.std()) == pytest.approx(1.0)


def test_options_train_and_are_recorded_in_the_file(dataset, tmp_path):
    from safetensors import safe_open

    from sdlora.train.recipe import train
    from tests.test_train import make_cfg

    path = train(make_cfg(dataset, tmp_path, "train.max_train_steps=2", "train.loss_type=huber",
                          "train.timestep_sampling=logit_normal", "train.min_timestep=100", "train.max_timestep=900",
                          "train.debiased_estimation=true", "train.ip_noise_gamma=0.1",
                          "train.multires_noise_iterations=4"))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in ("ss_loss_type", "ss_huber_schedule", "ss_huber_c", "ss_timestep_sampling",
                                 "ss_min_timestep", "ss_max_timestep", "ss_debiased_estimation", "ss_ip_noise_gamma",
                                 "ss_multires_noise_iterations", "ss_multires_noise_discount")} == {
        "ss_loss_type": "huber", "ss_huber_schedule": "snr", "ss_huber_c": "0.1",
        "ss_timestep_sampling": "logit_normal", "ss_min_timestep": "100", "ss_max_timestep": "900",
        "ss_debiased_estimation": "True", "ss_ip_noise_gamma": "0.1", "ss_multires_noise_iterations": "4",
        "ss_multires_noise_discount": "0.3"}


def test_validation_loss_is_plain_mse_whatever_the_options(sd15_path):
    from sdlora.models.loading import load_base_model, tokenize
    from sdlora.train.validation import ValidationItem, validation_loss

    base = load_base_model(str(sd15_path))
    item = ValidationItem(torch.zeros(4, 8, 8), tokenize(base.tokenizers, ["a cat"]), None, None)
    seen = []

    def fake_loss(*args, **kwargs):
        seen.append(args[8])
        return torch.tensor(0.0)

    t = train_cfg("train.loss_type=huber", "train.debiased_estimation=true", "train.ip_noise_gamma=0.1",
                  "train.multires_noise_iterations=4", "train.noise_offset=0.1", "train.min_snr_gamma=5")
    validation_loss([item], base.unet, base.text_encoders, "sd1", scheduler(), t, torch.float32, fake_loss)
    assert seen == [TrainConfig()]
