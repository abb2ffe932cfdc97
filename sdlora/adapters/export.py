"""Export LoRA weights to the community (kohya) format and the diffusers/peft format, and import them back.

Key mapping (`to_kohya_state_dict`, `from_kohya_state_dict`) and metadata (`build_metadata`) are pure functions;
`save_kohya_lora` / `save_peft_lora` are thin writers on top. The community format is what kohya's sd-scripts
(networks/lora.py) writes and ComfyUI (comfy/lora.py), A1111 (extensions-builtin/Lora) and diffusers
(loaders/lora_conversion_utils.py) read; every rename rule below names the loader that expects it. Reading,
hashing, architecture detection and inspection of existing files are `adapters.files`.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

import torch

from sdlora.adapters.files import (
    bytes_hashes,
    read_lora_file,
    split_lora_key,
    unsupported_network_type,
)
from sdlora.adapters.lora import LoraWeights, effective_scale
from sdlora.adapters.lycoris import LycorisWeights
from sdlora.atomic import save_safetensors
from sdlora.config import Config
from sdlora.errors import LoraFileError
from sdlora.models.arch import ARCHS, modelspec_architecture
from sdlora.models.ldm_names import (
    SDXL_BASE_LAYOUT,
    UnetLayout,
    unet_layout_from_config,
    unet_layout_from_names,
    unet_path_to_ldm,
)

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
PEFT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights(dir) looks for


# --------------------------------------------------------------------------------------------------------------
# Module names: diffusers path -> kohya name
# --------------------------------------------------------------------------------------------------------------

# kohya prefixes. kohya's sd-scripts is the strictest loader: SD1.x/2.x text encoder must be `lora_te_`, SDXL's
# CLIP-L `lora_te1_` and OpenCLIP-bigG `lora_te2_`. diffusers converts a kohya file only if *every* key starts
# with one of these four (lora_pipeline.lora_state_dict), so nothing else may go into the file.
_UNET_PREFIX = "lora_unet_"
_TE_PREFIX = {("sd1", "text_encoder"): "lora_te_", ("sd2", "text_encoder"): "lora_te_",
              ("sdxl", "text_encoder"): "lora_te1_", ("sdxl", "text_encoder_2"): "lora_te2_"}

def text_encoder_path(path: str) -> str:
    """Text-encoder module path with the `text_model.` level, whatever transformers version made it.

    transformers 5 `CLIPTextModel` dropped its `.text_model` submodule (names start `encoder.`) while
    `CLIPTextModelWithProjection` kept it. kohya, ComfyUI and A1111 only know `text_model_encoder_layers_...`
    (diffusers strips the level again when the model has none), so the exported name always has it.
    """
    if path.startswith(("encoder.", "embeddings.", "final_layer_norm")):
        return "text_model." + path
    return path


def kohya_module_name(component: str, path: str, arch: str, layout: UnetLayout | None = None) -> str:
    """The kohya module name (without `.lora_down.weight` etc.) of one diffusers module.

    Args:
        component: "unet", "text_encoder" or "text_encoder_2".
        path: module path from `named_modules()`, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q".
        arch: one of ARCHS.
        layout: the UNet's LDM layout (SDXL only); default SDXL_BASE_LAYOUT.

    Returns:
        e.g. "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" (SDXL) or
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj" (SD1.x).

    Raises:
        ValueError: unknown arch/component, or a component the arch does not have.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if component == "unet":
        if arch == "sdxl":
            # kohya trains SDXL on its own LDM-named UNet (sdxl_original_unet), so every SDXL LoRA in the wild
            # uses input_blocks/middle_block/output_blocks; ComfyUI (model_lora_keys_unet), A1111 (its
            # "lora_unet" -> "diffusion_model" fallback) and diffusers (_maybe_map_sgm_blocks_to_diffusers)
            # all load these names.
            path = unet_path_to_ldm(path, layout or SDXL_BASE_LAYOUT)
        # SD1.x/2.x: kohya trains on the diffusers UNet and writes its paths; every loader expects those.
        return _UNET_PREFIX + path.replace(".", "_")
    prefix = _TE_PREFIX.get((arch, component))
    if prefix is None:
        raise ValueError(f"component {component!r} does not exist in a {arch} model")
    return prefix + text_encoder_path(path).replace(".", "_")


def to_kohya_state_dict(
    layers: Mapping[str, Mapping[str, LoraWeights | LycorisWeights]],
    arch: str,
    dtype: torch.dtype = torch.float16,
    unet_config: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """LoRA layers of every component as a kohya-format state dict.

    Args:
        layers: {component: {diffusers module path: LoraWeights}}, components "unet", "text_encoder",
            "text_encoder_2" (e.g. `{"unet": lora_layers(pipe.unet), ...}`).
        arch: "sd1", "sd2" or "sdxl".
        dtype: dtype of the down/up tensors; `.alpha` is always a 0-dim fp32 tensor (kohya's convention).
        unet_config: the UNet's config (`pipe.unet.config`), which sets the SDXL LDM block numbering; default the
            SDXL base layout. Ignored for SD1.x/2.x.

    Returns:
        {"<name>.lora_down.weight": [r, in(, kh, kw)], "<name>.lora_up.weight": [out, r(, 1, 1)],
        "<name>.alpha": scalar}; conv LoRA stays 4-D, which kohya and diffusers require for 1x1 proj_in/out too.
        LoHa / LoKr modules give `<name>.<LyCORIS part>` (e.g. `.hada_w1_a`, `.lokr_w2_b`) and `<name>.alpha`.

    Raises:
        ValueError: unknown arch/component, a module without an LDM name (SDXL), mismatched ranks, or two modules
            mapping to the same name.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    layout = unet_layout_from_config(unet_config) if unet_config is not None else None
    out: dict[str, torch.Tensor] = {}
    for component, modules in layers.items():
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
        for path, weights in modules.items():
            name = kohya_module_name(component, path, arch, layout)
            if f"{name}.alpha" in out:
                raise ValueError(f"{component} modules map to the same kohya name {name}")
            out.update(kohya_module_tensors(name, weights, dtype, label=f"{component} {path}"))
    return out


def kohya_module_tensors(
    name: str, weights: LoraWeights | LycorisWeights, dtype: torch.dtype = torch.float16, label: str | None = None
) -> dict[str, torch.Tensor]:
    """The three kohya tensors of one module: `<name>.lora_down.weight`, `.lora_up.weight` (CPU, `dtype`) and
    `.alpha` (0-dim fp32, kohya's convention); a LoHa / LoKr module's LyCORIS tensors, `<name>.<part>`, and alpha.

    Raises:
        ValueError: down and up do not fit (ranks or dimensions differ); the message starts with `label` (default
            `name`).
    """
    alpha = {f"{name}.alpha": torch.tensor(float(weights.alpha), dtype=torch.float32)}
    if isinstance(weights, LycorisWeights):
        # The names LyCORIS writes and ComfyUI / A1111 read (files.LYCORIS_PARTS), under the kohya module name.
        return {**{f"{name}.{part}": t.detach().to("cpu", dtype).contiguous() for part, t in weights.parts.items()},
                **alpha}
    down, up = weights.down, weights.up
    if down.shape[0] != up.shape[1] or down.dim() != up.dim():
        raise ValueError(f"{label or name}: down {tuple(down.shape)} and up {tuple(up.shape)} do not fit")
    tensors = {
        f"{name}.lora_down.weight": down.detach().to("cpu", dtype).contiguous(),
        f"{name}.lora_up.weight": up.detach().to("cpu", dtype).contiguous(),
        **alpha,
    }
    if weights.magnitude is not None:
        # LyCORIS' output-axis layout [out, 1(, 1, 1)], which ComfyUI detects by dora_scale.shape[0] == out.
        shape = (up.shape[0],) + (1,) * (up.dim() - 1)
        tensors[f"{name}.dora_scale"] = weights.magnitude.detach().to("cpu", dtype).reshape(shape).contiguous()
    return tensors


# --------------------------------------------------------------------------------------------------------------
# Import: any common LoRA key style -> {component: {module path: LoraWeights}}
# --------------------------------------------------------------------------------------------------------------

def _module_aliases(module_names: Mapping[str, Iterable[str]]) -> dict[str, tuple[str, str] | None]:
    """Every spelling a file may use for each module -> (component, module path); None marks an ambiguous one.

    Built forwards from the real module names and inverted, because `_` names cannot be split back reliably
    (`to_out_0`, `ff_net_0_proj`, `transformer_blocks`).
    """
    aliases: dict[str, tuple[str, str] | None] = {}

    def add(alias: str, target: tuple[str, str]) -> None:
        aliases[alias] = target if aliases.get(alias, target) == target else None

    for component, names in module_names.items():
        names = list(names)
        if component == "unet":
            layout = unet_layout_from_names(names)
            for name in names:
                add(_UNET_PREFIX + name.replace(".", "_"), (component, name))  # SD1.x/2.x kohya, and SDXL in A1111
                add(f"unet.{name}", (component, name))  # diffusers / peft
                if layout is not None:
                    try:
                        ldm = unet_path_to_ldm(name, layout)
                    except ValueError:
                        continue
                    add(_UNET_PREFIX + ldm.replace(".", "_"), (component, name))  # SDXL kohya (any UNet in ComfyUI)
        elif component in ("text_encoder", "text_encoder_2"):
            # ComfyUI maps both lora_te_ and lora_te1_ onto CLIP-L; SDXL's second encoder is only lora_te2_.
            prefixes = ("lora_te_", "lora_te1_") if component == "text_encoder" else ("lora_te2_",)
            for name in names:
                full = text_encoder_path(name)
                for spelling in {name, full, full.removeprefix("text_model.")}:
                    for prefix in prefixes:
                        add(prefix + spelling.replace(".", "_"), (component, name))
                    add(f"{component}.{spelling}", (component, name))
        else:
            raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    return aliases


def match_lora_keys(
    sd: Mapping[str, torch.Tensor], module_names: Mapping[str, Iterable[str]]
) -> tuple[dict[tuple[str, str], dict[str, str]], list[str]]:
    """Which module of the model each key of a LoRA state dict (any format `from_kohya_state_dict` reads) belongs to.

    Returns:
        ({(component, module path): {"down" | "up" | "alpha" | ...: key}}, the keys that match no module, in file
        order: modules the model lacks and keys that are no LoRA tensor).
    """
    aliases = _module_aliases(module_names)
    matched: dict[tuple[str, str], dict[str, str]] = {}
    unmatched = []
    for key in sd:
        split = split_lora_key(key)
        target = aliases.get(split[0]) if split else None
        if split is None or target is None:
            unmatched.append(key)
        else:
            matched.setdefault(target, {})[split[1]] = key
    return matched, unmatched


def unmatched_modules(keys: Iterable[str]) -> list[str]:
    """The module names of unmatched keys (from `match_lora_keys`), each once, in order; a key that is no LoRA
    tensor stands for itself."""
    names = [split[0] if (split := split_lora_key(key)) else key for key in keys]
    return list(dict.fromkeys(names))


def from_kohya_state_dict(
    sd: Mapping[str, torch.Tensor], module_names: Mapping[str, Iterable[str]]
) -> dict[str, dict[str, LoraWeights]]:
    """Map a LoRA state dict (kohya, LDM-named SDXL, diffusers/peft, old diffusers) onto the model's modules.

    Args:
        sd: the file's tensors.
        module_names: {component: every module name of that model}, e.g.
            `{"unet": dict(pipe.unet.named_modules()), "text_encoder": ...}`. The UNet's block layout (for LDM
            names) is read from these, so pass all of them, not just the LoRA targets.

    Returns:
        {component: {module path: LoraWeights}} with fp32 tensors; a module without `.alpha` gets alpha = rank.

    Raises:
        LoraFileError: a LyCORIS network (LoHa, LoKr, ...; DoRA is read), keys that match no module (a few are
            named), a down without its up (or the reverse), or down/up ranks that disagree.
    """
    unsupported = unsupported_network_type(sd)
    if unsupported:
        name, key = unsupported
        raise LoraFileError(
            f"this is a {name} network (e.g. key {key!r}), which is not supported; only plain LoRA "
            "(lora_down/lora_up or lora_A/lora_B) files can be imported"
        )
    matched, unmatched = match_lora_keys(sd, module_names)
    if unmatched:
        raise LoraFileError(f"{stray_message(unmatched, len(matched))} (a LoRA for another architecture, or "
                            "another network type?)")
    layers: dict[str, dict[str, LoraWeights]] = {}
    for (component, name), keys in matched.items():
        tensors = {kind: sd[key] for kind, key in keys.items()}
        layers.setdefault(component, {})[name] = lora_weights_from_tensors(tensors, f"{component} module {name}")
    return layers


def stray_message(unmatched: Iterable[str], matched_modules: int) -> str:
    """'N of M LoRA modules match no module of this model: a, b, c and K more', from `match_lora_keys`' unmatched
    keys and its number of matched modules."""
    modules = unmatched_modules(unmatched)
    shown = ", ".join(modules[:3]) + (f" and {len(modules) - 3} more" if len(modules) > 3 else "")
    return f"{len(modules)} of {len(modules) + matched_modules} LoRA modules match no module of this model: {shown}"


def lora_weights_from_tensors(tensors: Mapping[str, torch.Tensor], label: str) -> LoraWeights:
    """One module's {"down", "up"[, "alpha", "dora_scale" | "magnitude"]} tensors (as `split_lora_key` names them)
    as fp32 LoraWeights.

    A module without alpha gets alpha = rank (scale 1), as every loader assumes.

    Raises:
        LoraFileError: down or up missing, or their ranks differ; the message starts with `label`.
    """
    if "down" not in tensors or "up" not in tensors:
        missing = "up" if "down" in tensors else "down"
        raise LoraFileError(f"{label}: the file has no {missing} weight for it")
    down, up = tensors["down"].float(), tensors["up"].float()
    if down.shape[0] != up.shape[1]:
        raise LoraFileError(f"{label}: down {tuple(down.shape)} and up {tuple(up.shape)} ranks differ")
    alpha = float(tensors["alpha"].item()) if "alpha" in tensors else float(down.shape[0])
    magnitude = tensors.get("magnitude")
    if "dora_scale" in tensors:
        magnitude = tensors["dora_scale"]
        if magnitude.shape[0] != up.shape[0] or magnitude.numel() != up.shape[0]:
            # LyCORIS' default (wd_on_out = false) normalises per input channel, which peft's DoRA cannot express.
            raise LoraFileError(f"{label}: DoRA scale {tuple(magnitude.shape)} is per input channel (LyCORIS "
                                "wd_on_out = false); only per-output-channel DoRA can be loaded here (ComfyUI and "
                                "A1111 load this file)")
    if magnitude is not None and magnitude.numel() != up.shape[0]:
        raise LoraFileError(f"{label}: DoRA magnitude {tuple(magnitude.shape)} does not fit {up.shape[0]} outputs")
    return LoraWeights(down, up, alpha, None if magnitude is None else magnitude.float().flatten())


def load_lora_layers(
    path: str | Path, module_names: Mapping[str, Iterable[str]]
) -> tuple[dict[str, dict[str, LoraWeights]], dict[str, str]]:
    """Read a LoRA file and map it onto a model, e.g. to continue training it.

    Args:
        path: a `.safetensors` LoRA (kohya, LDM-named SDXL, or diffusers/peft format).
        module_names: {component: every module name of that model}, see `from_kohya_state_dict`.

    Returns:
        ({component: {module path: LoraWeights}}, the file's metadata).

    Raises:
        LoraFileError: see `read_lora_file` and `from_kohya_state_dict`; the message names the file.
    """
    sd, metadata = read_lora_file(path)
    try:
        return from_kohya_state_dict(sd, module_names), metadata
    except LoraFileError as e:
        raise LoraFileError(f"{path}: {e}") from None


# --------------------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------------------

# lora.targets -> LyCORIS' preset of the same modules (lycoris/config.py PRESET): "full" adds the ResNet convs.
_LYCORIS_PRESETS = {"attn": "attn-only", "attn_mlp": "attn-mlp", "all": "full"}

# ss_optimizer holds the optimizer class path, as kohya writes it.
_OPTIMIZER_NAMES = {
    "adamw": "torch.optim.adamw.AdamW",
    "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
    "prodigy": "prodigyopt.prodigy.Prodigy",
    "adafactor": "transformers.optimization.Adafactor",
    "adamw_schedulefree": "schedulefree.adamw_schedulefree.AdamWScheduleFree",
}


@dataclass(frozen=True)
class RunInfo:
    """What a LoRA file's metadata records about the run that trained it, beside the config."""

    steps: int
    epoch: int
    num_train_images: int  # with repeats
    training_started_at: float  # unix time
    training_finished_at: float  # unix time
    tag_frequency: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # {dataset folder: {tag: images}}
    dataset_dirs: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # {folder: n_repeats, img_count}
    num_reg_images: int = 0  # regularization images with their folders' repeats, as kohya counts them
    reg_dataset_dirs: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # as dataset_dirs
    sd_model_name: str = ""  # the base model; only its file name is written
    prediction_type: str = ""  # "epsilon" | "v_prediction" as resolved from the scheduler; "" = the config's
    clip_skip: int | None = None
    date: str = ""  # ISO 8601; "" = training_finished_at
    extra: Mapping[str, str] = field(default_factory=dict)  # added as is; may not replace a computed key


def build_metadata(cfg: Config, arch: str, info: RunInfo) -> dict[str, str]:
    """The safetensors `__metadata__` of a kohya-format LoRA: kohya `ss_*` keys and Stability's `modelspec.*`.

    Pure: no file access, no clock. Paths are reduced to their last component so no absolute path leaks into a
    shared file. The hashes (`sshs_*`) are added by `save_kohya_lora`, which sees the bytes.

    Args:
        cfg: the training config.
        arch: "sd1", "sd2" or "sdxl".
        info: the run's facts.

    Returns:
        {key: str}; dict values are JSON strings.

    Raises:
        ValueError: unknown arch, or an `extra` key that collides, is not a str or is an absolute path.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    lo, t, d, ex = cfg.lora, cfg.train, cfg.data, cfg.export
    prediction = info.prediction_type or cfg.model.prediction_type or "epsilon"
    v_pred = prediction in ("v_prediction", "v")
    rank = lo.rank
    alpha = effective_scale(lo) * rank  # what the file's .alpha tensors hold (rsLoRA folded in, see lora_layers)
    network_args: dict[str, Any] = {"targets": lo.targets, "use_rslora": lo.use_rslora}
    if lo.method == "dora":
        network_args["dora_wd"] = True  # LyCORIS' name for DoRA's weight decomposition
    if lo.init != "default":
        network_args["init"] = lo.init
    if lo.init == "pissa":  # exported as the delta against the original base: twice the rank, see lora.pissa_as_lora
        rank, alpha = 2 * rank, 2 * alpha
    if t.loraplus_lr_ratio:
        network_args["loraplus_lr_ratio"] = metadata_number(t.loraplus_lr_ratio)  # kohya's LoRA+ argument
    dim, dim_alpha = str(rank), metadata_number(alpha)
    if lo.method == "adalora":
        # Every module has the rank AdaLoRA left it and its own alpha: "Dynamic", as kohya's resize_lora.py writes.
        dim = dim_alpha = "Dynamic"
        init_rank, warmup, final = lo.adalora_schedule(t.max_train_steps)
        network_args.update(algo="adalora", target_rank=str(rank), init_rank=str(init_rank), warmup_steps=str(warmup),
                            final_steps=str(final), update_every=str(lo.adalora_update_every),
                            orth_reg=metadata_number(lo.adalora_orth_reg))
    if lo.targets == "all":
        # kohya's LoCon arguments: the ResNet/sampler convs are trained with this rank/alpha.
        network_args.update(conv_dim=dim, conv_alpha=dim_alpha)
    network_module = "networks.lora"
    if lo.method in ("loha", "lokr"):
        # As LyCORIS' kohya network (lycoris.kohya) records a run: its module, and network_args as the strings of
        # `--network_args` (lycoris/kohya.py reads these names). Every module's alpha is its rank, the scale being
        # in the factors (lycoris.lycoris_weights); sdlora_alpha keeps the trained alpha.
        network_module, dim_alpha = "lycoris.kohya", dim
        network_args = {"algo": lo.method, "preset": _LYCORIS_PRESETS[lo.targets], "conv_dim": dim,
                        "conv_alpha": dim, "use_tucker": str(lo.effective_conv), "rank_dropout": str(lo.rank_dropout),
                        "module_dropout": str(lo.module_dropout), "sdlora_alpha": metadata_number(lo.alpha)}
        if lo.method == "lokr":
            network_args["factor"] = str(lo.decompose_factor)
    for key, value in lo.block_settings().items():  # as kohya records --network_args: strings, lists comma-separated
        network_args[key] = value if isinstance(value, str) else ",".join(
            map(metadata_number, value if isinstance(value, list) else [value]))

    side = d.largest_resolution()
    date = info.date or datetime.datetime.fromtimestamp(
        float(info.training_finished_at), tz=datetime.timezone.utc
    ).isoformat(timespec="seconds")

    meta = {
        "ss_network_module": network_module,
        "ss_network_dim": dim,
        "ss_network_alpha": dim_alpha,
        "ss_network_args": json.dumps(network_args),
        "ss_sd_model_name": _basename(str(info.sd_model_name or cfg.model.base_model)),
        # kohya writes the tuple's repr; of several resolutions the largest (ss_datasets has each subset's)
        "ss_resolution": f"({side}, {side})",
        "ss_learning_rate": str(t.learning_rate),
        "ss_unet_lr": str(t.unet_lr if t.unet_lr is not None else t.learning_rate) if lo.train_unet else "0",
        "ss_text_encoder_lr": (
            str(t.text_encoder_lr if t.text_encoder_lr is not None else t.learning_rate)
            if lo.train_text_encoder else "0"
        ),
        "ss_optimizer": _OPTIMIZER_NAMES[t.optimizer],
        "ss_lr_scheduler": t.lr_scheduler,
        "ss_lr_warmup_steps": str(t.lr_warmup_steps),
        "ss_max_train_steps": str(t.max_train_steps),
        "ss_steps": str(info.steps),
        "ss_epoch": str(info.epoch),
        "ss_num_train_images": str(info.num_train_images),
        "ss_batch_size_per_device": str(t.batch_size),
        "ss_gradient_accumulation_steps": str(t.gradient_accumulation_steps),
        "ss_mixed_precision": t.mixed_precision,
        "ss_seed": str(t.seed),
        "ss_training_started_at": str(info.training_started_at),
        "ss_training_finished_at": str(info.training_finished_at),
        "ss_output_name": t.output_name,
        "ss_tag_frequency": json.dumps(
            {_basename(str(k)): dict(v) for k, v in info.tag_frequency.items()}
        ),
        "ss_dataset_dirs": json.dumps(
            {_basename(str(k)): dict(v) for k, v in info.dataset_dirs.items()}
        ),
        "ss_num_reg_images": str(info.num_reg_images),
        "ss_reg_dataset_dirs": json.dumps(
            {_basename(str(k)): dict(v) for k, v in info.reg_dataset_dirs.items()}
        ),
        "ss_prior_loss_weight": str(t.prior_loss_weight),
        "ss_noise_offset": str(t.noise_offset),
        "ss_min_snr_gamma": str(t.min_snr_gamma),
        "ss_zero_terminal_snr": str(t.zero_terminal_snr),
        "ss_multires_noise_iterations": str(t.multires_noise_iterations),
        "ss_multires_noise_discount": str(t.multires_noise_discount),
        "ss_ip_noise_gamma": str(t.ip_noise_gamma),
        "ss_debiased_estimation": str(t.debiased_estimation),
        "ss_loss_type": t.loss_type,
        "ss_huber_schedule": t.huber_schedule,
        "ss_huber_c": str(t.huber_c),
        # kohya records the timestep sampling only for its newer models (anima_train_network.py) and the range not
        # at all; the same kind of keys, "None" for the schedule's end as kohya writes an unset value.
        "ss_timestep_sampling": t.timestep_sampling,
        "ss_logit_mean": str(t.logit_mean),
        "ss_logit_std": str(t.logit_std),
        "ss_mode_scale": str(t.mode_scale),
        "ss_min_timestep": str(t.min_timestep),
        "ss_max_timestep": str(t.max_timestep),
        "ss_ema_decay": str(t.ema_decay),
        "ss_clip_skip": str(info.clip_skip),  # "None" when unset, as kohya writes it
        "ss_max_token_length": str(d.max_token_length),
        "ss_caption_dropout_rate": str(d.caption_dropout),
        "ss_caption_tag_dropout_rate": str(d.tag_dropout),
        "ss_keep_tokens": str(d.keep_tokens),
        "ss_shuffle_caption": str(d.shuffle_caption),
        "ss_flip_aug": str(d.flip_aug),
        "ss_enable_bucket": str(d.enable_bucket),
        "ss_max_grad_norm": str(t.max_grad_norm),
        **arch_metadata(arch, v_pred),
        "modelspec.title": ex.title or t.output_name,
        "modelspec.resolution": f"{side}x{side}",
        "modelspec.date": str(date),
    }
    for key, value in (("description", ex.description), ("author", ex.author), ("trigger_phrase", ex.trigger_phrase)):
        if value:
            meta[f"modelspec.{key}"] = value
    if info.clip_skip is not None:
        meta["modelspec.encoder_layer"] = str(info.clip_skip)
    for key, value in info.extra.items():
        if key in meta:
            raise ValueError(f"build_metadata: extra key {key!r} would replace a computed value")
        if not isinstance(value, str):
            raise ValueError(f"build_metadata: extra value for {key!r} must be a str, got {type(value).__name__}")
        if _is_absolute_path(value):
            raise ValueError(f"build_metadata: extra value for {key!r} is an absolute path; keep paths out of files")
        meta[key] = value
    return meta


def arch_metadata(arch: str, v_pred: bool = False) -> dict[str, str]:
    """The metadata keys of a LoRA that name its base model family: `ss_base_model_version`, `ss_v2` and
    Stability's `modelspec.*` (spec version, architecture, implementation, prediction type).

    `detect_arch` reads these back, and they are the only clue for models of non-standard (tiny) widths.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    # ss_base_model_version as kohya writes it (A1111 only checks its "sdxl_" prefix, and ss_v2 == "True" for SD2).
    if arch == "sdxl":
        base_version = "sdxl_base_v1-0"
    elif arch == "sd2":
        base_version = "sd_v2_768_v" if v_pred else "sd_v2"
    else:
        base_version = "sd_v1"
    return {
        "ss_base_model_version": base_version,
        "ss_v2": str(arch == "sd2"),  # A1111 compares with "True"
        # Stability's ModelSpec 1.0.1, with kohya's values (sai_model_spec.py): SDXL LoRAs name the SGM
        # implementation, SD1.x/2.x LoRAs "diffusers"; prediction type "epsilon" or "v".
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{modelspec_architecture(arch, v_pred)}/lora",
        "modelspec.implementation": (
            "https://github.com/Stability-AI/generative-models" if arch == "sdxl" else "diffusers"
        ),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
    }


def metadata_number(x: float) -> str:
    """A number as kohya's metadata spells it: "16" for a whole number, else Python's shortest exact form."""
    return str(int(x)) if float(x).is_integer() else str(x)


def _basename(path: str) -> str:
    # PureWindowsPath splits on both / and \, so Windows paths are stripped on Linux too.
    return PureWindowsPath(path.rstrip("/\\")).name or path


def _is_absolute_path(value: str) -> bool:
    return value.startswith(("/", "\\", "~")) or re.match(r"[A-Za-z]:[\\/]", value) is not None


# --------------------------------------------------------------------------------------------------------------
# Hashes and writers
# --------------------------------------------------------------------------------------------------------------

def save_kohya_lora(
    layers: Mapping[str, Mapping[str, LoraWeights | LycorisWeights]],
    arch: str,
    path: str | Path,
    metadata: Mapping[str, str],
    dtype: torch.dtype = torch.float16,
    unet_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write a kohya-format `.safetensors` LoRA (atomically) with `metadata` plus its `sshs_*` hashes.

    Args:
        layers: {component: {module path: LoraWeights}}, see `to_kohya_state_dict`.
        arch: "sd1", "sd2" or "sdxl".
        path: output file.
        metadata: {key: str}, usually from `build_metadata`; `sshs_model_hash`/`sshs_legacy_hash` are replaced.
        dtype: dtype of the down/up tensors.
        unet_config: the UNet's config, for SDXL's LDM block numbering (see `to_kohya_state_dict`).

    Returns:
        The path written.

    Raises:
        ValueError: see `to_kohya_state_dict`; or a metadata value that is not a str.
    """
    return save_kohya_state_dict(to_kohya_state_dict(layers, arch, dtype, unet_config), path, metadata)


def save_kohya_state_dict(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str]) -> Path:
    """Write ready kohya tensors (e.g. from `to_kohya_state_dict`) atomically with `metadata` plus `sshs_*` hashes.

    Raises:
        ValueError: a metadata value that is not a str.
    """
    from safetensors.torch import save as serialize

    bad = [key for key, value in metadata.items() if not isinstance(value, str)]
    if bad:
        raise ValueError(f"metadata values must be str (safetensors stores strings): {', '.join(bad)}")
    tensors = dict(tensors)
    # Both hashes go into the header, which shifts the bytes the legacy hash reads. Hash values have a fixed length,
    # so serialise once with same-length placeholders: the final file has the same header length, hence the
    # same payload and the same bytes at 0x100000 (unless the header itself reaches 1 MiB, see below).
    meta = {**metadata, "sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}
    data = serialize(tensors, metadata=meta)
    header_end = 8 + int.from_bytes(data[:8], "little")
    meta.update(bytes_hashes(data))
    legacy_hash = header_end <= 0x100000
    if not legacy_hash:
        # The window would cover the header, which contains the hash itself: no consistent value exists.
        del meta["sshs_legacy_hash"]
        logger.warning("metadata header is over 1 MiB; sshs_legacy_hash left out")
    del data
    path = Path(path)
    save_safetensors(tensors, path, meta)
    if legacy_hash:
        with open(path, "rb") as f:
            if 8 + int.from_bytes(f.read(8), "little") != header_end:
                raise RuntimeError(f"{path}: safetensors wrote a header of another length; sshs_legacy_hash is wrong")
    return path


def to_peft_state_dict(
    layers: Mapping[str, Mapping[str, LoraWeights | LycorisWeights]], dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """LoRA layers in diffusers' format: `<component>.<module path>.lora_A.weight` / `lora_B.weight`.

    The format has no per-module alpha (diffusers then uses alpha = rank, scale 1), so alpha / rank is folded
    into lora_B: the delta B @ A is unchanged.

    Raises:
        ValueError: a LoHa / LoKr module, which the format cannot hold (the config refuses export.formats "peft"
            for them).
    """
    out = {}
    for component, modules in layers.items():
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
        for path, weights in modules.items():
            if isinstance(weights, LycorisWeights):
                raise ValueError(f"{component} {path}: diffusers' LoRA format has no {weights.algo} modules")
            if component != "unet":
                # The diffusers-made files (transformers 4) have text_model.; diffusers strips it when needed.
                path = text_encoder_path(path)
            scale = weights.alpha / weights.rank
            out[f"{component}.{path}.lora_A.weight"] = weights.down.detach().to("cpu", dtype).contiguous()
            up = weights.up.detach().float() * scale
            out[f"{component}.{path}.lora_B.weight"] = up.to("cpu", dtype).contiguous()
            if weights.magnitude is not None:  # peft's layout: [out] for Linear, [1, out, 1, 1] for Conv2d
                shape = (1, -1, 1, 1) if weights.down.dim() == 4 else (-1,)
                # With ".weight", the parameter's own name: diffusers 0.42 loads text-encoder adapters through
                # transformers, which skips peft's renaming of the bare `lora_magnitude_vector` key (the UNet
                # takes either).
                out[f"{component}.{path}.lora_magnitude_vector.weight"] = (
                    weights.magnitude.detach().to("cpu", dtype).reshape(shape).contiguous())
    return out


def save_peft_lora(
    layers: Mapping[str, Mapping[str, LoraWeights | LycorisWeights]], path_dir: str | Path,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write `<path_dir>/pytorch_lora_weights.safetensors` in diffusers' format (`pipe.load_lora_weights(dir)`).

    Args:
        layers: {component: {module path: LoraWeights}}.
        path_dir: output folder (created if missing).
        dtype: tensor dtype.

    Returns:
        The file written.
    """
    path = Path(path_dir) / PEFT_WEIGHT_NAME
    save_safetensors(to_peft_state_dict(layers, dtype), path, {"format": "pt"})
    return path
