"""LoRA, DoRA and PiSSA on the UNet and text encoders through peft: which modules, injection, and reading the
weights back; `LoraAdapters` is these methods behind the dispatcher (`adapters.methods`).

peft creates, initialises and runs the layers; this module only picks target modules (a small per-component
table) and exposes each adapted module as (down, up, alpha) for export and resume.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.adalora import AdaLoraLayer
from peft.tuners.lora import LoraLayer

from sdlora.adapters.blocks import block_patterns
from sdlora.config import LoraConfig
from sdlora.errors import ConfigError, LoraFileError

ADAPTER = "default"
# config lora.init -> peft's init_lora_weights. PiSSA with the exact SVD: the fast variants are randomised.
_PEFT_INIT: dict[str, Literal["gaussian", "pissa"] | bool] = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}

# Module-name patterns (full match against named_modules()) per component and target set. Each set contains the
# previous one. "attn_mlp" is kohya's default LoRA set: every Linear / 1x1 conv inside the transformer blocks and
# the text encoder's attention + MLP (SD1.5: 192 UNet + 72 text-encoder modules).
_UNET_ATTN = r".*(attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0))"
_UNET_MLP = r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))"
# LoCon-style: the ResNet convs, their time projections and the down/up-sampling convs (kohya's conv_dim set).
_UNET_CONV = r".*(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(downsamplers|upsamplers)\.0\.conv)"
_TE_ATTN = r".*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"
_TE_MLP = r".*layers\.\d+\.mlp\.(fc1|fc2)"

TARGETS = {
    "unet": {"attn": [_UNET_ATTN], "attn_mlp": [_UNET_ATTN, _UNET_MLP], "all": [_UNET_ATTN, _UNET_MLP, _UNET_CONV]},
    "text_encoder": {"attn": [_TE_ATTN], "attn_mlp": [_TE_ATTN, _TE_MLP], "all": [_TE_ATTN, _TE_MLP]},
}


@dataclass
class LoraWeights:
    """One adapted module: delta W = (alpha / rank) * up @ down, with down [r, in(, kh, kw)] and up [out, r(, 1, 1)].

    DoRA modules also have `magnitude` [out]: the weight becomes magnitude * V / ||V|| with V = W + delta W and the
    norm taken per output channel (over all other dimensions), as peft trains it.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def component_kind(component: str) -> str:
    """'unet' or 'text_encoder' (also for SDXL's text_encoder_2)."""
    return "unet" if component == "unet" else "text_encoder"


def target_module_names(model: torch.nn.Module, component: str, targets: str) -> list[str]:
    """Names of the Linear/Conv2d modules of `model` that LoRA adapts for this target set."""
    pattern = re.compile("|".join(f"(?:{p})" for p in TARGETS[component_kind(component)][targets]))
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and pattern.fullmatch(name)
    ]


def inject_lora(model: torch.nn.Module, component: str, cfg: LoraConfig,
                start: Mapping[str, LoraWeights] | None = None) -> list[str]:
    """Freeze `model` and add a trainable fp32 LoRA adapter (peft) to its target modules; returns their names.

    Args:
        start: {module name: LoraWeights} to start from (an existing LoRA file's, e.g. from kohya's dynamic resize or
            a LoCon): those modules are adapted too, each at the file's own rank and scale alpha / rank (peft's
            rank_pattern and alpha_pattern), with the file's weights.

    The other UNet modules get the rank and alpha of their kohya block where lora.block_dims etc. say
    (`blocks.block_patterns`).

    Raises:
        LoraFileError: a module of `start` does not fit the model's.
        ConfigError: see `blocks.block_patterns`, or a module of `start` is in a block that gets no adapter.
    """
    if cfg.method not in ("lora", "dora"):
        raise ValueError(f"inject_lora: lora.method {cfg.method!r} goes through adapters.methods.adapters_for")
    start = dict(start or {})
    names = target_module_names(model, component, cfg.targets)
    names += [name for name in start if name not in names]
    names, rank_pattern, alpha_pattern = block_patterns(cfg, model, component, names)
    left_out = [name for name in start if name not in names]
    if left_out:
        raise ConfigError(f"lora.block_dims/*_lr_weight: the block of {left_out[0]} gets no adapter (dim or learning "
                          "rate 0), but the LoRA file to continue has it")
    if not names:
        raise ValueError(f"no LoRA target modules found in the {component} for targets={cfg.targets!r}")
    if cfg.init == "pissa":
        convolutions = [n for n in names if isinstance(model.get_submodule(n), torch.nn.Conv2d)]
        if convolutions:
            # peft computes PiSSA's SVD for Linear layers only; SD1/SD2 UNets' proj_in/proj_out are 1x1 convs.
            raise ConfigError(f"lora.init = \"pissa\": peft starts Linear layers only from their singular vectors, "
                              f"and the {component}'s {convolutions[0]} is a convolution; use lora.targets = \"attn\"")
    model.requires_grad_(False)
    peft_config = PeftLoraConfig(
        r=cfg.rank,
        # peft annotates lora_alpha as int but only divides by it (scaling = alpha / r): a float alpha is exact.
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]
        lora_dropout=cfg.dropout,
        init_lora_weights=_PEFT_INIT[cfg.init],
        use_rslora=cfg.use_rslora,
        use_dora=cfg.method == "dora",
        target_modules=names,
        # peft matches these keys as regular expressions against the end of each module name.
        rank_pattern=rank_pattern | {re.escape(name): w.rank for name, w in start.items()},
        alpha_pattern=alpha_pattern | {re.escape(name): w.alpha / w.rank * (math.sqrt(w.rank) if cfg.use_rslora
                                                                          else w.rank) for name, w in start.items()},
    )
    # peft's own entry point for both the UNet and the text encoders: transformers' add_adapter demands its own
    # pairing of peft versions, and diffusers' only adds bookkeeping that pipelines need for loaded files.
    inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER)
    trained_in_fp32(model)
    set_lora_layers(model, start)
    return names


def trained_in_fp32(model: torch.nn.Module) -> None:
    """The trainable (adapter) weights of `model` in fp32 whatever the base dtype: fp16 updates of small adapter
    values underflow."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def lora_layers(model: torch.nn.Module) -> dict[str, LoraWeights]:
    """Every LoRA-adapted module of `model` as {module name: LoraWeights} (fp32 copies, detached).

    The exported alpha is scaling * rank, so rsLoRA (scaling = alpha / sqrt(r)) exports as an ordinary LoRA.

    Raises:
        ValueError: `model` has AdaLoRA layers, whose factors are read by `adalora.AdaLora.layers`.
    """
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, AdaLoraLayer):
            raise ValueError(f"{name}: an AdaLoRA layer; read it with the run's AdaLora.layers")
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            down = _adapter_weight(module.lora_A).detach().float().clone()
            up = _adapter_weight(module.lora_B).detach().float().clone()
            magnitude = None
            if ADAPTER in module.lora_magnitude_vector:
                # conv layers keep it as [1, out, 1, 1]
                magnitude = _adapter_weight(module.lora_magnitude_vector).detach().float().flatten().clone()
            layers[name] = LoraWeights(down, up, module.scaling[ADAPTER] * down.shape[0], magnitude)
    return layers


def pissa_as_lora(trained: dict[str, LoraWeights], initial: dict[str, LoraWeights]) -> dict[str, LoraWeights]:
    """PiSSA-trained modules as ordinary LoRA deltas against the ORIGINAL base weights, which every loader has.

    PiSSA moved the top singular directions B0 A0 out of the base weight (W_res = W - s B0 A0) into the adapter, so
    the model is W_res + s B A = W + s (B A - B0 A0): a LoRA of twice the rank, [B, -B0] @ [A; A0] (peft's
    `path_initial_model_for_weight_conversion` does the same for its own format).
    """
    converted = {}
    for name, now in trained.items():
        start = initial[name]
        scale = now.alpha / now.rank
        converted[name] = LoraWeights(torch.cat([now.down, start.down]), torch.cat([now.up, -start.up], dim=1),
                                      scale * 2 * now.rank)
    return converted


def set_lora_layers(model: torch.nn.Module, layers: dict[str, LoraWeights]) -> None:
    """Copy (down, up, alpha) into an injected adapter, e.g. to continue training from an existing LoRA.

    Raises:
        LoraFileError: a module is missing from the model or has other shapes (a LoRA for another model), or is
            DoRA where the adapter is not (or the reverse).
    """
    modules = dict(model.named_modules())
    for name, weights in layers.items():
        module = modules.get(name)
        if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
            raise LoraFileError(f"LoRA module {name} is not adapted in this model (different targets or architecture)")
        a, b = _adapter_weight(module.lora_A), _adapter_weight(module.lora_B)
        if a.shape != weights.down.shape or b.shape != weights.up.shape:
            raise LoraFileError(
                f"LoRA module {name}: shapes {tuple(weights.down.shape)}/{tuple(weights.up.shape)} do not fit "
                f"{tuple(a.shape)}/{tuple(b.shape)} (a LoRA for another model?)"
            )
        has_magnitude = ADAPTER in module.lora_magnitude_vector
        if (weights.magnitude is not None) != has_magnitude:
            kinds = ("DoRA", "plain LoRA") if weights.magnitude is not None else ("plain LoRA", "DoRA")
            raise LoraFileError(f"LoRA module {name}: the file is {kinds[0]} but the adapter is {kinds[1]} "
                                f"(set lora.method = \"{'dora' if weights.magnitude is not None else 'lora'}\")")
        with torch.no_grad():
            a.copy_(weights.down)
            # Fold the file's alpha into B so the effective delta is preserved under this adapter's scaling.
            b.copy_(weights.up * (weights.alpha / weights.rank) / module.scaling[ADAPTER])
            if weights.magnitude is not None:  # the same test as has_magnitude: the two agree, checked above
                m = _adapter_weight(module.lora_magnitude_vector)
                m.copy_(weights.magnitude.reshape(m.shape))


def _adapter_weight(layers: torch.nn.ModuleDict) -> torch.Tensor:
    """The weight of this run's adapter in one of a peft LoraLayer's per-adapter dicts (lora_A, lora_B, the DoRA
    magnitude)."""
    # torch types any module attribute as Tensor | Module (Module.__getattr__); these modules are nn.Linear,
    # nn.Conv2d and peft's DoRA layers, whose `weight` is a Parameter.
    return cast(torch.Tensor, layers[ADAPTER].weight)


class StepFreeAdapters:
    """The part of `adapters.methods.Adapters` for methods that are peft's layers and nothing else: no loss term, no
    work between steps, no state beside the weights."""

    needs_each_flag = False
    extra_states: tuple[str, ...] = ()

    def penalty(self) -> float:
        return 0.0

    def after_step(self, step: int, finite: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, states: dict) -> None:
        pass

    def report(self, out) -> str:
        return ""


class LoraAdapters(StepFreeAdapters):
    """LoRA, DoRA or PiSSA on the trained components of one run (see `adapters.methods.Adapters`): peft's layers,
    nothing to do between steps, and for PiSSA the initial factors the export needs."""

    def __init__(self, cfg: LoraConfig, total_steps: int):
        self.cfg = cfg
        self.pissa_start: dict[str, dict[str, LoraWeights]] = {}  # component -> PiSSA's initial factors

    def inject(self, model: torch.nn.Module, component: str,
               start: Mapping[str, LoraWeights] | None = None) -> list[str]:
        names = inject_lora(model, component, self.cfg, start)
        if self.cfg.init == "pissa":
            self.pissa_start[component] = lora_layers(model)
        return names

    def layers(self, component: str, model: torch.nn.Module) -> dict[str, LoraWeights]:
        layers = lora_layers(model)
        return pissa_as_lora(layers, self.pissa_start[component]) if component in self.pissa_start else layers


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def count_parameters(models: list[torch.nn.Module]) -> tuple[int, int]:
    """(trainable, total) parameter counts over several models; NF4 weights count as the weights they stand for."""
    trainable = sum(p.numel() for m in models for p in m.parameters() if p.requires_grad)
    total = sum(_logical_numel(p) for m in models for p in m.parameters())
    return trainable, total


def _logical_numel(param: torch.Tensor) -> int:
    state = getattr(param, "quant_state", None)  # bitsandbytes packs two 4-bit values per stored element
    return state.shape.numel() if state is not None else param.numel()


def is_up_weight(param_name: str) -> bool:
    """True for LoRA B (up) matrices, which LoRA+ trains with a higher learning rate."""
    return ".lora_B." in param_name


def effective_scale(cfg: LoraConfig) -> float:
    return cfg.alpha / (math.sqrt(cfg.rank) if cfg.use_rslora else cfg.rank)
