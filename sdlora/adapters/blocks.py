"""kohya's per-block ranks, alphas and learning rates (lora.block_dims, block_alphas, conv_block_dims,
conv_block_alphas, down/mid/up_lr_weight, block_lr_zero_threshold) on the UNet's adapters: which rank and alpha each
module gets (peft's rank_pattern / alpha_pattern, for LoRA, DoRA, LoHa and LoKr alike) and which learning-rate
weight each trained parameter has (the optimizer's parameter groups).

Written by hand because kohya's blocks are a convention of sd-scripts (networks/lora.py: get_block_index,
get_block_dims_and_alphas, get_block_lr_weight, remove_block_dims_and_alphas) that the community's configs use and
no library has; the semantics below are those functions'. Text-encoder modules are in no block: they keep the global
rank, alpha and learning rate, as in kohya.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from sdlora.config import KohyaBlocks, LoraConfig, kohya_blocks, lr_weight_values
from sdlora.errors import ConfigError
from sdlora.models.arch import ARCH_NAMES
from sdlora.models.ldm_names import kohya_block, unet_layout_from_config
from sdlora.models.loading import detect_arch


@dataclass(frozen=True)
class ModuleBlock:
    """What kohya's per-block settings give one UNet module."""

    block: str  # its block's name in config.KOHYA_BLOCKS
    rank: int  # 0: no adapter
    alpha: float
    lr_weight: float  # its learning rate is the UNet's times this


def unet_blocks(cfg: LoraConfig, unet: torch.nn.Module, names: list[str]) -> dict[str, ModuleBlock]:
    """{module name: ModuleBlock} for the UNet modules `names` (before or after injection), from lora's per-block
    keys; empty when none is set.

    Raises:
        ConfigError: the lists are sized for another model family than this UNet's.
    """
    settings = cfg.block_settings()
    if not settings:
        return {}
    # a diffusers UNet2DConditionModel's config (torch types any module attribute as Tensor | Module)
    config = cast(Mapping[str, Any], unet.config)
    arch = detect_arch({}, dict(config))
    blocks = kohya_blocks(arch)
    for key, value in settings.items():
        if isinstance(value, list) and len(value) != blocks.count(key):
            raise ConfigError(f"lora.{key}: {len(value)} values, but the base model is {ARCH_NAMES[arch]}, whose kohya "
                              f"blocks are {len(blocks.names)} ({_span(blocks.names)}): {len(blocks.down)} down "
                              f"({_span(blocks.down)}), {len(blocks.mid)} mid, {len(blocks.up)} up")
    weights = dict(zip(blocks.names, lr_weights(cfg, blocks)))
    layout = unet_layout_from_config(config)
    result = {}
    for name in names:
        block = kohya_block(name, layout, arch == "sdxl")
        index = blocks.names.index(block)
        module = unet.get_submodule(name)
        module = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        conv = isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)
        dims, alphas = (cfg.conv_block_dims, cfg.conv_block_alphas) if conv else (cfg.block_dims, cfg.block_alphas)
        rank = dims[index] if dims else cfg.rank
        # kohya's remove_block_dims_and_alphas: a block whose learning rate is 0 gets no adapter.
        result[name] = ModuleBlock(block, rank if weights[block] else 0,
                                   float(alphas[index]) if alphas else cfg.alpha, weights[block])
    return result


def lr_weights(cfg: LoraConfig, blocks: KohyaBlocks) -> list[float]:
    """The learning-rate weight of each block of `blocks.names` (kohya's get_block_lr_weight): down + mid + up, an
    unset part 1, a weight of a set part that is not above block_lr_zero_threshold 0; SDXL's BASE and OUT 1."""
    parts = []
    for value, n in ((cfg.down_lr_weight, len(blocks.down)), (cfg.mid_lr_weight, len(blocks.mid)),
                     (cfg.up_lr_weight, len(blocks.up))):
        given = lr_weight_values(value, n) if value else []
        parts += [w if w > cfg.block_lr_zero_threshold else 0.0 for w in given] or [1.0] * n
    return [1.0] * len(blocks.ends[:1]) + parts + [1.0] * len(blocks.ends[1:])


def block_patterns(cfg: LoraConfig, model: torch.nn.Module, component: str,
                   names: list[str]) -> tuple[list[str], dict[str, int], dict[str, float]]:
    """(the modules of `names` that get an adapter, peft's rank_pattern, alpha_pattern) under lora's per-block keys:
    `names` and no patterns for a text encoder or without per-block keys.

    Raises:
        ConfigError: see `unet_blocks`, or every module would be left out.
    """
    blocks = unet_blocks(cfg, model, names) if component == "unet" else {}
    if not blocks:
        return names, {}, {}
    kept = [name for name in names if blocks[name].rank]
    if not kept:
        raise ConfigError("lora.block_dims/down_lr_weight/mid_lr_weight/up_lr_weight: every UNet module lora.targets "
                          "adapts is in a block of dim 0 or learning rate 0")
    # peft matches these keys as regular expressions against the end of each module name.
    return (kept, {re.escape(name): blocks[name].rank for name in kept},
            {re.escape(name): blocks[name].alpha for name in kept})


def parameter_lr_weights(cfg: LoraConfig, unet: torch.nn.Module) -> dict[str, tuple[str, float]]:
    """{trainable parameter name: (its kohya block, learning-rate weight)} of an injected UNet; empty without
    per-block learning rates."""
    if not any((cfg.down_lr_weight, cfg.mid_lr_weight, cfg.up_lr_weight)):
        return {}
    layers = [name for name, module in unet.named_modules() if isinstance(module, BaseTunerLayer)]
    blocks = unet_blocks(cfg, unet, layers)
    return {f"{name}.{param_name}": (blocks[name].block, blocks[name].lr_weight)
            for name in layers for param_name, param in unet.get_submodule(name).named_parameters()
            if param.requires_grad}


def _span(names: tuple[str, ...]) -> str:
    return f"{names[0]}-{names[-1]}" if len(names) > 1 else names[0]
