"""`sdlora import-kohya`: a kohya sd-scripts training config (the TOML of `--config_file`, or the JSON the kohya_ss
GUI saves) and its dataset config (`--dataset_config`: `[general]`, `[[datasets]]`, `[[datasets.subsets]]`) as an
sdlora config, with a report of what maps and what does not. No library reads kohya's files, hence by hand.

Every translated value goes through `config.derive`, so the result is validated as a loaded config is.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdlora.config import Config, derive
from sdlora.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


def _number(kind: type) -> Callable[[Any], Any]:
    # The kohya_ss GUI writes many numbers as strings ("clip_skip": "1").
    return lambda v: kind(float(v)) if kind is int else kind(v)


def _flag(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("true", "1", "yes")


def _resolution(v: Any) -> int:
    if isinstance(v, (list, tuple)):
        sides = [int(s) for s in v]
    else:
        sides = [int(s) for s in str(v).strip("()[] ").split(",")]
    if len(set(sides)) != 1:
        raise ValueError(f"{v!r} is not square; sdlora buckets around one side length")
    return sides[0]


_OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "prodigy": "prodigy", "adafactor": "adafactor",
               "adamwschedulefree": "adamw_schedulefree", "schedulefree.adamwschedulefree": "adamw_schedulefree"}
_PRECISIONS = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
# The kohya_ss GUI's LoRA_type -> lora.method and lora.targets.
_GUI_LORA_TYPES = {"Standard": ("lora", "attn_mlp"), "Kohya LoCon": ("lora", "all"), "LoCon": ("lora", "all"),
                   "LyCORIS/LoCon": ("lora", "all"), "LyCORIS/LoHa": ("loha", "attn_mlp"),
                   "LyCORIS/LoKr": ("lokr", "attn_mlp")}


def _choice(table: Mapping[str, str]) -> Callable[[Any], str]:
    def convert(v: Any) -> str:
        key = str(v).strip().lower()
        if key not in table:
            raise ValueError(f"{v!r} has no sdlora counterpart (sdlora has {', '.join(sorted(set(table.values())))})")
        return table[key]
    return convert


# kohya key (sd-scripts argument or kohya_ss GUI field) -> (sdlora key, conversion). One table for both: the GUI
# saves the sd-scripts names for all that it passes on as they are.
KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "pretrained_model_name_or_path": ("model.base_model", str),
    "vae": ("model.vae", str),
    "clip_skip": ("model.clip_skip", _number(int)),
    "train_data_dir": ("data.dirs", lambda v: [str(v)]),
    "reg_data_dir": ("data.reg_dirs", lambda v: [str(v)] if v else []),
    "resolution": ("data.resolution", _resolution),
    "max_resolution": ("data.resolution", _resolution),
    "enable_bucket": ("data.enable_bucket", _flag),
    "min_bucket_reso": ("data.min_bucket_reso", _number(int)),
    "max_bucket_reso": ("data.max_bucket_reso", _number(int)),
    "bucket_reso_steps": ("data.bucket_step", _number(int)),
    "bucket_no_upscale": ("data.max_upscale", lambda v: 1.0 if _flag(v) else 2.0),
    "caption_extension": ("data.caption_extensions", lambda v: [str(v)]),
    "shuffle_caption": ("data.shuffle_caption", _flag),
    "keep_tokens": ("data.keep_tokens", _number(int)),
    "caption_dropout_rate": ("data.caption_dropout", _number(float)),
    "caption_tag_dropout_rate": ("data.tag_dropout", _number(float)),
    "caption_prefix": ("data.caption_prefix", str),
    "flip_aug": ("data.flip_aug", _flag),
    "random_crop": ("data.random_crop", _flag),
    "cache_text_encoder_outputs": ("data.cache_text_encoder_outputs", _flag),
    "max_token_length": ("data.max_token_length", _number(int)),
    "network_dim": ("lora.rank", _number(int)),
    "network_alpha": ("lora.alpha", _number(float)),
    "network_dropout": ("lora.dropout", _number(float)),
    "network_train_unet_only": ("lora.train_text_encoder", lambda v: not _flag(v)),
    "network_train_text_encoder_only": ("lora.train_unet", lambda v: not _flag(v)),
    "output_dir": ("train.output_dir", str),
    "output_name": ("train.output_name", str),
    "seed": ("train.seed", _number(int)),
    "max_train_steps": ("train.max_train_steps", _number(int)),
    "train_batch_size": ("train.batch_size", _number(int)),
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps", _number(int)),
    "learning_rate": ("train.learning_rate", _number(float)),
    "unet_lr": ("train.unet_lr", _number(float)),
    "text_encoder_lr": ("train.text_encoder_lr", _number(float)),
    "optimizer_type": ("train.optimizer", _choice(_OPTIMIZERS)),
    "optimizer": ("train.optimizer", _choice(_OPTIMIZERS)),
    "lr_scheduler": ("train.lr_scheduler", str),
    "lr_warmup_steps": ("train.lr_warmup_steps", _number(int)),
    "lr_scheduler_num_cycles": ("train.lr_scheduler_num_cycles", _number(int)),
    "lr_scheduler_power": ("train.lr_scheduler_power", _number(float)),
    "mixed_precision": ("train.mixed_precision", str),
    "gradient_checkpointing": ("train.gradient_checkpointing", _flag),
    "max_grad_norm": ("train.max_grad_norm", _number(float)),
    "noise_offset": ("train.noise_offset", _number(float)),
    "min_snr_gamma": ("train.min_snr_gamma", _number(float)),
    "zero_terminal_snr": ("train.zero_terminal_snr", _flag),
    "prior_loss_weight": ("train.prior_loss_weight", _number(float)),
    "min_timestep": ("train.min_timestep", _number(int)),
    "max_timestep": ("train.max_timestep", _number(int)),
    "loss_type": ("train.loss_type", str),
    "huber_c": ("train.huber_c", _number(float)),
    "huber_schedule": ("train.huber_schedule", str),
    "debiased_estimation_loss": ("train.debiased_estimation", _flag),
    "ip_noise_gamma": ("train.ip_noise_gamma", _number(float)),
    "multires_noise_iterations": ("train.multires_noise_iterations", _number(int)),
    "multires_noise_discount": ("train.multires_noise_discount", _number(float)),
    "masked_loss": ("train.masked_loss", _flag),
    "save_every_n_steps": ("train.save_every_n_steps", _number(int)),
    "save_every_n_epochs": ("train.save_every_n_epochs", _number(int)),
    "save_precision": ("export.dtype", _choice(_PRECISIONS)),
    "sample_every_n_steps": ("sample.every_n_steps", _number(int)),
    "sample_every_n_epochs": ("sample.every_n_epochs", _number(int)),
}
# Subset and dataset options of a dataset config that sdlora has one value of for the whole run.
_DATASET_KEYS = ("resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                 "bucket_no_upscale", "caption_extension", "shuffle_caption", "keep_tokens", "caption_dropout_rate",
                 "caption_tag_dropout_rate", "caption_prefix", "flip_aug", "random_crop", "batch_size")
# Keys that mean nothing for a LoRA run or that other keys already carry: not reported as lost.
_IGNORED = {"network_module", "network_args", "LoRA_type", "image_dir", "num_repeats", "is_reg",
            "class_tokens", "logging_dir", "log_with", "save_model_as", "sdxl", "v2", "v_parameterization",
            "datasets", "general", "subsets", "max_train_epochs", "epoch"}


@dataclass
class Translation:
    """The sdlora config made from kohya's files, and what happened to each kohya key."""

    config: Config
    mapped: list[str] = field(default_factory=list)  # "kohya_key = value -> table.key = value"
    unmapped: list[str] = field(default_factory=list)  # "kohya_key = value: why"

    def report(self) -> str:
        lines = [f"mapped ({len(self.mapped)}):"] + [f"  {m}" for m in self.mapped]
        lines += [f"not mapped ({len(self.unmapped)}):"] + [f"  {u}" for u in self.unmapped or ["(none)"]]
        return "\n".join(lines)


def read_kohya_file(path: str | Path) -> dict[str, Any]:
    """A kohya TOML or JSON file as a dict.

    Raises:
        ConfigError: the file is missing or is neither.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except ValueError as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'} ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings")
    return data


def translate(training: Mapping[str, Any], dataset: Mapping[str, Any] | None = None) -> Translation:
    """sdlora's config for kohya's training settings (`--config_file` TOML or kohya_ss GUI JSON) and dataset config.

    Raises:
        ConfigError: the values that map do not make a valid sdlora config (the message names the sdlora key).
    """
    settings = dict(_flatten(training))
    unmapped: list[str] = []
    changes: dict[str, Any] = {}
    mapped: list[str] = []
    if dataset is not None:  # kohya reads the folders from it then, not from train_data_dir / reg_data_dir
        settings = {k: v for k, v in settings.items() if k not in ("train_data_dir", "reg_data_dir")}
        settings.update(_dataset_settings(dataset, changes, mapped, unmapped))
    for key, value in settings.items():
        if key in KEYS and value not in ("", None):
            target, convert = KEYS[key]
            try:
                changes[target] = convert(value)
            except (TypeError, ValueError) as e:
                unmapped.append(f"{key} = {value!r}: {e}")
                continue
            mapped.append(f"{key} = {value!r} -> {target} = {changes[target]!r}")
        elif key not in KEYS and key not in _IGNORED and value not in ("", None, False, 0, 0.0):
            unmapped.append(f"{key} = {value!r}: sdlora has no such setting")
    changes.update(_network(settings, mapped, unmapped))
    epochs = settings.get("max_train_epochs") or settings.get("epoch")
    if epochs:  # kohya then trains that many epochs, whatever max_train_steps says
        unmapped.append(f"max_train_epochs / epoch = {epochs!r}: sdlora counts train.max_train_steps; set it to "
                        "epochs x images x repeats / batch size")
    if _flag(settings.get("cache_latents_to_disk", False)):
        changes["data.cache_latents"] = "disk"
    elif "cache_latents" in settings:
        changes["data.cache_latents"] = "memory" if _flag(settings["cache_latents"]) else "none"
    if _flag(settings.get("v_parameterization", False)):
        changes["model.prediction_type"] = "v_prediction"
    try:
        config = derive(Config(), changes)
    except ConfigError as e:
        raise ConfigError(f"the kohya settings do not make a valid sdlora config: {e}") from None
    return Translation(config, mapped, unmapped)


def _flatten(training: Mapping[str, Any]) -> dict[str, Any]:
    """sd-scripts' `--config_file` TOML groups its arguments in tables of any name; the GUI's JSON is flat."""
    flat: dict[str, Any] = {}
    for key, value in training.items():
        if isinstance(value, dict):
            flat.update(_flatten(value))
        else:
            flat[key] = value
    return flat


def _network(settings: Mapping[str, Any], mapped: list[str], unmapped: list[str]) -> dict[str, Any]:
    """lora.method and lora.targets from network_module / network_args (sd-scripts) or LoRA_type (the GUI)."""
    if "LoRA_type" in settings:
        kind = settings["LoRA_type"]
        if kind not in _GUI_LORA_TYPES:
            unmapped.append(f"LoRA_type = {kind!r}: sdlora trains {', '.join(_GUI_LORA_TYPES)}")
            return {}
        method, targets = _GUI_LORA_TYPES[kind]
    else:
        module = str(settings.get("network_module", "networks.lora"))
        args = dict(str(a).split("=", 1) for a in settings.get("network_args", []) or [] if "=" in str(a))
        algo = args.get("algo", "lora").strip()
        if module not in ("networks.lora", "lycoris.kohya") or algo not in ("lora", "locon", "loha", "lokr"):
            unmapped.append(f"network_module = {module!r} (algo {algo!r}): sdlora trains LoRA, LoHa and LoKr")
            return {}
        method = {"locon": "lora"}.get(algo, algo)
        targets = "all" if "conv_dim" in args or algo == "locon" else "attn_mlp"
    mapped.append(f"network = {method} on {targets} -> lora.method = {method!r}, lora.targets = {targets!r}")
    return {"lora.method": method, "lora.targets": targets}


def _dataset_settings(dataset: Mapping[str, Any], changes: dict[str, Any], mapped: list[str],
                      unmapped: list[str]) -> dict[str, Any]:
    """The dataset config: its image and reg folders and repeats into `changes`, and as flat kohya settings each
    option that has one value for every subset (the subset's, else its dataset's, else [general]'s, as kohya
    resolves them)."""
    general = dataset.get("general", {})
    datasets = dataset.get("datasets", [])
    if len(datasets) > 1:
        unmapped.append(f"datasets: {len(datasets)} datasets; sdlora trains one, so their subsets are joined")
    values: dict[str, set] = {}
    dirs: list[str] = []
    reg_dirs: list[str] = []
    repeats: set[int] = set()
    for ds in datasets:
        for subset in ds.get("subsets", []):
            resolved = {**general, **{k: v for k, v in ds.items() if k != "subsets"}, **subset}
            (reg_dirs if _flag(resolved.get("is_reg", False)) else dirs).append(str(subset.get("image_dir", "")))
            repeats.add(int(resolved.get("num_repeats", 1)))
            if resolved.get("class_tokens") and not subset.get("caption_extension"):
                unmapped.append(f"class_tokens = {resolved['class_tokens']!r}: the caption of images without a "
                                f"caption file; name the folder <repeats>_{resolved['class_tokens']} instead")
            for key in _DATASET_KEYS:
                if key in resolved:
                    values.setdefault(key, set()).add(json.dumps(resolved[key]))
    settings: dict[str, Any] = {}
    for key, folders in (("data.dirs", dirs), ("data.reg_dirs", reg_dirs)):
        if folders:
            changes[key] = folders
            mapped.append(f"subsets' image_dir -> {key} = {folders!r}")
    for key, seen in values.items():
        if len(seen) == 1:
            settings["train_batch_size" if key == "batch_size" else key] = json.loads(next(iter(seen)))
        else:
            unmapped.append(f"{key}: differs between subsets ({', '.join(sorted(seen))}); sdlora has one value")
    if len(repeats) > 1:
        unmapped.append(f"num_repeats: differs between subsets ({sorted(repeats)}); name each folder "
                        "<repeats>_<name> (kohya's folder convention), which sdlora reads")
    elif repeats:
        changes["data.repeats"] = repeats.pop()
        mapped.append(f"num_repeats -> data.repeats = {changes['data.repeats']}")
    return settings
