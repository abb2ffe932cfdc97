"""Typed training configuration: dataclasses mirroring the TOML tables, loading, overrides, validation, and the
tables of allowed values that more than the config read (samplers, precisions).

Every problem is collected and raised as one `ConfigError` that names the full key (`train.learning_rate`)
and, for choices, the allowed values. Nothing is silently corrected. A config made from another (the app's fields,
the planner's changes) goes through `derive`, so it is validated as a loaded one is.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Union

from sdlora.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib



class Sampler(NamedTuple):
    """How one sampler name (sample.sampler, `sdlora generate --sampler`) renders and how A1111 writes it."""

    scheduler: str  # the diffusers scheduler class
    config: dict  # what it adds to the base model's scheduler config
    a1111: str  # A1111's name, as written in PNG parameters ("Sampler: DPM++ 2M")
    schedule: str = ""  # A1111's "Schedule type" (1.9+) when it is not the sampler's default


SAMPLERS = {
    "euler": Sampler("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": Sampler("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpmpp_2m_karras": Sampler("DPMSolverMultistepScheduler",
                               {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}, "DPM++ 2M", "Karras"),
    "ddim": Sampler("DDIMScheduler", {}, "DDIM"),
    "unipc": Sampler("UniPCMultistepScheduler", {}, "UniPC"),
    # Latent Consistency: 2-8 steps at CFG 1-2, for LCM-distilled models or with an LCM LoRA.
    "lcm": Sampler("LCMScheduler", {}, "LCM"),
}

# Precision names (train.mixed_precision, export.dtype, the LoRA tools' --dtype) -> torch dtype names; "no" is
# accelerate's name for full precision. torch itself is imported only by `torch_dtype`.
PRECISIONS = {"no": "float32", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FileDtype = Literal["fp16", "bf16", "fp32"]  # export.dtype and --dtype: what LoRA files are written in
# lora.targets and `sdlora extract --targets`: the module sets adapters.lora.TARGETS defines.
Targets = Literal["attn", "attn_mlp", "all"]


@dataclass(frozen=True)
class KohyaBlocks:
    """kohya's UNet blocks of one model family, in the order of lora.block_dims (sd-scripts networks/lora.py:
    LoRANetwork.NUM_OF_BLOCKS / SDXL_NUM_OF_BLOCKS, get_block_index). A block is named after its LDM block, which
    `models.ldm_names.kohya_block` finds for a module: INnn = input_blocks.nn, OUTnn = output_blocks.nn."""

    down: tuple[str, ...]  # lora.down_lr_weight's blocks, shallow -> deep
    mid: tuple[str, ...]  # lora.mid_lr_weight's
    up: tuple[str, ...]  # lora.up_lr_weight's, deep -> shallow
    ends: tuple[str, ...] = ()  # SDXL: BASE (time/label embedding) before, OUT (final conv) after; LR weight 1

    @property
    def names(self) -> tuple[str, ...]:
        return self.ends[:1] + self.down + self.mid + self.up + self.ends[1:]

    def count(self, key: str) -> int:
        """How many values the list lora.<key> takes: one per down / mid / up block for the *_lr_weight keys, one
        per block for the others."""
        part = {"down_lr_weight": self.down, "mid_lr_weight": self.mid, "up_lr_weight": self.up}.get(key, self.names)
        return len(part)


def _numbered(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i:02d}" for i in range(n))


# kohya treats SD 2.x as SD 1.x (its is_sdxl is False for both): 25 blocks; SDXL has 23.
KOHYA_BLOCKS = {"sd1": KohyaBlocks(_numbered("IN", 12), ("MID",), _numbered("OUT", 12)),
                "sdxl": KohyaBlocks(_numbered("IN", 9), _numbered("MID", 3), _numbered("OUT", 9), ("BASE", "OUT"))}


def kohya_blocks(arch: str) -> KohyaBlocks:
    """kohya's blocks of a model of `arch` ("sd1", "sd2" or "sdxl")."""
    return KOHYA_BLOCKS["sdxl" if arch == "sdxl" else "sd1"]


# kohya's presets for lora.down_lr_weight / up_lr_weight (get_block_lr_weight): the weight of the i-th of n blocks
# in the list's order; "name+x" adds x to each.
LR_WEIGHT_PRESETS: dict[str, Callable[[int, int], float]] = {
    "cosine": lambda i, n: math.sin(math.pi * (n - 1 - i) / (n - 1) / 2),
    "sine": lambda i, n: math.sin(math.pi * i / (n - 1) / 2),
    "linear": lambda i, n: i / (n - 1),
    "reverse_linear": lambda i, n: (n - 1 - i) / (n - 1),
    "zeros": lambda i, n: 0.0,
}


def lr_weight_values(value: list[float] | str, n: int) -> list[float]:
    """lora.down_lr_weight / up_lr_weight as the weights of n blocks: the list itself, or the preset's weights.

    Raises:
        ValueError: not a preset, or its "+x" is not a finite number.
    """
    if isinstance(value, list):
        return [float(w) for w in value]
    name, plus, offset = value.partition("+")
    base = float(offset) if plus else 0.0
    if name not in LR_WEIGHT_PRESETS or not math.isfinite(base):
        raise ValueError(value)
    return [LR_WEIGHT_PRESETS[name](i, n) + base for i in range(n)]


def torch_dtype(precision: str):
    """The torch dtype of a precision name in PRECISIONS."""
    import torch

    return getattr(torch, PRECISIONS[precision])


@dataclass
class ModelConfig:
    # A diffusers folder, a single-file .safetensors checkpoint, or an embedded tiny model:
    # "tiny-sd15" / "tiny-sdxl" (random weights, for tests and the demo).
    base_model: str = "tiny-sd15"
    # Optional separate VAE (diffusers folder or .safetensors); "" keeps the checkpoint's own.
    vae: str = ""
    # "" reads it from the scheduler config; set "v_prediction" for SD2.x 768-v checkpoints.
    prediction_type: Literal["", "epsilon", "v_prediction"] = ""
    # .ckpt/.pt/.bin files are pickles that can run code when loaded; refused unless this is true.
    allow_unsafe_pickle: bool = False
    # QLoRA-style storage of the frozen UNet's Linear layers: "fp8" (e4m3, upcast layer by layer; needs
    # train.gradient_checkpointing) or "nf4" (4-bit NormalFloat, needs bitsandbytes); the adapters stay fp32.
    quantize_base: Literal["none", "fp8", "nf4"] = "none"
    # Read prompts this many layers from the text encoder's end, through its final layer norm (kohya's clip_skip,
    # A1111's "Clip skip"): 2 = the penultimate layer, which many anime-style SD 1.x models were trained with.
    # Training, its samples and the file's ss_clip_skip follow it. SD 1.x/2.x only (SDXL always reads the
    # penultimate layer); unset = the last layer.
    clip_skip: int | None = None


@dataclass
class SubsetConfig:
    """One `[[data.subsets]]` table: an image folder with its own options (kohya's `[[datasets.subsets]]`); an unset
    option (None) is the data.* value."""

    dir: str = ""
    # true: a regularization folder, as data.reg_dirs (no data.caption_prefix unless the subset sets its own).
    is_reg: bool = False
    # One side length, or a list: each image trains at every listed resolution.
    resolution: int | list[int] | None = None
    repeats: int | None = None
    caption_extensions: list[str] | None = None
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    shuffle_caption: bool | None = None
    keep_tokens: int | None = None
    caption_dropout: float | None = None
    tag_dropout: float | None = None
    flip_aug: bool | None = None
    random_crop: bool | None = None


@dataclass
class DataConfig:
    # Image folders. A folder named "<N>_<name>" repeats its images N times per epoch (kohya convention). A [data]
    # table with subsets and no dirs reads only its subsets.
    dirs: list[str] = field(default_factory=lambda: ["sample_images"])
    # Folders with their own options ([[data.subsets]] tables), trained beside data.dirs.
    subsets: list[SubsetConfig] = field(default_factory=list)
    # Training side length in pixels; buckets keep about resolution**2 pixels. A list ([512, 768]) trains each image
    # at every listed resolution, in buckets of that resolution.
    resolution: int | list[int] = 512
    # Sidecar caption files tried in this order (img.png + img.txt); metadata.jsonl is read too.
    caption_extensions: list[str] = field(default_factory=lambda: [".txt", ".caption"])
    # Repeats for folders without an "<N>_" prefix.
    repeats: int = 1
    # Prepended to every caption, e.g. your trigger word "zkstyle"; caption_suffix is appended.
    caption_prefix: str = ""
    caption_suffix: str = ""
    # Shuffle comma-separated tags, keeping the first keep_tokens tags in place.
    shuffle_caption: bool = False
    keep_tokens: int = 0
    # Probability of training on an empty caption (teaches the unconditional case).
    caption_dropout: float = 0.0
    # Probability of dropping each (non-kept) tag.
    tag_dropout: float = 0.0
    # Random horizontal flips; avoid for subjects with asymmetric details (text, logos).
    flip_aug: bool = False
    # Random crop instead of center crop when an image does not match its bucket exactly.
    random_crop: bool = False
    # Aspect-ratio bucketing: sides between min and max, multiples of bucket_step.
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_step: int = 64
    # Images smaller than their bucket are upscaled at most this much; smaller ones get a smaller bucket.
    max_upscale: float = 2.0
    # Encode every image once with the VAE: "memory", "disk" (reused across runs), or "none".
    cache_latents: Literal["none", "memory", "disk"] = "memory"
    # Encode captions once; only possible when the text encoder is frozen and captions never change.
    cache_text_encoder_outputs: bool = False
    # Caption tokens the text encoder reads (kohya's max_token_length): 150 or 225 encode a caption in 2 or 3 chunks
    # of 75 and join them as kohya does; 75 cuts longer captions.
    max_token_length: Literal[75, 150, 225] = 75
    # Skip unreadable images with a warning instead of stopping before step 1.
    skip_bad_images: bool = False
    # Worker processes decoding images (only used when latents are not cached).
    num_workers: int = 0
    # Validation images: a share of the dataset held out (seeded by train.seed), or separate folders.
    validation_split: float = 0.0
    validation_dirs: list[str] = field(default_factory=list)
    # Regularization (class / prior-preservation) images, kohya's reg folders: "<N>_<class>" repeat folders or plain
    # ones. Each epoch pairs them with as many training images (with repeats) as kohya does; their loss counts
    # train.prior_loss_weight times.
    reg_dirs: list[str] = field(default_factory=list)
    # The word in the captions that names what is learnt ("" = caption_prefix), and what stands for it in the
    # captions of class images and preservation prompts ("" drops it): "sks dog" -> class_word "dog".
    trigger_word: str = ""
    class_word: str = ""
    # Auto class images: before training, the base model draws this many regularization images per training image
    # from its caption with the trigger replaced by class_word (seeded, in its bucket, sample.steps/cfg/sampler),
    # cached in class_images_dir ("" = <train.output_dir>/class_images) so that a rerun reuses them. 0 = off.
    class_images_per_image: int = 0
    class_images_dir: str = ""

    def resolutions(self) -> list[int]:
        """Every resolution trained: data.resolution's and the subsets' own."""
        found = as_resolutions(self.resolution)
        for subset in self.subsets:
            found += as_resolutions(subset.resolution) if subset.resolution is not None else []
        return sorted(set(found))

    def largest_resolution(self) -> int:
        """The resolution that stands for a run of several: the memory plan, the samples and ss_resolution use it."""
        return self.resolutions()[-1]


def as_resolutions(resolution: int | list[int]) -> list[int]:
    """A resolution setting (one side length or a list) as a list."""
    return list(resolution) if isinstance(resolution, list) else [resolution]


@dataclass
class LoraConfig:
    # "lora"; "dora" (weight-decomposed: a learned magnitude per output channel, arXiv 2402.09353); "adalora"
    # (adaptive ranks: starts at adalora_init_rank and prunes to an average of `rank`, arXiv 2303.10512); "loha"
    # (LyCORIS' Hadamard product of two rank-`rank` products, arXiv 2108.06098) or "lokr" (LyCORIS' Kronecker
    # product of a small full matrix and a rank-`rank` one, arXiv 2212.10650), exported in LyCORIS' layout.
    method: Literal["lora", "dora", "adalora", "loha", "lokr"] = "lora"
    # With method = "adalora": the target average rank.
    rank: int = 16
    # Scale = alpha / rank (alpha / sqrt(rank) with use_rslora). alpha = rank gives scale 1.
    alpha: float = 16.0
    dropout: float = 0.0
    # "attn": to_q/k/v/out; "attn_mlp": + proj_in/proj_out/ff (kohya's default set); "all": + resnet convs.
    targets: Targets = "attn"
    # Kaiming-uniform A / zero B ("default") or Gaussian A ("gaussian"): both start as a no-op. "pissa"
    # (arXiv 2404.02948) starts from the principal singular vectors of each weight (the base keeps the rest).
    init: Literal["default", "gaussian", "pissa"] = "default"
    use_rslora: bool = False
    # AdaLoRA's rank budget schedule: every module starts at adalora_init_rank; after adalora_warmup_steps the
    # budget falls (cubically) to `rank` on average until the last adalora_final_steps, which keep the final ranks.
    adalora_init_rank: int = 0  # 0 = 2 * rank
    adalora_warmup_steps: int = 0  # 0 = 10 % of train.max_train_steps
    adalora_final_steps: int = 0  # 0 = 20 % of train.max_train_steps
    adalora_update_every: int = 1  # reallocate ranks every N steps
    adalora_orth_reg: float = 0.5  # weight of the orthogonality penalty on the A/B factors
    # LoHa / LoKr (peft's LoHaConfig / LoKrConfig): while training, each step drops each output row of a module's
    # delta with probability rank_dropout and the whole module with probability module_dropout.
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    # LoKr: the small Kronecker factor's side is at most this (-1: the two factors as near square as possible).
    decompose_factor: int = -1
    # LoHa / LoKr on convolutions larger than 1x1 (lora.targets = "all"): a Tucker core per factor (peft's
    # use_effective_conv2d, LyCORIS' use_tucker) instead of flattening the kernel into the input side.
    effective_conv: bool = False
    train_unet: bool = True
    train_text_encoder: bool = True
    # kohya's per-block settings (sd-scripts' network_args of these names), UNet only; empty = the global value.
    # A rank and alpha per block (KOHYA_BLOCKS: 25 for SD 1.x/2.x, 23 for SDXL) for the Linear and 1x1 modules
    # (block_dims, block_alphas) and for the 3x3 convolutions of targets = "all" (conv_block_dims,
    # conv_block_alphas); a block of dim 0 gets no adapter.
    block_dims: list[int] = field(default_factory=list)
    block_alphas: list[float] = field(default_factory=list)
    conv_block_dims: list[int] = field(default_factory=list)
    conv_block_alphas: list[float] = field(default_factory=list)
    # The learning rate of each block's adapters is the UNet's times its weight: one per down / up block (SD 1.x/2.x
    # 12, SDXL 9) or a preset of LR_WEIGHT_PRESETS ("sine", "cosine+0.5"), and per middle block (1 / 3). A weight
    # not above block_lr_zero_threshold is 0, and a block at 0 gets no adapter.
    down_lr_weight: list[float] | str = field(default_factory=list)
    mid_lr_weight: list[float] = field(default_factory=list)
    up_lr_weight: list[float] | str = field(default_factory=list)
    block_lr_zero_threshold: float = 0.0

    def block_settings(self) -> dict[str, list[int] | list[float] | str | float]:
        """The per-block keys that are set, by name; {} = every module at the global rank, alpha and rate."""
        return {key: getattr(self, key) for key in _BLOCK_KEYS if getattr(self, key)}

    def adalora_schedule(self, max_train_steps: int) -> tuple[int, int, int]:
        """(initial rank, warm-up steps, final steps) of AdaLoRA with the 0 = default values resolved."""
        return (self.adalora_init_rank or 2 * self.rank, self.adalora_warmup_steps or max_train_steps // 10,
                self.adalora_final_steps or max_train_steps // 5)


_BLOCK_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight", "mid_lr_weight",
               "up_lr_weight", "block_lr_zero_threshold")


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    output_name: str = "lora"
    seed: int = 42
    max_train_steps: int = 1000
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    # UNet / text encoder learning rates; unset means learning_rate.
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    # "adamw_schedulefree": schedule-free AdamW (arXiv 2405.15682, `pip install 'sdlora[schedulefree]'`): no LR
    # schedule (lr_scheduler stays "constant"; lr_warmup_steps warms up inside the optimizer), and the files,
    # samples and validation use the average it keeps.
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor", "adamw_schedulefree"] = "adamw"
    weight_decay: float = 1e-2
    # diffusers scheduler names.
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = 0
    # cosine_with_restarts: the number of hard restarts (kohya's lr_scheduler_num_cycles); polynomial: its power.
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    # LoRA+ (arXiv 2402.12354): the up (B) matrices learn this many times faster; 0 disables.
    loraplus_lr_ratio: float = 0.0
    # "auto": bf16 on a GPU that has it (Ampere and newer), fp16 on an older GPU, fp32 ("no") on a CPU.
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    # torch.compile of the UNet: "regional" compiles the repeated transformer block once per shape (diffusers'
    # compile_repeated_blocks: a fraction of the full compile time), "full" the whole UNet. Pays on long GPU runs.
    compile: Literal["none", "regional", "full"] = "none"
    compile_backend: str = "inductor"
    # "reduce-overhead" adds CUDA graphs: small batches are bound by kernel launches.
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # Convolutions in NHWC memory layout, which tensor cores read without transposes.
    channels_last: bool = False
    max_grad_norm: float = 1.0
    # Steps with a NaN/Inf loss or gradient are skipped; this many in a row stop training with a diagnosis.
    max_nonfinite_steps: int = 20
    # Offset noise (https://www.crosslabs.org/blog/diffusion-with-offset-noise); ~0.05 helps dark/bright images.
    noise_offset: float = 0.0
    # Min-SNR loss weighting (arXiv 2303.09556); 5 is the paper's value, 0 disables.
    min_snr_gamma: float = 0.0
    # Rescale betas to zero terminal SNR (arXiv 2305.08891); use with v-prediction.
    zero_terminal_snr: bool = False
    # Timesteps are drawn from [min_timestep, max_timestep) (kohya's keys); None = the schedule's end (1000).
    min_timestep: int = 0
    max_timestep: int | None = None
    # How they are drawn over that range: "uniform", or SD3's "logit_normal" (sigmoid of N(logit_mean, logit_std):
    # the middle of the schedule more often) or "mode" (mode_scale > 0 favours the middle, < 0 the ends).
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    # The regression loss: "l2" (MSE), "l1", or kohya's pseudo-Huber "huber" / "smooth_l1" (arXiv 2403.16728),
    # L2 for errors below huber_c and L1-like above, less pulled by outliers. huber_schedule makes huber_c depend
    # on the timestep as kohya does: "snr" (large at low noise), "exponential" (decays to huber_c), "constant".
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = "l2"
    huber_c: float = 0.1
    huber_schedule: Literal["constant", "exponential", "snr"] = "snr"
    # Weight each sample's loss by 1/sqrt(SNR) (1/(SNR+1) for v-prediction): kohya's debiased estimation
    # (arXiv 2310.08442).
    debiased_estimation: bool = False
    # Input perturbation (arXiv 2301.11706): the noisy input gets this much extra noise the target does not; ~0.1.
    ip_noise_gamma: float = 0.0
    # Multi-resolution (pyramid) noise: this many coarser noise layers, each discounted by the discount's power
    # (kohya: 6-10 iterations, discount 0.3); 0 = off.
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    # Exponential moving average of the adapter weights (diffusers' EMAModel, its decay warming up as
    # (1 + n) / (10 + n)): exported files, samples and validation use the average; 0 = off, ~0.999 for long runs.
    ema_decay: float = 0.0
    # Update the average every N optimizer steps.
    ema_update_every: int = 1
    # Save a LoRA file every N steps / epochs (0 = never); the final one is always saved.
    save_every_n_steps: int = 0
    save_every_n_epochs: int = 1
    # Keep only the newest K intermediate LoRA files and checkpoints (0 = keep all).
    save_last_k: int = 3
    # Full training state (for --resume) is written every N steps (0 = only with the LoRA saves).
    checkpoint_every_n_steps: int = 0
    # Validation loss (with data.validation_split / validation_dirs) every N steps; 0 = at each epoch's end.
    validate_every_n_steps: int = 0
    # After training (`sdlora train`): write <output_dir>/report.md with loss curves, the grid and the best epoch.
    report: bool = True
    # Log the mean loss every N steps.
    log_every_n_steps: int = 10
    # Where the loss, learning rate, validation loss and samples go: "tensorboard" (<output_dir>/logs), "wandb"
    # (Weights & Biases, `pip install 'sdlora[wandb]'`) or "all" (both).
    log_with: Literal["tensorboard", "wandb", "all"] = "tensorboard"
    # The wandb project (kohya's log_tracker_name: with "all", TensorBoard's folder under logs/ too) and run name
    # ("" = wandb picks one).
    wandb_project: str = "sdlora"
    wandb_run_name: str = ""
    # Loss on these parts only: a mask image beside each image (img.png + img_mask.png), white = train.
    masked_loss: bool = False
    # The weight of regularization images' loss (data.reg_dirs, data.class_images_per_image), kohya's name.
    prior_loss_weight: float = 1.0
    # Base-prediction preservation, no images needed: each step adds this weight times the distance between the
    # adapted model's prediction and the base model's (adapters off) on preservation prompts. 0 = off.
    preservation_weight: float = 0.0
    # The preservation prompts; [] = each batch's captions without the trigger word (data.trigger_word).
    preservation_prompts: list[str] = field(default_factory=list)
    # Early stopping: stop when the validation loss has not improved by more than early_stopping_min_delta for this
    # many validations in a row; the final LoRA is then the best validated one. 0 = off; needs validation images.
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    # Pivotal tuning: new words (e.g. ["zkw"]) added to the tokenizers, their embeddings trained beside the LoRA
    # (the rest of the text encoders frozen) at embedding_lr (unset = learning_rate), each new_token_vectors
    # vectors long and starting from the embedding of new_token_init ("" = the vocabulary's mean). Put the words
    # in the captions (data.caption_prefix); the LoRA file bundles them as A1111 reads, and
    # <output_dir>/embeddings/ holds each as a standalone embedding for ComfyUI and diffusers.
    new_tokens: list[str] = field(default_factory=list)
    new_token_vectors: int = 1
    new_token_init: str = ""
    embedding_lr: float | None = None


@dataclass
class SampleConfig:
    # Prompts rendered during training; A1111/kohya flags allowed: "a cat --n blurry --w 512 --h 768 --d 7".
    prompts: list[str] = field(default_factory=list)
    every_n_steps: int = 0
    every_n_epochs: int = 0
    steps: int = 20
    cfg: float = 7.0
    seed: int = 1
    width: int = 0  # 0 = the training resolution
    height: int = 0
    sampler: str = "euler"  # one of SAMPLERS
    # After training: a grid of the saved LoRA files x these weights x the prompts ([] = no grid).
    grid_weights: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.75, 1.0])
    # A local CLIP model folder: score the grid's images (CLIP-T, CLIP-I) into similarity.csv; "" = off.
    clip_model: str = ""


@dataclass
class ExportConfig:
    # Dtype of the exported LoRA tensors.
    dtype: FileDtype = "fp16"
    # "kohya": one .safetensors that ComfyUI/A1111/Forge/diffusers load; "peft" also writes diffusers format.
    formats: list[Literal["kohya", "peft"]] = field(default_factory=lambda: ["kohya"])
    title: str = ""
    description: str = ""
    author: str = ""
    trigger_phrase: str = ""
    # With train.new_tokens: the embeddings inside the LoRA file too (A1111/Forge load them with it). ComfyUI logs
    # each such key as "not loaded" and diffusers' load_lora_weights does not read them; both load the standalone
    # files in <output_dir>/embeddings/ instead.
    bundle_embeddings: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML config (or the defaults when path is None), apply `table.key=value` overrides, validate.

    Raises:
        ConfigError: the file is missing or not TOML, or any key is unknown, mistyped or out of range.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        # ValueError covers TOMLDecodeError and UnicodeDecodeError; absurdly nested input recurses too deep.
        except (ValueError, RecursionError) as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    errors: list[str] = []
    for item in overrides:
        _apply_override(raw, item, errors)
    data = raw.get("data")
    if isinstance(data, dict) and "subsets" in data and "dirs" not in data:
        data["dirs"] = []  # the subsets name the folders; the default folder would join them unasked
    cfg = _build(Config, raw, "", errors)
    where = f"{path}: " if path is not None else ""
    if errors:
        raise ConfigError(where + "; ".join(errors))
    return validate(cfg, where)


def validate(cfg: Config, where: str = "") -> Config:
    """Check every value of `cfg`: types, allowed values, ranges and combinations; returns `cfg` unchanged.

    Args:
        cfg: a config, loaded or made from another.
        where: the start of the message, e.g. the config file's name and ": ".

    Raises:
        ConfigError: every problem, each with its full key.
    """
    errors = [problem for table in dataclasses.fields(Config)
              for problem in _field_problems(getattr(cfg, table.name), f"{table.name}.")]
    if not errors:
        errors = _check_ranges(cfg)
    if errors:
        raise ConfigError(where + "; ".join(errors))
    return cfg


def _field_problems(values: Any, prefix: str) -> list[str]:
    """The type problems of a table's fields, and of the tables in its lists ([[data.subsets]])."""
    problems = []
    hints = typing.get_type_hints(type(values))
    for f in dataclasses.fields(values):
        value = getattr(values, f.name)
        problem = _type_problem(value, hints[f.name])
        if problem:
            problems.append(f"{prefix}{f.name}: {problem}")
        elif isinstance(value, list):
            problems += [p for i, item in enumerate(value) if dataclasses.is_dataclass(item)
                         for p in _field_problems(item, f"{prefix}{f.name}[{i}].")]
    return problems


def derive(cfg: Config, changes: dict[str, Any]) -> Config:
    """`cfg` with `{"table.key": value}` changed, validated: how sdlora makes one config from another.

    Raises:
        ConfigError: an unknown key, or a value `validate` refuses.
    """
    tables: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        table, _, name = key.partition(".")
        tables_known = {f.name for f in dataclasses.fields(Config)}
        if table not in tables_known or name not in {f.name for f in dataclasses.fields(getattr(cfg, table))}:
            raise ConfigError(f"unknown key {key}")
        if typing.get_type_hints(type(getattr(cfg, table)))[name] is float and type(value) is int:
            value = float(value)  # as a TOML integer for a float key is read
        tables.setdefault(table, {})[name] = value
    return validate(dataclasses.replace(cfg, **{table: dataclasses.replace(getattr(cfg, table), **values)
                                                for table, values in tables.items()}))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain nested values (for TOML/JSON snapshots and metadata); None values are dropped."""
    return _drop_none(dataclasses.asdict(cfg))


def dump_toml(cfg: Config) -> str:
    """Serialise a config back to TOML that `load_config` reads to the same values."""
    lines = []
    for table, values in config_to_dict(cfg).items():
        lines.append(f"[{table}]")
        arrays = {key: value for key, value in values.items() if _is_table_list(value)}
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if key not in arrays]
        lines.append("")
        for key, items in arrays.items():  # [[data.subsets]]: after the table's own keys, as TOML requires
            for item in items:
                lines += [f"[[{table}.{key}]]"] + [f"{k} = {_toml_value(v)}" for k, v in item.items()] + [""]
    return "\n".join(lines)


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return [_drop_none(v) for v in value] if isinstance(value, list) else value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def _apply_override(raw: dict, item: str, errors: list[str]) -> None:
    key, sep, text = item.partition("=")
    parts = key.strip().lstrip("-").split(".")
    if not sep or len(parts) != 2:
        errors.append(f"override {item!r}: expected table.key=value, e.g. train.learning_rate=1e-4")
        return
    table, name = parts
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except (ValueError, RecursionError):
        value = text  # bare words are strings: train.optimizer=adamw
    raw.setdefault(table, {})
    if not isinstance(raw[table], dict):
        errors.append(f"{table}: must be a table")
        return
    raw[table][name] = value


def _build(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.')}: must be a table")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            errors.append(f"unknown key {prefix}{key} (allowed: {', '.join(fields)})")
    kwargs = {}
    for name in fields:
        if name not in raw:
            continue
        hint = hints[name]
        item_hint = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, raw[name], f"{prefix}{name}.", errors)
        elif isinstance(item_hint, type) and dataclasses.is_dataclass(item_hint):  # [[data.subsets]]
            if not isinstance(raw[name], list):
                errors.append(f"{prefix}{name}: expected [[{prefix}{name}]] tables, got {raw[name]!r}")
                continue
            kwargs[name] = [_build(item_hint, item, f"{prefix}{name}[{i}].", errors)
                            for i, item in enumerate(raw[name])]
        else:
            problem = _type_problem(raw[name], hint)
            if problem:
                errors.append(f"{prefix}{name}: {problem}")
            else:
                kwargs[name] = float(raw[name]) if hint is float and isinstance(raw[name], int) else raw[name]
    return cls(**kwargs)


def _type_problem(value: Any, hint: Any) -> str | None:
    """None if value fits the type hint, else why not (naming the allowed values for Literal)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        return None if value in args else f"{value!r} is not one of {', '.join(repr(a) for a in args)}"
    if origin in (Union, types.UnionType):
        if value is None:
            return None if type(None) in args else "a value is required"
        problems = [_type_problem(value, a) for a in args if a is not type(None)]
        return " or ".join(map(str, problems)) if all(problems) else None
    if origin is list:
        if not isinstance(value, list):
            return f"expected a list, got {type(value).__name__} {value!r}"
        for v in value:
            problem = _type_problem(v, args[0])
            if problem:
                return f"list item: {problem}"
        return None
    if hint is float:
        # An int too large for a float would overflow later instead of failing here.
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint)
    return None if ok else f"expected {hint.__name__}, got {type(value).__name__} {value!r}"


# Characters wandb refuses in a project name; with train.log_with = "all" the name is a folder too.
_NOT_IN_PROJECT = "/\\#?%:"


def _check_ranges(cfg: Config) -> list[str]:
    m, d, lo, t, s = cfg.model, cfg.data, cfg.lora, cfg.train, cfg.sample
    checks = [
        (d.bucket_step > 0 and d.bucket_step % 8 == 0, "data.bucket_step: must be a positive multiple of 8"),
        (d.max_upscale >= 1, "data.max_upscale: must be >= 1"),
        (d.num_workers >= 0, "data.num_workers: must be >= 0"),
        (0 <= d.validation_split < 1, "data.validation_split: must be in [0, 1)"),
        (not (d.validation_split and d.validation_dirs), "data.validation_split/validation_dirs: use one of them"),
        (bool(d.dirs or d.subsets), "data.dirs: give at least one image folder (or [[data.subsets]])"),
        (d.class_images_per_image >= 0, "data.class_images_per_image: must be >= 0 (0 = off)"),
        (not d.class_images_per_image or bool(d.trigger_word or d.caption_prefix),
         "data.class_images_per_image: class images are drawn from the captions without the trigger word; set "
         "data.trigger_word (or data.caption_prefix)"),
        (_non_negative(t.prior_loss_weight), "train.prior_loss_weight: must be a finite number >= 0"),
        (_non_negative(t.preservation_weight), "train.preservation_weight: must be a finite number >= 0 (0 = off)"),
        (not t.preservation_weight or bool(t.preservation_prompts or d.trigger_word or d.caption_prefix),
         "train.preservation_weight: preservation prompts are the captions without the trigger word; set "
         "data.trigger_word (or data.caption_prefix), or list train.preservation_prompts"),
        (t.early_stopping_patience >= 0, "train.early_stopping_patience: must be >= 0 (0 = off)"),
        (1 <= t.new_token_vectors <= 16, "train.new_token_vectors: must be between 1 and 16"),
        (len(set(t.new_tokens)) == len(t.new_tokens), "train.new_tokens: a word is listed twice"),
        (t.embedding_lr is None or _positive(t.embedding_lr), "train.embedding_lr: must be a finite number > 0"),
        (not (t.new_tokens and d.cache_text_encoder_outputs),
         "data.cache_text_encoder_outputs: train.new_tokens trains embeddings, which changes the text encoders' "
         "outputs; set it to false"),
        (_non_negative(t.early_stopping_min_delta), "train.early_stopping_min_delta: must be a finite number >= 0"),
        (not t.early_stopping_patience or bool(d.validation_split or d.validation_dirs),
         "train.early_stopping_patience: needs validation images (data.validation_split or data.validation_dirs)"),
        (not (d.cache_text_encoder_outputs and lo.train_text_encoder),
         "data.cache_text_encoder_outputs: needs lora.train_text_encoder = false (a trained encoder changes its "
         "outputs)"),
        (m.clip_skip is None or m.clip_skip >= 1, "model.clip_skip: must be at least 1 (2 = the penultimate layer)"),
        (lo.rank >= 1, "lora.rank: must be at least 1"),
        (_positive(lo.alpha), "lora.alpha: must be a finite number > 0"),
        (0 <= lo.dropout < 1, "lora.dropout: must be in [0, 1)"),
        (lo.train_unet or lo.train_text_encoder, "lora.train_unet/train_text_encoder: at least one must be true"),
        (lo.init != "pissa" or lo.method == "lora", "lora.init: \"pissa\" works with lora.method = \"lora\" only"),
        (not (lo.init == "pissa" and m.quantize_base == "nf4"),
         "lora.init: \"pissa\" rewrites the base weights, which NF4 cannot hold (use model.quantize_base = \"fp8\")"),
        (not (lo.method == "dora" and m.quantize_base == "fp8"),
         "lora.method: \"dora\" reads the base weights outside their layer, where fp8 storage is not upcast "
         "(use model.quantize_base = \"nf4\")"),
        (m.quantize_base != "fp8" or t.gradient_checkpointing,
         "model.quantize_base: \"fp8\" needs train.gradient_checkpointing = true (without it autograd keeps an "
         "upcast copy of every weight until the backward pass: more memory than fp8 saves)"),
        (lo.method != "adalora" or lo.init == "default",
         "lora.init: AdaLoRA has its own initialisation; keep \"default\""),
        (min(lo.adalora_init_rank, lo.adalora_warmup_steps, lo.adalora_final_steps) >= 0
         and lo.adalora_update_every >= 1,
         "lora.adalora_*: steps and ranks must be >= 0, adalora_update_every >= 1"),
        # Equal ranks would leave AdaLoRA nothing to prune (and peft's allocator fails on an empty pruning).
        (lo.adalora_init_rank == 0 or lo.adalora_init_rank > lo.rank, "lora.adalora_init_rank: must be > lora.rank"),
        (lo.method != "adalora" or sum(lo.adalora_schedule(t.max_train_steps)[1:]) < t.max_train_steps,
         "lora.adalora_warmup_steps + adalora_final_steps: must be fewer than train.max_train_steps (ranks are "
         "pruned in the steps between)"),
        (_non_negative(lo.adalora_orth_reg), "lora.adalora_orth_reg: must be a finite number >= 0"),
        *[(False, problem) for problem in _block_problems(lo)],
        (0 <= lo.rank_dropout < 1 and 0 <= lo.module_dropout < 1,
         "lora.rank_dropout/module_dropout: must be in [0, 1)"),
        (lo.method in ("loha", "lokr") or not (lo.rank_dropout or lo.module_dropout),
         "lora.rank_dropout/module_dropout: peft's LoRA layers have neither (they would do nothing); they work with "
         "lora.method = \"loha\" or \"lokr\", and lora.dropout drops a LoRA's inputs"),
        (lo.decompose_factor == -1 or lo.decompose_factor >= 1, "lora.decompose_factor: -1 or at least 1"),
        (lo.method not in ("loha", "lokr") or (lo.init == "default" and not lo.use_rslora and not lo.dropout),
         f"lora.method: \"{lo.method}\" has its own initialisation and scale alpha / rank, and drops rows or modules "
         "(lora.rank_dropout, module_dropout); keep lora.init = \"default\", use_rslora = false, dropout = 0"),
        (lo.method not in ("loha", "lokr") or m.quantize_base != "nf4",
         f"model.quantize_base: peft has no {lo.method} layer for bitsandbytes' 4-bit layers; use \"fp8\" or "
         "\"none\""),
        (lo.method not in ("loha", "lokr") or not t.loraplus_lr_ratio,
         f"train.loraplus_lr_ratio: LoRA+ speeds up LoRA's B matrices, which lora.method = \"{lo.method}\" has "
         "not; set it to 0"),
        (lo.method not in ("loha", "lokr") or "peft" not in cfg.export.formats,
         f"export.formats: diffusers' LoRA format has no {lo.method}; keep [\"kohya\"], whose LyCORIS keys "
         "ComfyUI, A1111/Forge and sdlora load"),
        (t.max_train_steps >= 1, "train.max_train_steps: must be at least 1"),
        (t.batch_size >= 1, "train.batch_size: must be at least 1"),
        (t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps: must be at least 1"),
        (t.lr_scheduler_num_cycles >= 1, "train.lr_scheduler_num_cycles: must be at least 1"),
        (_positive(t.lr_scheduler_power), "train.lr_scheduler_power: must be a finite number > 0"),
        (_positive(t.learning_rate), "train.learning_rate: must be a finite number > 0"),
        (t.unet_lr is None or _non_negative(t.unet_lr), "train.unet_lr: must be a finite number >= 0"),
        (t.text_encoder_lr is None or _non_negative(t.text_encoder_lr),
         "train.text_encoder_lr: must be a finite number >= 0"),
        (_non_negative(t.weight_decay), "train.weight_decay: must be a finite number >= 0"),
        (_non_negative(t.max_grad_norm), "train.max_grad_norm: must be a finite number >= 0 (0 = no clipping)"),
        (_non_negative(t.noise_offset), "train.noise_offset: must be a finite number >= 0"),
        (_non_negative(t.min_snr_gamma), "train.min_snr_gamma: must be a finite number >= 0 (0 = off)"),
        (0 <= t.min_timestep < (1000 if t.max_timestep is None else t.max_timestep) <= 1000,
         "train.min_timestep/max_timestep: need 0 <= min_timestep < max_timestep <= 1000"),
        (_positive(t.logit_std) and math.isfinite(t.logit_mean) and math.isfinite(t.mode_scale),
         "train.logit_mean/logit_std/mode_scale: must be finite numbers, logit_std > 0"),
        (_positive(t.huber_c), "train.huber_c: must be a finite number > 0"),
        (_non_negative(t.ip_noise_gamma), "train.ip_noise_gamma: must be a finite number >= 0 (0 = off)"),
        (t.multires_noise_iterations >= 0 and 0 < t.multires_noise_discount <= 1,
         "train.multires_noise_iterations: must be >= 0, multires_noise_discount in (0, 1]"),
        (0 <= t.ema_decay < 1, "train.ema_decay: must be in [0, 1) (0 = off)"),
        (t.optimizer != "adamw_schedulefree" or t.lr_scheduler == "constant",
         "train.lr_scheduler: schedule-free AdamW needs none; keep \"constant\" (lr_warmup_steps still warms up)"),
        (not (t.optimizer == "adamw_schedulefree" and t.ema_decay),
         "train.ema_decay: schedule-free AdamW already averages its iterates; use one of the two"),
        (t.ema_update_every >= 1, "train.ema_update_every: must be at least 1"),
        (not (t.ema_decay and lo.method == "adalora"),
         "train.ema_decay: AdaLoRA prunes ranks by zeroing their weights, which an average would bring back; use one "
         "of them"),
        (_non_negative(s.cfg), "sample.cfg: must be a finite number >= 0"),
        (_non_negative(t.loraplus_lr_ratio), "train.loraplus_lr_ratio: must be >= 0"),
        (t.validate_every_n_steps >= 0, "train.validate_every_n_steps: must be >= 0"),
        (t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps: must be at least 1"),
        (t.log_every_n_steps >= 1, "train.log_every_n_steps: must be at least 1"),
        (bool(t.wandb_project) and not set(t.wandb_project) & set(_NOT_IN_PROJECT),
         f"train.wandb_project: must be a non-empty name without any of {_NOT_IN_PROJECT}"),
        (min(t.save_every_n_steps, t.save_every_n_epochs, t.save_last_k, t.checkpoint_every_n_steps) >= 0,
         "train.save_*/checkpoint_every_n_steps: must be >= 0"),
        (bool(t.output_name) and "/" not in t.output_name and "\\" not in t.output_name,
         "train.output_name: must be a plain file name"),
        (s.sampler in SAMPLERS, f"sample.sampler: {s.sampler!r} is not one of {', '.join(map(repr, SAMPLERS))}"),
        (s.width % 8 == 0 and s.height % 8 == 0, "sample.width/height: must be multiples of 8"),
        (s.steps >= 1, "sample.steps: must be at least 1"),
    ]
    return _data_problems(d) + [message for ok, message in checks if not ok]


def _data_problems(d: DataConfig) -> list[str]:
    """The checks of the options a [[data.subsets]] table can set, on data.* and on each subset's own values."""
    problems = []
    tables: list[tuple[str, Any]] = [("data.", d)] + [(f"data.subsets[{i}].", s) for i, s in enumerate(d.subsets)]
    for prefix, t in tables:
        resolutions = [] if t.resolution is None else as_resolutions(t.resolution)
        checks = [
            (t is d or bool(t.dir), "dir: give the subset's image folder, e.g. dir = \"train/10_mystyle\""),
            (t.resolution is None or bool(resolutions) and len(set(resolutions)) == len(resolutions),
             "resolution: give one side length or a list of different ones, e.g. [512, 768]"),
            (all(r >= 64 and r % 8 == 0 for r in resolutions), "resolution: must be a multiple of 8, at least 64"),
            (not d.enable_bucket or all(d.min_bucket_reso <= r <= d.max_bucket_reso for r in resolutions),
             f"resolution: data.min_bucket_reso <= {prefix}resolution <= data.max_bucket_reso must hold"),
            (t.repeats is None or t.repeats >= 1, "repeats: must be at least 1"),
            (t is d or not (t.is_reg and t.caption_prefix),
             "caption_prefix: regularization images get no prefix (it is the trigger word); write the words into "
             "their captions"),
            (t.keep_tokens is None or t.keep_tokens >= 0, "keep_tokens: must be >= 0"),
            (all(x is None or 0 <= x <= 1 for x in (t.caption_dropout, t.tag_dropout)),
             "caption_dropout/tag_dropout: must be in [0, 1]"),
            (t is d or t.caption_extensions is None or all(e.startswith(".") for e in t.caption_extensions),
             "caption_extensions: each must start with a dot, e.g. \".txt\""),
            (not (d.cache_text_encoder_outputs and (t.shuffle_caption or t.caption_dropout or t.tag_dropout)),
             "shuffle_caption/caption_dropout/tag_dropout: cannot be combined with data.cache_text_encoder_outputs "
             "(captions must never change)"),
            (not (d.cache_latents != "none" and t.random_crop),
             "random_crop: cannot be combined with data.cache_latents (set cache_latents = \"none\")"),
        ]
        problems += [prefix + message for ok, message in checks if not ok]
    return problems


def _block_problems(lo: LoraConfig) -> list[str]:
    """The checks of kohya's per-block keys (lora.block_dims ...): each list as long as one model family's blocks,
    all for the same family, values in range, and nothing that would be set but not used."""
    settings = lo.block_settings()
    if not settings:
        return []
    if lo.method == "adalora":
        return [f"lora.{next(iter(settings))}: AdaLoRA learns each module's rank itself; per-block settings need "
                "lora.method = \"lora\", \"dora\", \"loha\" or \"lokr\""]
    problems = []
    families: dict[str, set[str]] = {}  # key -> the families whose block count its length is
    for key, value in settings.items():
        if isinstance(value, list):
            lengths = {arch: blocks.count(key) for arch, blocks in KOHYA_BLOCKS.items()}
            families[key] = {arch for arch, n in lengths.items() if n == len(value)}
            if not families[key]:
                problems.append(f"lora.{key}: {len(value)} values; give one per block: {lengths['sd1']} for SD "
                                f"1.x/2.x, {lengths['sdxl']} for SDXL")
            bad = [v for v in value if not (_positive(v) if key.endswith("alphas") else _non_negative(v))]
            if bad:
                problems.append(f"lora.{key}: {bad[0]!r} is out of range (alphas > 0, dims and weights >= 0)")
        elif isinstance(value, str):
            try:
                lr_weight_values(value, 2)
            except ValueError:
                problems.append(f"lora.{key}: {value!r} is not one of {', '.join(LR_WEIGHT_PRESETS)} (optionally "
                                "with \"+x\", e.g. \"sine+0.5\") or a list of weights")
    known = [f for f in families.values() if f]
    if known and not set.intersection(*known):
        problems.append("lora." + "/".join(families) + ": the lists are sized for different models (SD 1.x/2.x: 25 "
                        "blocks, 12 down/up, 1 mid; SDXL: 23, 9, 3)")
    lr_weights = [key for key in ("down_lr_weight", "mid_lr_weight", "up_lr_weight") if key in settings]
    conv = [key for key in ("conv_block_dims", "conv_block_alphas") if key in settings]
    checks = [
        (lo.train_unet,
         f"lora.{next(iter(settings))}: per-block settings are the UNet's; needs lora.train_unet = true"),
        (not conv or lo.targets == "all",
         f"lora.{'/'.join(conv)}: the 3x3 convolutions are adapted with lora.targets = \"all\" only"),
        (_non_negative(lo.block_lr_zero_threshold) and (bool(lr_weights) or not lo.block_lr_zero_threshold),
         "lora.block_lr_zero_threshold: a finite number >= 0 that needs down_lr_weight, mid_lr_weight or "
         "up_lr_weight"),
    ]
    return problems + [message for ok, message in checks if not ok]


def _non_negative(x: float) -> bool:
    return math.isfinite(x) and x >= 0


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0
