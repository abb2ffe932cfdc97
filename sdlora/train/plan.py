"""Memory planner (`sdlora plan CONFIG --vram 8GB`, and a check before training on a GPU).

Peak training memory is estimated without loading any weights: the base model's components are built on the meta
device from their configs, LoRA is attached as training attaches it, and one forward pass is traced. Every tensor
autograd saves for the backward pass is counted (parameters excluded), which is what activation memory is; the
shapes are exact for the real architecture at the configured resolution. Attention is counted as the flash /
memory-efficient SDPA kernels store it (q, k, v, output and the log-sum-exp), not as the attention matrix.

What the trace cannot see (allocator rounding, cuBLAS/cuDNN workspaces, temporaries of the backward pass) is a
fixed share, OVERHEAD; calibrate it against benchmarks/RESULTS.md when GPU figures are in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, cast

import torch
import torch.nn.functional as F

from sdlora.config import Config, config_to_dict, derive, torch_dtype
from sdlora.errors import PlanError
from sdlora.models.clip_tokenizer import CLIP_POSITIONS
from sdlora.models.loading import model_configs
from sdlora.models.meta import meta_models, meta_unet_inputs

if TYPE_CHECKING:  # diffusers takes seconds to import: `sdlora plan` imports it only when it traces
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

GB = 1e9
OVERHEAD = 0.15  # share added for what the trace cannot see (see the module docstring)
CUDA_CONTEXT_GB = 0.5  # the CUDA context and kernels live outside PyTorch's allocator
# Bytes per trainable parameter: fp32 weight + fp32 grad + optimizer state.
OPTIMIZER_BYTES = {"adamw": 4 + 4 + 8, "adamw8bit": 4 + 4 + 2, "adafactor": 4 + 4 + 4, "prodigy": 4 + 4 + 16,
                   "adamw_schedulefree": 4 + 4 + 8}  # its z sequence and second moment
# bitsandbytes keeps 32-bit state for tensors smaller than this (its optimizers' min_8bit_size): a rank-4 LoRA
# factor of a 320- or 768-wide layer is one of them.
BNB_MIN_8BIT_SIZE = 4096
# Share of the card left free when the plan turns a memory saving off for speed (the estimate is uncalibrated).
RELAX_HEADROOM = 0.10
# A plan is for a GPU, where "auto" precision is bf16 or fp16: two bytes a weight either way.
GPU_AUTO_PRECISION = "bf16"
# Bytes per UNet Linear weight with model.quantize_base (sdlora/models/quantize.py); NF4: two a byte, a 1-byte
# scale per 64.
QUANTIZED_BYTES = {"fp8": 1.0, "nf4": 0.5 + 1 / 64}
# AdaLoRA's rank allocator keeps three fp32 averages per adapter parameter (importance, its EMA, its uncertainty).
ADALORA_STATE_BYTES = 3 * 4
# train.ema_decay keeps an fp32 average of every adapter parameter beside it (sdlora/train/ema.py).
EMA_BYTES = 4



@dataclass
class Estimate:
    """Peak device memory in bytes, by what holds it."""

    unet: float  # frozen UNet weights
    encoders: float  # VAE and text encoders that stay on the device while training
    offloaded: float  # VAE / text encoders that leave the device once their outputs are cached
    adapter: float  # LoRA weights, gradients, optimizer state (and AdaLoRA's allocator, the EMA)
    activations: float  # tensors saved for backward (UNet, and text encoders when trained)
    vae_encode: float  # VAE encoder temporaries: while caching (one image), or every step without a cache
    cached: bool  # latents are cached before training

    @property
    def total(self) -> float:
        # Training moves the UNet to the device after the caches are built, and encoding (no_grad) ends before
        # the UNet's forward pass: encoder temporaries and UNet activations are never alive together.
        caching = self.encoders + self.offloaded + (self.vae_encode if self.cached else 0)
        training = self.unet + self.encoders + self.adapter + max(
            self.activations, 0 if self.cached else self.vae_encode)
        return max(caching, training) * (1 + OVERHEAD) + CUDA_CONTEXT_GB * GB

    def lines(self) -> list[str]:
        parts = {k: v for k, v in dataclasses.asdict(self).items() if k != "cached"}
        return [f"  {name:<12} {value / GB:6.2f} GB" for name, value in parts.items()] + [
            f"  {'+ overhead':<12} {OVERHEAD:.0%} and {CUDA_CONTEXT_GB} GB CUDA context",
            f"  {'total':<12} {self.total / GB:6.2f} GB",
        ]


class _FlashLikeAttention(torch.autograd.Function):
    """Stands in for SDPA while tracing: saves what the flash / memory-efficient kernels save."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _flash_like_attention() -> Iterator[None]:
    """SDPA counted as the flash / memory-efficient kernels store it, for the length of a trace. diffusers' attention
    processors and transformers' CLIP call `F.scaled_dot_product_attention` through the module, so swapping that
    one attribute reaches every attention layer of the meta models."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: _FlashLikeAttention.apply(q, k, v)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _trace(model: torch.nn.Module, run, units: tuple[type, ...] = ()) -> tuple[int, int]:
    """(bytes autograd saves during `run()`, the most saved inside any one module of a `units` type).

    Tensors are counted once per storage (views share their base) and parameters not at all.
    """
    params = {id(p) for p in model.parameters()}
    counted: dict[int, int] = {}
    unit_max, stack = 0, []

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params:
            counted.setdefault(id(base), base.numel() * base.element_size())
        return t

    def enter(module, args):
        stack.append(sum(counted.values()))

    def leave(module, args, output):
        nonlocal unit_max
        unit_max = max(unit_max, sum(counted.values()) - stack.pop())

    handles = [m.register_forward_pre_hook(enter) for m in model.modules() if isinstance(m, units)]
    handles += [m.register_forward_hook(leave) for m in model.modules() if isinstance(m, units)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _flash_like_attention():
            run()
    finally:
        for h in handles:
            h.remove()
    return sum(counted.values()), unit_max


@dataclass
class _Traced:
    """What one meta trace of the config's models gives, per image."""

    params: dict[str, int]  # parameter counts per component
    lora_params: int
    unet_saved: int  # per image, no gradient checkpointing
    unet_saved_checkpointed: int  # per image, with it
    unet_unit: int  # the largest block recomputed at once under checkpointing, per image
    te_saved: int  # per caption, when text encoders are trained
    vae_peak_output: int  # largest single activation of the VAE encoder, per image
    unet_linear: int  # parameters of the UNet's Linear layers: what model.quantize_base stores smaller
    lora_params_8bit: int  # trainable parameters in tensors large enough for bitsandbytes' 8-bit state


def trace(cfg: Config) -> _Traced:
    """Build the config's models on the meta device, attach LoRA, trace one image at the training resolution."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    from sdlora.adapters.methods import adapters_for
    from sdlora.models.arch import component_names

    arch, configs = model_configs(cfg.model.base_model, cfg.model.allow_unsafe_pickle)
    dtype = torch_dtype(_precision(cfg))
    models = meta_models(arch, configs, dtype)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    unet = cast("UNet2DConditionModel", models["unet"])
    encoders = [models[n] for n in ("te1", "te2") if n in models]
    unet_linear = sum(p.numel() for m in unet.modules() if type(m) is torch.nn.Linear for p in m.parameters())
    adapters = adapters_for(cfg.lora, total_steps=1)  # the layers only: no steps are taken
    if cfg.lora.train_unet:
        adapters.inject(unet, "unet")
    if cfg.lora.train_text_encoder:
        for name, encoder in zip(component_names(arch), encoders):
            adapters.inject(encoder, name)
    trainable = [p.numel() for m in [unet, *encoders] for p in m.parameters() if p.requires_grad]
    lora_params, lora_params_8bit = sum(trainable), sum(n for n in trainable if n >= BNB_MIN_8BIT_SIZE)

    # The largest resolution trained is the one that must fit.
    latents, step, states, added = meta_unet_inputs(unet, cfg.data.largest_resolution(), dtype)

    def forward():
        states.requires_grad_(not cfg.lora.train_unet)  # a frozen UNet still back-propagates to a trained TE
        unet(latents, step, states, added_cond_kwargs=added)

    unet.train()
    # diffusers checkpoints each ResNet block and each transformer block: the units recomputed one at a time.
    saved, unit = _trace(unet, forward, (ResnetBlock2D, BasicTransformerBlock))
    unet.enable_gradient_checkpointing()
    saved_checkpointed, _ = _trace(unet, forward)
    te_saved = 0
    if cfg.lora.train_text_encoder:
        ids = torch.zeros(1, CLIP_POSITIONS, dtype=torch.long, device="meta")
        te_saved = sum(_trace(e, lambda e=e: e(ids, output_hidden_states=True))[0] for e in encoders)
    return _Traced(params, lora_params, saved, saved_checkpointed, unit, te_saved, _vae_peak(models["vae"], cfg),
                   unet_linear, lora_params_8bit)


def _vae_peak(vae, cfg: Config) -> int:
    """Largest output of any VAE-encoder module for one image (fp32), from forward hooks on the meta model."""
    biggest = 0

    def hook(module, args, output):
        nonlocal biggest
        if isinstance(output, torch.Tensor):
            biggest = max(biggest, output.numel() * output.element_size())

    handles = [m.register_forward_hook(hook) for m in vae.encoder.modules()]
    try:
        with torch.no_grad():
            side = cfg.data.largest_resolution()
            vae.encoder(torch.empty(1, 3, side, side, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return biggest


def estimate(cfg: Config, traced: _Traced | None = None) -> Estimate:
    """Peak memory of training with `cfg` (see the module docstring for what is counted)."""
    traced = traced or trace(cfg)
    t, d, lo = cfg.train, cfg.data, cfg.lora
    wb = torch_dtype(_precision(cfg)).itemsize
    p = traced.params
    te_weights = sum(n for name, n in p.items() if name.startswith("te")) * wb
    vae_weights = p["vae"] * 4
    offload_vae, offload_te = offloads(cfg)
    encoders = (0 if offload_vae else vae_weights) + (0 if offload_te else te_weights)
    offloaded = (vae_weights if offload_vae else 0) + (te_weights if offload_te else 0)
    b = t.batch_size
    if t.gradient_checkpointing:
        unet_act = b * traced.unet_saved_checkpointed + b * traced.unet_unit
    else:
        unet_act = b * traced.unet_saved
    activations = unet_act + (b * traced.te_saved if lo.train_text_encoder else 0)
    if t.preservation_weight:  # a second forward pass with gradients (the preservation prompts) until backward
        activations *= 2
    # The VAE encoder's live temporaries: about its largest activation three times over (input, output, norm).
    vae_encode = 3 * traced.vae_peak_output * (1 if d.cache_latents != "none" else b)
    allocator = ADALORA_STATE_BYTES if lo.method == "adalora" else 0
    ema = EMA_BYTES if t.ema_decay else 0
    adapter = traced.lora_params * (OPTIMIZER_BYTES[t.optimizer] + allocator + ema)
    if t.optimizer == "adamw8bit":  # the small tensors keep AdamW's 32-bit state
        small = traced.lora_params - traced.lora_params_8bit
        adapter += small * (OPTIMIZER_BYTES["adamw"] - OPTIMIZER_BYTES["adamw8bit"])
    linear_bytes = QUANTIZED_BYTES.get(cfg.model.quantize_base, wb)
    unet = (p["unet"] - traced.unet_linear) * wb + traced.unet_linear * linear_bytes
    return Estimate(unet, encoders, offloaded, adapter, activations, vae_encode, d.cache_latents != "none")


def _precision(cfg: Config) -> str:
    return GPU_AUTO_PRECISION if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision


def offloads(cfg: Config) -> tuple[bool, bool]:
    """(VAE, text encoders) leave the GPU after caching: their outputs are cached and nothing needs them later
    (samples need both; validation needs the text encoders). `train.train` follows the same rule."""
    d = cfg.data
    validation = bool(d.validation_split or d.validation_dirs)
    vae = d.cache_latents != "none" and not cfg.sample.prompts
    te = d.cache_text_encoder_outputs and not cfg.lora.train_text_encoder and not cfg.sample.prompts and not validation
    return vae, te


class _Change(NamedTuple):
    """One config change the planner may make, and why."""

    values: dict  # {"table.key": value}
    why: str
    slows: bool = False  # costs speed: dropped again when a later change makes it needless

    def apply(self, cfg: Config) -> Config:
        return derive(cfg, self.values)


def plan(cfg: Config, vram_gb: float, traced: _Traced | None = None) -> tuple[Config, Estimate, list[str]]:
    """The fastest variant of `cfg` that fits `vram_gb`, its estimate, and why each change was made.

    Changes are tried cheapest-in-speed first: cache latents, cache text-encoder outputs, gradient checkpointing,
    8-bit optimizer state, an NF4 base, then smaller batches with gradient accumulation (the same effective batch).
    A slowing change that the later ones make needless is dropped again. A config that fits as it is gets the
    opposite: the memory savings it turns on that slow training (checkpointing, a quantized base, 8-bit AdamW) are
    turned off while it still fits.

    Raises:
        PlanError: nothing fits; the message gives the smallest estimate.
    """
    traced = traced or trace(cfg)
    budget = vram_gb * GB
    current = cfg

    def fits(c: Config, share: float = 1.0) -> bool:
        return estimate(c, traced).total <= share * budget

    steps = []
    if cfg.data.cache_latents == "none" and not cfg.data.random_crop:
        steps.append(_Change({"data.cache_latents": "memory"}, "cache latents: no VAE encoding during training"))
    if not cfg.lora.train_text_encoder and not cfg.data.cache_text_encoder_outputs and not (
        cfg.data.shuffle_caption or cfg.data.caption_dropout or cfg.data.tag_dropout
    ):
        steps.append(_Change({"data.cache_text_encoder_outputs": True},
                             "cache text-encoder outputs (frozen encoders can then leave the GPU)"))
    if not cfg.train.gradient_checkpointing:
        steps.append(_Change({"train.gradient_checkpointing": True},
                             "gradient checkpointing: recompute activations in backward (~20-30% slower)", slows=True))
    if cfg.train.optimizer == "adamw":
        steps.append(_Change({"train.optimizer": "adamw8bit"}, "8-bit AdamW state (needs bitsandbytes)", slows=True))
    if cfg.model.quantize_base == "none" and cfg.lora.init != "pissa":
        steps.append(_Change({"model.quantize_base": "nf4"},
                             "NF4 base: the UNet's Linear weights in 4 bits (QLoRA-style, needs bitsandbytes; slower "
                             "steps)", slows=True))

    def changed(applied: list[_Change]) -> Config:
        out = cfg
        for change in applied:
            out = change.apply(out)
        return out

    applied: list[_Change] = []
    for step in steps:
        if fits(current):
            break
        applied.append(step)
        current = step.apply(current)
    if fits(current):
        # The change that made it fit may make an earlier one needless (8-bit AdamW saves megabytes on LoRA's
        # small tensors where an NF4 base saves a gigabyte): drop every change that slows training and that the
        # config fits without. Caches stay: they make steps faster.
        for step in applied[:-1]:
            if step.slows and fits(changed([s for s in applied if s is not step])):
                applied.remove(step)
        current = changed(applied)
    if not applied and fits(cfg):
        # It fits as configured: undo configured memory savings that slow training, biggest speed-up first, while
        # it still fits with RELAX_HEADROOM to spare: a config that ran must not run out of memory for speed
        # (fp8 storage needs checkpointing, hence a second round once the base is no longer fp8).
        relax = [
            (_Change({"train.gradient_checkpointing": False},
                     "gradient checkpointing off: there is room for the activations (~20-30% faster)"),
             lambda c: c.train.gradient_checkpointing and c.model.quantize_base != "fp8"),
            (_Change({"model.quantize_base": "none"},
                     "no quantized base: there is room for the UNet's own weights (faster steps)"),
             lambda c: c.model.quantize_base != "none"),
            (_Change({"train.optimizer": "adamw"},
                     "AdamW instead of 8-bit AdamW: there is room for its state (fused, no host sync per step)"),
             lambda c: c.train.optimizer == "adamw8bit"),
        ]
        for _ in range(2):
            for change, applies in relax:
                if applies(current) and fits(change.apply(current), 1 - RELAX_HEADROOM):
                    applied.append(change)
                    current = change.apply(current)
    reasons = [change.why for change in applied]
    while not fits(current) and current.train.batch_size > 1:
        b = current.train.batch_size
        smaller = max(1, b // 2)
        accumulation = current.train.gradient_accumulation_steps * math.ceil(b / smaller)
        current = derive(current, {"train.batch_size": smaller, "train.gradient_accumulation_steps": accumulation})
        reasons.append(f"batch {b} -> {smaller} with gradient accumulation {accumulation} (same effective batch)")
    result = estimate(current, traced)
    if result.total > budget:
        raise PlanError(f"needs about {result.total / GB:.1f} GB even with every memory saving; {vram_gb:g} GB is "
                        "not enough at this resolution (lower data.resolution or lora.rank)")
    return current, result, reasons


def gpu_memory_gb() -> float | None:
    """The memory of the GPU training would use (CUDA device 0), None without one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GB


def fit(cfg: Config, vram: float | Literal["auto"]) -> tuple[Config, list[str], str]:
    """`cfg` with `plan`'s changes for `vram` GB ("auto": this GPU's memory), the changes, and a summary line.

    Raises:
        PlanError: "auto" without a GPU, or nothing fits.
    """
    gb = gpu_memory_gb() if vram == "auto" else vram
    if gb is None:
        raise PlanError("--vram auto needs a CUDA GPU to measure; give the card's memory instead, e.g. --vram 8GB")
    chosen, result, reasons = plan(cfg, gb)
    how = "with these changes" if reasons else "as configured"
    return chosen, reasons, f"planned for {gb:.1f} GB {how} (estimated peak {result.total / GB:.2f} GB)"


def parse_vram(text: str) -> float:
    """'8GB', '8 GiB', '8' -> gigabytes (GiB are converted)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(gib|gi|gb|g)?\s*", text.lower())
    if not m or not float(m.group(1)) > 0:
        raise PlanError(f"--vram {text!r}: give the GPU's memory in GB, e.g. 8GB")
    return float(m.group(1)) * (1.073741824 if m.group(2) in ("gib", "gi") else 1.0)


def report(cfg: Config, vram_gb: float) -> str:
    """The text `sdlora plan` prints: the estimate as configured, then the changes that make it fit."""
    traced = trace(cfg)
    as_is = estimate(cfg, traced)
    lines = [f"estimated peak memory as configured: {as_is.total / GB:.2f} GB", *as_is.lines()]
    chosen, result, reasons = plan(cfg, vram_gb, traced)
    if not reasons:
        lines.append(f"fits in {vram_gb:g} GB as configured")
        return "\n".join(lines)
    lines.append(f"for {vram_gb:g} GB (then {result.total / GB:.2f} GB):")
    lines += [f"  - {r}" for r in reasons]
    before, after = config_to_dict(cfg), config_to_dict(chosen)
    changed = [f"{table}.{key}={json.dumps(value)}" for table, values in after.items()
               for key, value in values.items() if before[table].get(key) != value]
    lines.append("overrides: " + " ".join(changed))
    return "\n".join(lines)


def check_fits(cfg: Config, capacity_bytes: float) -> str | None:
    """Before training on a GPU: None if the estimate fits `capacity_bytes`, else the warning to show.

    Raises:
        PlanError: the estimate exceeds the card by more than the estimate's own uncertainty (OVERHEAD), so the
            run would run out of memory; the message says which settings would fit.
    """
    need = estimate(cfg).total
    if need <= capacity_bytes:
        return None
    vram = capacity_bytes / GB
    advice = (f"`sdlora plan CONFIG --vram {vram:.0f}GB` lists the settings that fit, "
              "`sdlora train CONFIG --vram auto` applies them")
    if need > capacity_bytes * (1 + OVERHEAD):
        raise PlanError(f"this config needs about {need / GB:.1f} GB and the GPU has {vram:.1f} GB; {advice}")
    return f"this config needs about {need / GB:.1f} GB of the GPU's {vram:.1f} GB and may run out of memory; {advice}"
