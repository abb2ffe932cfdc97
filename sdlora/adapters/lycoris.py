"""LoHa and LoKr, LyCORIS' algorithms, through peft's LoHa / LoKr layers: training (`LycorisAdapters`, behind the
dispatcher `adapters.methods`), the trained modules as the tensors a LyCORIS file holds (`LycorisWeights`), and
LyCORIS files loaded into a pipeline's models (`load_lycoris`).

Loading, ours and others' files alike, goes through peft's layers too, not by folding the delta into the weights:
each file becomes a named peft adapter beside the LoRA files' ones, so diffusers' `set_adapters` (a weight per file
and component), `disable_lora` (weight 0 = the base model bit for bit), `fuse_lora` (merge-into-base) and
`delete_adapters` treat it exactly as a LoRA file, and peft computes the delta (its formulas are LyCORIS'; the
tests check them against ComfyUI's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import torch
from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lokr.layer import make_weight_cp
from peft.tuners.lycoris_utils import LycorisLayer

from sdlora.adapters.blocks import block_patterns
from sdlora.adapters.files import LYCORIS_NAMES, LYCORIS_PARTS, lycoris_missing, lycoris_rank
from sdlora.adapters.lora import ADAPTER, LoraWeights, StepFreeAdapters, target_module_names, trained_in_fp32
from sdlora.config import LoraConfig
from sdlora.errors import LoraFileError

_CONFIGS: dict[str, type[LoHaConfig] | type[LoKrConfig]] = {"loha": LoHaConfig, "lokr": LoKrConfig}
_LAYERS: dict[str, type[LoHaLayer] | type[LoKrLayer]] = {"loha": LoHaLayer, "lokr": LoKrLayer}
# The factor each algorithm's delta is linear in, which takes the scale on export: LoHa's delta is
# (w1_a @ w1_b) * (w2_a @ w2_b) (Tucker: t1/t2 cores), LoKr's kron(w1, w2) (peft trains w1 as a full matrix unless
# decompose_both, which sdlora does not set).
_SCALED_PART = {"loha": "hada_w1_a", "lokr": "lokr_w1"}


@dataclass
class LycorisWeights:
    """One LoHa / LoKr module as a LyCORIS file holds it: {LYCORIS_PARTS name: fp32 tensor} and the module's alpha.

    Loaders scale the algorithm's product by alpha / `files.lycoris_rank(parts)` (1 when that is None).
    """

    algo: str
    parts: dict[str, torch.Tensor]
    alpha: float


def lycoris_weights(layer: LoHaLayer | LoKrLayer, algo: str, adapter: str = ADAPTER) -> LycorisWeights:
    """A peft LoHa / LoKr module as the tensors of a LyCORIS file, with the same delta as peft's
    `get_delta_weight` under every loader.

    peft scales by alpha / r; loaders by alpha / the rank they read from the tensors, which for a LoKr with two
    full factors is none (scale 1). So the file's alpha is that rank, making every loader's scale 1, and peft's
    scale is multiplied into the factor the delta is linear in (`_SCALED_PART`).

    A LoKr convolution trained with a Tucker core (lora.effective_conv) is written with its second factor rebuilt
    as the full `lokr_w2` (peft's own rebuild): ComfyUI's lokr.py passes the rebuilt factor to torch.kron as
    einsum returns it, not contiguous, which torch (2.13) refuses, so ComfyUI would skip the module with an error.
    """
    parts = {part: getattr(layer, part)[adapter].detach().float().clone()
             for part in LYCORIS_PARTS[algo] if adapter in getattr(layer, part)}
    if "lokr_t2" in parts:
        parts["lokr_w2"] = make_weight_cp(parts.pop("lokr_t2"), parts.pop("lokr_w2_a"), parts.pop("lokr_w2_b"))
    scaled = _SCALED_PART[algo]
    parts[scaled] = parts[scaled] * layer.scaling[adapter]
    return LycorisWeights(algo, parts, float(lycoris_rank(parts) or layer.r[adapter]))


class LycorisAdapters(StepFreeAdapters):
    """LoHa or LoKr (lora.method) on the trained components of one run (see `adapters.methods.Adapters`): peft's
    layers on the modules plain LoRA adapts, nothing to do between steps."""

    def __init__(self, cfg: LoraConfig, total_steps: int):
        self.cfg = cfg

    def inject(self, model: torch.nn.Module, component: str,
               start: Mapping[str, LoraWeights] | None = None) -> list[str]:
        """Freeze `model` and add a trainable fp32 LoHa / LoKr adapter (peft) to the modules of lora.targets, UNet
        modules at the rank and alpha of their kohya block where lora.block_dims etc. say (`blocks.block_patterns`)."""
        cfg = self.cfg
        if start:  # methods.read_init_lora refuses such runs before the model loads
            raise ValueError(f"lora.method = {cfg.method!r} starts from zero; it cannot continue a LoRA file")
        names = target_module_names(model, component, cfg.targets)
        if not names:
            raise ValueError(f"no target modules found in the {component} for targets={cfg.targets!r}")
        names, rank_pattern, alpha_pattern = block_patterns(cfg, model, component, names)
        model.requires_grad_(False)
        config = _CONFIGS[cfg.method](
            r=cfg.rank,
            # peft annotates alpha as int but only divides by it (scaling = alpha / r): a float alpha is exact.
            alpha=cfg.alpha,  # type: ignore[arg-type]
            rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout,
            use_effective_conv2d=cfg.effective_conv, target_modules=names, rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
        )
        if isinstance(config, LoKrConfig):
            config.decompose_factor = cfg.decompose_factor
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        trained_in_fp32(model)
        return names

    def layers(self, component: str, model: torch.nn.Module) -> dict[str, LycorisWeights]:
        """The adapted modules of `model` as LyCORIS tensors (`lycoris_weights`)."""
        algo = self.cfg.method
        return {name: lycoris_weights(module, algo) for name, module in model.named_modules()
                if isinstance(module, _LAYERS[algo]) and ADAPTER in module._available_adapters}


def load_lycoris(model: torch.nn.Module, adapter: str, algo: str,
                 modules: Mapping[str, Mapping[str, torch.Tensor]], label: str) -> None:
    """Add one file's LoHa or LoKr modules to `model` as the peft adapter `adapter`, which diffusers' pipeline
    methods then switch, weigh, fuse and delete like a LoRA adapter.

    Args:
        modules: {module path in `model`: {LYCORIS_PARTS name or "alpha": tensor}}, all of algorithm `algo`.
        label: names the file in errors.

    Peft builds each layer's factors from its config (LoKr's factor shapes from decompose_factor and the rank), which
    a file made elsewhere need not match; so the layers are created at rank 1 and their factors replaced by the
    file's, whatever their shapes, with the loaders' scale alpha / `lycoris_rank` (peft's get_delta_weight reads
    whichever factors a layer has).

    Raises:
        LoraFileError: a module with a DoRA scale (LyCORIS' dora_wd, which peft's LoHa/LoKr do not have), without
            one of its factors, or whose factors do not make its weight's shape.
    """
    for path, parts in modules.items():
        missing = lycoris_missing(algo, parts)
        if missing:
            raise LoraFileError(f"{label}: {LYCORIS_NAMES[algo]} module {path} has no {missing}")
        if "dora_scale" in parts:
            raise LoraFileError(f"{label}: module {path} is a {LYCORIS_NAMES[algo]} with DoRA weight decomposition "
                                "(dora_scale), which sdlora does not load")
    inject_adapter_in_model(_CONFIGS[algo](r=1, alpha=1, target_modules=list(modules)), model, adapter_name=adapter)
    # diffusers' and transformers' mark of a model that holds adapters (torch types Module attributes as modules)
    model._hf_peft_config_loaded = True  # type: ignore[assignment]
    for path, parts in modules.items():
        layer = cast(LycorisLayer, model.get_submodule(path))
        weight = cast(torch.Tensor, layer.get_base_layer().weight)  # a Linear's or Conv2d's
        for part in LYCORIS_PARTS[algo]:
            if adapter in getattr(layer, part):
                del getattr(layer, part)[adapter]
            if part in parts:
                getattr(layer, part)[adapter] = torch.nn.Parameter(parts[part].to(weight.device, weight.dtype),
                                                                   requires_grad=False)
        rank = lycoris_rank(parts)
        scale = float(parts["alpha"].item()) / rank if rank and "alpha" in parts else 1.0
        # set_scale(adapter, w) makes scaling w * alpha / r: with r = 1 and alpha = the file's scale, a weight w
        # gives w times the file's delta.
        layer.r[adapter], layer.alpha[adapter], layer.scaling[adapter] = 1, scale, scale
        try:
            layer.get_delta_weight(adapter)
        except RuntimeError:
            shapes = ", ".join(f"{p} {tuple(t.shape)}" for p, t in parts.items() if p != "alpha")
            raise LoraFileError(f"{label}: module {path}: its {LYCORIS_NAMES[algo]} factors ({shapes}) do not make "
                                f"its weight {tuple(weight.shape)} (a file for another model?)") from None


def remove_lycoris(model: torch.nn.Module) -> None:
    """Put back the layer each LoHa / LoKr layer of `model` wraps, and drop those adapters' configs.

    For `LoraCache`: peft's LoRA convolution reads `groups` from the layer it wraps, which a LyCORIS layer does not
    have, so the LyCORIS adapters come off while a LoRA file is added and are loaded again on top afterwards.
    """
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(module, LycorisLayer) and not isinstance(parent, LycorisLayer):  # the outermost of a nest
            inner = cast(torch.nn.Module, module)
            while isinstance(inner, LycorisLayer):
                inner = inner.get_submodule("base_layer")
            setattr(parent, child, inner)
    configs = getattr(model, "peft_config", {})
    for adapter in [a for a, config in configs.items() if isinstance(config, (LoHaConfig, LoKrConfig))]:
        del configs[adapter]
