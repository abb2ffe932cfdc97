"""`sdlora import-kohya`: a kohya sd-scripts training config (the TOML of `--config_file`, or the JSON the kohya_ss
GUI saves) and its dataset config (`--dataset_config`: `[general]`, `[[datasets]]`, `[[datasets.subsets]]`) as an
sdlora config, with a report of what maps and what does not. No library reads kohya's files, hence by hand.

Every translated value goes through `config.derive`, so the result is validated as a loaded config is.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sdlora.config import Config, SubsetConfig, derive
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
    "caption_suffix": ("data.caption_suffix", str),
    "num_repeats": ("data.repeats", _number(int)),
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
    "log_with": ("train.log_with", str),
    "log_tracker_name": ("train.wandb_project", str),
    "wandb_run_name": ("train.wandb_run_name", str),
}
def _numbers(kind: type) -> Callable[[Any], list]:
    # network_args values are strings: "2,4,4,8".
    return lambda v: [kind(float(x)) if kind is int else kind(x) for x in str(v).split(",") if x.strip()]


def _lr_weight(v: Any) -> list[float] | str:
    """down_lr_weight / up_lr_weight: numbers, or a preset name as kohya's ("sine", "cosine+0.5")."""
    text = str(v).strip()
    return text if text[:1].isalpha() else _numbers(float)(text)


# sd-scripts' network_args (networks.lora, lycoris.kohya) -> (sdlora key, conversion from the "key=value" string).
NETWORK_ARGS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "block_dims": ("lora.block_dims", _numbers(int)),
    "block_alphas": ("lora.block_alphas", _numbers(float)),
    "conv_block_dims": ("lora.conv_block_dims", _numbers(int)),
    "conv_block_alphas": ("lora.conv_block_alphas", _numbers(float)),
    "down_lr_weight": ("lora.down_lr_weight", _lr_weight),
    "mid_lr_weight": ("lora.mid_lr_weight", _numbers(float)),
    "up_lr_weight": ("lora.up_lr_weight", _lr_weight),
    "block_lr_zero_threshold": ("lora.block_lr_zero_threshold", _number(float)),
    "rank_dropout": ("lora.rank_dropout", _number(float)),
    "module_dropout": ("lora.module_dropout", _number(float)),
    "factor": ("lora.decompose_factor", _number(int)),
    "use_tucker": ("lora.effective_conv", _flag),
}
# network_args that the keys above or lora.targets already carry: not reported as lost.
_NETWORK_ARGS_IGNORED = {"algo", "conv_dim", "conv_alpha", "preset"}
# Subset and dataset options of a dataset config: those whose sdlora key a [[data.subsets]] table has may differ
# between subsets; sdlora has one value of the others for the whole run.
_DATASET_KEYS = ("resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                 "bucket_no_upscale", "caption_extension", "shuffle_caption", "keep_tokens", "caption_dropout_rate",
                 "caption_tag_dropout_rate", "caption_prefix", "caption_suffix", "flip_aug", "random_crop",
                 "num_repeats", "batch_size")
_SUBSET_FIELDS = {f.name for f in fields(SubsetConfig)}
# Keys that mean nothing for a LoRA run or that other keys already carry: not reported as lost.
_IGNORED = {"network_module", "network_args", "LoRA_type", "image_dir", "is_reg",
            "class_tokens", "logging_dir", "save_model_as", "sdxl", "v2", "v_parameterization",
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
    api_key = settings.pop("wandb_api_key", None)  # never echoed: the report gets pasted into issues and chats
    unmapped: list[str] = []
    changes: dict[str, Any] = {}
    mapped: list[str] = []
    if dataset is not None:  # kohya reads the folders from it then, not from train_data_dir / reg_data_dir
        settings = {k: v for k, v in settings.items() if k not in ("train_data_dir", "reg_data_dir")}
        settings.update(_dataset_settings(dataset, changes, mapped, unmapped))
    for key, value in settings.items():
        if key in KEYS and value not in ("", None):
            _map(KEYS[key], value, f"{key} = {value!r}", changes, mapped, unmapped)
        elif key not in KEYS and key not in _IGNORED and value not in ("", None, False, 0, 0.0):
            unmapped.append(f"{key} = {value!r}: sdlora has no such setting")
    changes.update(_network(settings, mapped, unmapped))
    if api_key:
        unmapped.append("wandb_api_key: not carried over, a key in a config file travels with it; log in once with "
                        "`wandb login` or set WANDB_API_KEY")
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


def _map(entry: tuple[str, Callable[[Any], Any]], value: Any, label: str, changes: dict[str, Any],
         mapped: list[str], unmapped: list[str]) -> None:
    """One kohya setting (`label` in the report) through its (sdlora key, conversion) into `changes`."""
    target, convert = entry
    try:
        changes[target] = convert(value)
    except (TypeError, ValueError) as e:
        unmapped.append(f"{label}: {e}")
        return
    mapped.append(f"{label} -> {target} = {changes[target]!r}")


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
    """lora.method and lora.targets from network_module / network_args (sd-scripts) or LoRA_type (the GUI), and
    the other network_args (NETWORK_ARGS: per-block settings, dropouts, LyCORIS' factor and Tucker cores)."""
    args = {key.strip(): value.strip() for key, sep, value in
            (str(a).partition("=") for a in settings.get("network_args") or []) if sep}
    changes: dict[str, Any] = {}
    for key, value in args.items():
        if key in NETWORK_ARGS:
            _map(NETWORK_ARGS[key], value, f"network_args {key}={value}", changes, mapped, unmapped)
        elif key not in _NETWORK_ARGS_IGNORED:
            unmapped.append(f"network_args {key}={value}: sdlora has no such setting")
    if "LoRA_type" in settings:
        kind = settings["LoRA_type"]
        if kind not in _GUI_LORA_TYPES:
            unmapped.append(f"LoRA_type = {kind!r}: sdlora trains {', '.join(_GUI_LORA_TYPES)}")
            return changes
        method, targets = _GUI_LORA_TYPES[kind]
    else:
        module = str(settings.get("network_module", "networks.lora"))
        algo = args.get("algo", "lora")
        if module not in ("networks.lora", "lycoris.kohya") or algo not in ("lora", "locon", "loha", "lokr"):
            unmapped.append(f"network_module = {module!r} (algo {algo!r}): sdlora trains LoRA, LoHa and LoKr")
            return changes
        method = {"locon": "lora"}.get(algo, algo)
        targets = "all" if "conv_dim" in args or algo == "locon" else "attn_mlp"
    mapped.append(f"network = {method} on {targets} -> lora.method = {method!r}, lora.targets = {targets!r}")
    for key in ("lora.rank_dropout", "lora.module_dropout"):
        if method not in ("loha", "lokr") and key in changes:
            unmapped.append(f"{key} = {changes.pop(key)!r}: peft's LoRA layers have no rank or module dropout "
                            "(LoHa and LoKr have); lora.dropout drops a LoRA's inputs")
    return {**changes, "lora.method": method, "lora.targets": targets}


def _dataset_settings(dataset: Mapping[str, Any], changes: dict[str, Any], mapped: list[str],
                      unmapped: list[str]) -> dict[str, Any]:
    """The dataset config, each subset's options resolved (the subset's, else its dataset's, else [general]'s, as
    kohya resolves them). An option with one value for every subset is returned as a flat kohya setting; when some
    differ, each subset becomes a [[data.subsets]] table (into `changes`) holding its own values of those, else the
    image folders become data.dirs and data.reg_dirs."""
    general = dataset.get("general", {})
    resolved = []
    for ds in dataset.get("datasets", []):
        for subset in ds.get("subsets", []):
            options = {**general, **{k: v for k, v in ds.items() if k != "subsets"}, **subset}
            resolved.append(options)
            if options.get("class_tokens") and not subset.get("caption_extension"):
                unmapped.append(f"class_tokens = {options['class_tokens']!r}: the caption of images without a "
                                f"caption file; name the folder <repeats>_{options['class_tokens']} instead")
            if subset.get("metadata_file"):
                unmapped.append(f"metadata_file = {subset['metadata_file']!r}: kohya's fine-tuning captions; sdlora "
                                "reads caption files or a metadata.jsonl beside the images")
    settings: dict[str, Any] = {}
    differing = []
    for key in _DATASET_KEYS:
        seen = {json.dumps(options.get(key)) for options in resolved if key in options}
        if len(seen) == 1 and all(key in options for options in resolved):
            settings["train_batch_size" if key == "batch_size" else key] = json.loads(seen.pop())
        elif seen and KEYS.get(key, ("",))[0].removeprefix("data.") in _SUBSET_FIELDS:
            differing.append(key)
        elif seen:
            unset = [] if all(key in options for options in resolved) else ["unset"]
            unmapped.append(f"{key}: differs between datasets ({', '.join(sorted(seen) + unset)}); sdlora has one "
                            "value")
    if differing:
        subsets = [_subset(options, differing, i, mapped, unmapped) for i, options in enumerate(resolved)]
        changes.update({"data.dirs": [], "data.reg_dirs": [], "data.subsets": subsets})
        if "resolution" in differing:  # data.resolution must still lie in the bucket range: the subsets' largest
            settings["resolution"] = max((s.resolution for s in subsets if isinstance(s.resolution, int)),
                                         default=512)
        return settings
    for key, reg in (("data.dirs", False), ("data.reg_dirs", True)):
        folders = [str(options.get("image_dir", "")) for options in resolved
                   if _flag(options.get("is_reg", False)) == reg]
        if folders:
            changes[key] = folders
            mapped.append(f"subsets' image_dir -> {key} = {folders!r}")
    return settings


def _subset(options: Mapping[str, Any], keys: list[str], index: int, mapped: list[str],
            unmapped: list[str]) -> SubsetConfig:
    """One kohya subset as a [[data.subsets]] table with its own values of `keys` (the options that differ)."""
    own: dict[str, Any] = {}
    is_reg = _flag(options.get("is_reg", False))
    for key in keys:
        if key not in options:
            continue  # the data.* default, as kohya's default
        target, convert = KEYS[key]
        name = target.removeprefix("data.")
        try:
            value = convert(options[key])
        except (TypeError, ValueError) as e:
            unmapped.append(f"data.subsets[{index}] {key} = {options[key]!r}: {e}")
            continue
        if is_reg and name == "caption_prefix":
            unmapped.append(f"data.subsets[{index}] caption_prefix = {value!r}: sdlora gives regularization images "
                            "no prefix (it is the trigger word)")
            continue
        own[name] = value
    subset = SubsetConfig(dir=str(options.get("image_dir", "")), is_reg=is_reg, **own)
    detail = "".join(f", {name} = {value!r}" for name, value in own.items())
    mapped.append(f"subset image_dir = {subset.dir!r}{' (is_reg)' if is_reg else ''} -> data.subsets[{index}]{detail}")
    return subset
