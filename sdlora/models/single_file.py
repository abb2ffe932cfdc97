"""Single-file checkpoints in the original LDM/SAI layout (A1111, ComfyUI, civitai): detect, load offline, write.

Reading converts the tensors with diffusers' own helpers (`diffusers.loaders.single_file_utils`) and builds the
models from configs, never from the hub: the configs `save_single_file` embeds in the file's metadata
(`sdlora.configs`), else the real-size configs shipped in `sdlora/model_configs/{sd15,sd2,sdxl}/`. Writing is the
reverse rename, as rule tables generated from the model's config.
"""

from __future__ import annotations

import json
import logging
import re
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping, cast

import torch

from sdlora.atomic import save_safetensors
from sdlora.errors import ModelError
from sdlora.models.arch import ARCH_NAMES, SHIPPED_CONFIGS, component_names, modelspec_architecture
from sdlora.models.clip_tokenizer import load_clip_tokenizer
from sdlora.models.ldm_names import openclip_table, rename, unet_layout_from_config, unet_table, vae_table
from sdlora.models.meta import empty_model

logger = logging.getLogger(__name__)

CONFIG_METADATA_KEY = "sdlora.configs"  # JSON {"arch", "unet", "vae", "text_encoder"[, "text_encoder_2"], "scheduler"}
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
VAE_SUBKEYS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

# Where each text encoder (in `arch.component_names` order) lives in the file and in which key layout: "clip" is
# transformers' CLIPTextModel under the prefix (OpenAI CLIP-L); "openclip" is open_clip's `transformer.resblocks.N`
# with fused q/k/v (ViT-H, bigG).
TEXT_ENCODERS = {
    "sd1": [("cond_stage_model.transformer.", "clip")],
    "sd2": [("cond_stage_model.model.", "openclip")],
    "sdxl": [("conditioner.embedders.0.transformer.", "clip"), ("conditioner.embedders.1.model.", "openclip")],
}
# torch.save / pickle files: loading one can run code, so they are refused unless the user allows them.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

# Files that are not SD base models, recognised by a key they always have: (regex matched at a key's start, what).
_NOT_A_BASE_MODEL = [
    (r"lora_(unet|te\d?)_", "a LoRA (lora_unet_/lora_te_ keys)"),
    (r".*\.(lora_down|lora_up|lora_A|lora_B)\.", "a LoRA (lora_A/lora_down keys)"),
    (r"(model\.diffusion_model\.)?(joint_blocks|double_blocks)\.", "an SD3/Flux-family transformer"),
    (r"conditioner\.embedders\.0\.model\.", "an SDXL refiner (not supported)"),
    (r"(down_blocks|mid_block)\.", "a diffusers UNet alone (down_blocks.* keys); pass its model folder"),
    (r"(encoder\.down|decoder\.up)", "a VAE alone; pass it as model.vae"),
    (r"(text_model|transformer\.resblocks)\.", "a text encoder alone"),
]


def _looks_like(keys) -> str | None:
    for pattern, what in _NOT_A_BASE_MODEL:
        if any(re.match(pattern, k) for k in keys):
            return what
    return None


# --- detection ---------------------------------------------------------------------------------------------------


def describe_tensors(tensors: Mapping[str, object]) -> str:
    """What a file of these tensors looks like, for one-line messages: "an SDXL base model (single file)", "a VAE
    alone; pass it as model.vae", or its number of tensors and first keys.

    Args:
        tensors: key -> tensor or shape, as for `detect_checkpoint`.
    """
    try:
        return f"an {ARCH_NAMES[detect_checkpoint(tensors)]} base model (single file)"
    except ModelError:
        pass
    shapes = list(tensors)
    return _looks_like(shapes) or (f"{len(shapes)} tensors of no known kind "
                                   f"(first keys: {', '.join(sorted(shapes)[:3])})")


def detect_checkpoint(tensors: Mapping[str, object], name: str = "checkpoint") -> str:
    """The architecture of an LDM single file from its keys and shapes: 'sd1', 'sd2' or 'sdxl'.

    SDXL has `conditioner.embedders.*` (or a `label_emb` with 2048-dim cross-attention); SD 2.x has the OpenCLIP
    text encoder (`cond_stage_model.model.*`) or 1024-dim cross-attention; SD 1.x has OpenAI CLIP
    (`cond_stage_model.transformer.*`) or 768-dim cross-attention.

    Args:
        tensors: key -> tensor or shape (anything with `.shape`, or a tuple); no tensor data is read.
        name: how the file is named in error messages.

    Raises:
        ModelError: one line naming what the file looks like instead (a LoRA, a VAE alone, random tensors, ...).
    """
    shapes = {k: tuple(cast(Iterable[int], getattr(v, "shape", v))) for k, v in tensors.items()}
    if not shapes:
        raise ModelError(f"{name}: holds no tensors")
    what = _looks_like(shapes)
    if what:
        raise ModelError(f"{name}: looks like {what}, not a Stable Diffusion base model")
    if not any(k.startswith(UNET_PREFIX + "input_blocks.") for k in shapes):
        first = ", ".join(sorted(shapes)[:3])
        raise ModelError(f"{name}: not a Stable Diffusion checkpoint: {len(shapes)} tensors, no "
                         f"{UNET_PREFIX}input_blocks.* UNet keys (first keys: {first})")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight", ())
    if len(conv_in) == 4 and conv_in[1] != 4:
        raise ModelError(f"{name}: UNet takes {conv_in[1]} input channels (inpainting / instruct-pix2pix); "
                         "only 4-channel text-to-image base models are supported")
    context = {s[1] for k, s in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")}
    context_dim = max(context) if context else None

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in shapes)

    has_label_emb = UNET_PREFIX + "label_emb.0.0.weight" in shapes
    if has("conditioner.embedders.") or (has_label_emb and context_dim == 2048):
        return "sdxl"
    if has_label_emb:
        raise ModelError(f"{name}: class-conditioned UNet (label_emb) without SDXL's conditioner: unCLIP and "
                         "upscaler checkpoints are not supported")
    if has("cond_stage_model.model.") or (context_dim == 1024 and not has("cond_stage_model.")):
        return "sd2"
    if has("cond_stage_model.transformer.") or context_dim == 768:
        return "sd1"
    raise ModelError(f"{name}: cannot tell SD 1.x from 2.x: no cond_stage_model.* text-encoder keys and "
                     f"cross-attention dim {context_dim}")


def read_header(path: str | Path, allow_unsafe_pickle: bool = False) -> tuple[dict[str, tuple], dict[str, str]]:
    """(key -> shape, metadata) of a single file; reads no tensor data of a .safetensors file."""
    shapes, metadata, _ = _open_checkpoint(Path(path), allow_unsafe_pickle)
    return shapes, metadata


# --- loading -------------------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, allow_unsafe_pickle: bool = False, prediction_type: str = "",
                    with_vae: bool = True) -> dict:
    """Load a single-file SD 1.x / 2.x / SDXL checkpoint on the CPU in fp32, without any network access.

    Args:
        path: `.safetensors` (or a pickle `.ckpt/.pt/.pth/.bin` with `allow_unsafe_pickle`).
        allow_unsafe_pickle: allow torch.load(weights_only=True) of pickle files.
        prediction_type: "" (the file's metadata, else the architecture's default) or "epsilon" / "v_prediction".
        with_vae: build the file's VAE (False when model.vae replaces it; the file may then lack one).

    Returns:
        dict with arch, unet, vae (None without `with_vae`), vae_config, text_encoders, tokenizers,
        scheduler_config, metadata.

    Raises:
        ModelError: pickle refused, unreadable file, not a base model, or tensors that do not fit the configs.
    """
    path = Path(path)
    shapes, metadata, load = _open_checkpoint(path, allow_unsafe_pickle)
    arch = detect_checkpoint(shapes, str(path))
    configs, source, embedded = _configs(arch, metadata)
    name = f"{path} ({ARCH_NAMES[arch]}, configs from {source})"

    unet = _load_unet(load(UNET_PREFIX), configs["unet"], name)
    vae = None
    if with_vae:
        vae_tensors = load(VAE_PREFIX)
        if not vae_tensors:
            raise ModelError(f"{path}: has no VAE ({VAE_PREFIX}* keys); pass one as model.vae")
        vae = _load_vae_state(_ldm_vae_to_diffusers(vae_tensors, configs["vae"]), configs["vae"], name)
    text_encoders = [
        _load_text_encoder(load(prefix), prefix, layout, configs[component], component == "text_encoder_2", name)
        for component, (prefix, layout) in zip(component_names(arch), TEXT_ENCODERS[arch])
    ]
    # SD 2.x (OpenCLIP) and SDXL's second tokenizer pad with "!", SD 1.x and SDXL's first with <|endoftext|>.
    pads = {"sd1": ["<|endoftext|>"], "sd2": ["!"], "sdxl": ["<|endoftext|>", "!"]}[arch]
    scheduler_config = dict(configs.get("scheduler") or shipped_configs(arch)["scheduler"])
    if prediction_type or not embedded:  # our own files carry their scheduler config, prediction type included
        scheduler_config["prediction_type"] = prediction_type or _prediction_type(arch, metadata, shapes)
    return {
        "arch": arch, "unet": unet, "vae": vae, "vae_config": configs["vae"], "text_encoders": text_encoders,
        "tokenizers": [load_clip_tokenizer(pad_token=p) for p in pads], "scheduler_config": scheduler_config,
        "metadata": metadata,
    }


def load_vae_file(path: str | Path, base_vae_config: dict, allow_unsafe_pickle: bool = False):
    """A separate VAE from one file: LDM keys (bare, `first_stage_model.` or `vae.`) or diffusers keys.

    The architecture comes from the file's embedded config when sdlora wrote it, else from the base model's VAE
    config (a replacement VAE must have the base model's shape and latent scaling anyway).

    Raises:
        ModelError: pickle refused, not a VAE, or shapes that do not fit.
    """
    from diffusers.loaders.single_file_utils import LDM_VAE_KEYS

    path = Path(path)
    shapes, metadata, load = _open_checkpoint(path, allow_unsafe_pickle)
    embedded = embedded_configs(metadata) or {}
    # The latent scaling belongs to the base model's latent space, whatever the file says.
    config = {**embedded.get("vae", base_vae_config), "scaling_factor": base_vae_config.get("scaling_factor", 0.18215)}
    name = f"{path} (VAE)"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in shapes):
        return _load_vae_state(load(""), config, name)
    for prefix in [*LDM_VAE_KEYS, ""]:
        if any(k.startswith(prefix + "encoder.down.") for k in shapes):
            return _load_vae_state(_ldm_vae_to_diffusers(load(prefix), config), config, name)
    what = _looks_like(shapes)
    if what:
        raise ModelError(f"{path}: model.vae looks like {what}, not a VAE")
    raise ModelError(f"{path}: model.vae is not a VAE: no encoder.down.* / encoder.down_blocks.* keys "
                     f"({len(shapes)} tensors, first: {', '.join(sorted(shapes)[:3])})")


def _open_checkpoint(path: Path, allow_unsafe_pickle: bool):
    """(key -> shape, metadata, load(prefix) -> {key without prefix: tensor}) for a single file."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                metadata = dict(f.metadata() or {})
        except Exception as e:  # safetensors raises its own SafetensorError for a bad header
            raise ModelError(f"{path}: not a readable .safetensors file ({e})") from None

        def load(prefix: str) -> dict[str, torch.Tensor]:
            with safe_open(str(path), framework="pt") as f:
                return {k[len(prefix):]: f.get_tensor(k) for k in shapes if k.startswith(prefix)}

        return shapes, metadata, load
    if suffix not in PICKLE_SUFFIXES:
        raise ModelError(f"{path}: unsupported file type {suffix!r}; use a .safetensors checkpoint or a diffusers "
                         "folder")
    refuse_pickle(path, allow_unsafe_pickle)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{path}: torch.load(weights_only=True) failed ({type(e).__name__}); "
                         "convert it to .safetensors with the tool that made it") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning-era .ckpt files wrap the weights
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}

    def load_pickled(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    return {k: tuple(v.shape) for k, v in tensors.items()}, {}, load_pickled


def refuse_pickle(path: Path, allow_unsafe_pickle: bool) -> None:
    """Raise ModelError for a pickle file (by its suffix) unless the user allowed them.

    Raises:
        ModelError: one line naming the file and the two ways on.
    """
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_unsafe_pickle:
        raise ModelError(f"{path}: pickle checkpoints can run arbitrary code when loaded; use a .safetensors file, "
                         "or pass --allow-unsafe-pickle (model.allow_unsafe_pickle = true) if you trust its source")


def embedded_configs(metadata: dict) -> dict | None:
    """The diffusers configs `save_single_file` embedded in a file's metadata, or None."""
    if CONFIG_METADATA_KEY not in metadata:
        return None
    try:
        return json.loads(metadata[CONFIG_METADATA_KEY])
    except json.JSONDecodeError:
        logger.warning("ignoring unreadable %s metadata", CONFIG_METADATA_KEY)
        return None


def file_configs(path: str | Path, allow_unsafe_pickle: bool = False) -> dict:
    """The diffusers configs a single-file checkpoint loads with (its own embedded ones, else the shipped ones
    of its architecture), read from the header alone.

    Raises:
        ModelError: see `read_header` and `detect_checkpoint`.
    """
    shapes, metadata = read_header(path, allow_unsafe_pickle)
    return _configs(detect_checkpoint(shapes, str(path)), metadata)[0]


def _configs(arch: str, metadata: dict) -> tuple[dict, str, dict | None]:
    """(configs, where they come from, the embedded configs or None) for a file of `arch`."""
    embedded = embedded_configs(metadata)
    if embedded and embedded.get("arch") == arch:
        return embedded, "the file's metadata", embedded
    return shipped_configs(arch), f"sdlora/model_configs/{SHIPPED_CONFIGS[arch]}", None


def shipped_configs(arch: str) -> dict:
    """The real-size diffusers configs of `arch` shipped in sdlora/model_configs/<sd15|sd2|sdxl>/."""
    folder = Path(str(resources.files("sdlora") / "model_configs" / SHIPPED_CONFIGS[arch]))
    configs = {}
    for file in sorted(folder.glob("*.json")):
        config = json.loads(file.read_text())
        configs[file.stem] = {k: v for k, v in config.items() if k == "_class_name" or not k.startswith("_")}
    return configs


def _prediction_type(arch: str, metadata: dict, shapes: dict) -> str:
    """epsilon / v_prediction from what a foreign file says; SD 2.x files that say nothing are assumed 768-v."""
    spec = metadata.get("modelspec.prediction_type", "").lower()
    if spec in ("v", "v_prediction", "v-prediction") or metadata.get("modelspec.architecture", "").endswith("-v"):
        return "v_prediction"
    if metadata.get("ss_v_parameterization", "").lower() == "true" or "v_pred" in shapes:  # kohya / ComfyUI
        return "v_prediction"
    if spec == "epsilon":
        return "epsilon"
    if arch == "sd2":
        logger.warning("SD 2.x checkpoint without a prediction type in its metadata: assuming v_prediction (768-v); "
                       "set model.prediction_type = \"epsilon\" for a 512-base model")
        return "v_prediction"
    return "epsilon"


def _fill(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, name: str) -> torch.nn.Module:
    """Check the converted state dict fits `model` exactly (keys and shapes), load it, return the model in fp32."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
             for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        problems = [f"{len(items)} {label} (e.g. {items[0]})" for label, items in
                    [("shape mismatches", wrong), ("missing keys", missing), ("unexpected keys", unexpected)] if items]
        raise ModelError(f"{name}: {what} does not fit its config: {'; '.join(problems)}")
    # Fresh fp32 copies, not the tensors safetensors returned: those can sit at unaligned addresses, which makes
    # CPU kernels take other code paths (outputs ~1e-6 off those of the same weights loaded from a folder).
    state = {k: v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _load_unet(tensors: dict, config: dict, name: str):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = _public(config)
    state = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in tensors.items()}, config)
    return _fill(empty_model(UNet2DConditionModel, **config), state, "unet", name)


def _ldm_vae_to_diffusers(tensors: dict, config: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint({k: v for k, v in tensors.items() if k.startswith(VAE_SUBKEYS)}, config)


def _load_vae_state(state: dict, config: dict, name: str):
    from diffusers import AutoencoderKL

    return _fill(empty_model(AutoencoderKL, **_public(config)), state, "vae", name)


def _load_text_encoder(tensors: dict, prefix: str, layout: str, config: dict, with_projection: bool, name: str):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_config = CLIPTextConfig.from_dict(_public(config))
    model = empty_model(CLIPTextModelWithProjection if with_projection else CLIPTextModel, text_config)
    if layout == "clip":  # some early SD 1.x files lack transformers' `text_model.` level
        state = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
                 for k, v in tensors.items() if not k.endswith("position_ids")}
    else:
        state = convert_open_clip_checkpoint(model, {prefix + k: v for k, v in tensors.items()}, prefix=prefix)
        # SD 2.x drops OpenCLIP-H's last layer (it uses the penultimate one) and its projection.
        layer = re.compile(r"text_model\.encoder\.layers\.(\d+)\.")
        state = {k: v for k, v in state.items()
                 if not ((m := layer.match(k)) and int(m.group(1)) >= text_config.num_hidden_layers)
                 and (with_projection or not k.startswith("text_projection."))}
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return _fill(model, state, "text_encoder_2" if with_projection else "text_encoder", name)


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


# --- writing -------------------------------------------------------------------------------------------------------
#
# The reverse of the conversion above: diffusers names -> LDM names by the tables in `ldm_names`.


def _rename(state: Mapping[str, torch.Tensor], table: Mapping[str, str], what: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        ldm = rename(key, table)
        if ldm is None:
            raise ModelError(f"{what}: no single-file name for {key}")
        out[ldm] = value
    return out


def _refuse_adapters(module: torch.nn.Module, what: str) -> None:
    """peft layers would be written under their wrapped names (`to_q.base_layer`), which no loader reads."""
    peft = re.compile(r"\.(base_layer|lora_[AB]|lora_magnitude_vector)\.")
    key = next((k for k in module.state_dict() if peft.search(k)), None)
    if key:
        raise ModelError(f"{what}: has LoRA adapter layers ({key}); merge LoRA adapters first (peft merge_and_unload)")


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    per = config["layers_per_block"]
    if not isinstance(per, int):  # the LDM UNet, and every loader of its files, has one number of layers per level
        raise ModelError(f"unet: layers_per_block {per!r} has no LDM layout (needs one number)")
    table = unet_table(unet_layout_from_config(config))
    return {UNET_PREFIX + k: v for k, v in _rename(state, table, "unet").items()}


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping, prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """LDM VAE keys; the mid-block attention's linear q/k/v/proj_out become the 1x1 convs the original uses."""
    out = {}
    for key, value in _rename(state, vae_table(config), "vae").items():
        attention = ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))
        if attention and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[prefix + key] = value
    return out


def _hf_clip_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP text model's state dict with the `text_model.` prefix, whichever transformers version built it."""
    state = model.state_dict()
    if hasattr(model, "text_model"):
        return dict(state)
    return {k if k.startswith("text_projection.") else f"text_model.{k}": v for k, v in state.items()}


def _to_openclip(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}  # (layer, weight or bias) -> {q, k, v}
    rest = {}
    for key, value in state.items():
        m = re.match(r"(text_model\.encoder\.layers\.(\d+))\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if m:
            qkv.setdefault((int(m.group(2)), m.group(4)), {})[m.group(3)] = value
        elif key.endswith("position_ids"):
            continue
        else:
            rest[key] = value
    out = _rename(rest, openclip_table(num_layers), "text encoder")
    if "text_projection" in out:
        out["text_projection"] = out["text_projection"].T
    for (layer, kind), parts in qkv.items():  # nn.MultiheadAttention's in_proj is q, k, v stacked
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _components(model) -> dict:
    """unet, vae, text_encoders, scheduler_config, arch from a BaseModel, a diffusers pipeline or a dict."""
    def get(name: str):
        return model.get(name) if isinstance(model, dict) else getattr(model, name, None)

    text_encoders = get("text_encoders") or [get("text_encoder"), get("text_encoder_2")]
    text_encoders = [te for te in text_encoders if te is not None]
    scheduler_config = get("scheduler_config")
    if scheduler_config is None and get("scheduler") is not None:
        scheduler_config = dict(get("scheduler").config)
    arch = get("arch") or get("sdlora_arch")
    return {"unet": get("unet"), "vae": get("vae"), "text_encoders": list(text_encoders),
            "scheduler_config": dict(scheduler_config or {}), "arch": arch}


def _text_config(model) -> dict:
    config = model.config.to_dict()
    drop = ("transformers_version", "dtype", "torch_dtype")
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in drop}


def single_file_state_dict(model, arch: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(LDM-keyed tensors, configs) of a diffusers model: what `save_single_file` writes, without writing it."""
    parts = _components(model)
    arch = arch or parts["arch"]
    if arch not in TEXT_ENCODERS:
        raise ModelError(f"save_single_file: arch must be one of {', '.join(TEXT_ENCODERS)}, not {arch!r}")
    unet, vae, text_encoders = parts["unet"], parts["vae"], parts["text_encoders"]
    if unet is None or vae is None or len(text_encoders) != len(TEXT_ENCODERS[arch]):
        raise ModelError(f"save_single_file: {ARCH_NAMES[arch]} needs a unet, a vae and {len(TEXT_ENCODERS[arch])} "
                         f"text encoder(s); got {len(text_encoders)}")
    _refuse_adapters(unet, "unet")
    _refuse_adapters(vae, "vae")
    for i, encoder in enumerate(text_encoders):
        _refuse_adapters(encoder, f"text encoder {i + 1}")
    unet_config, vae_config = dict(unet.config), dict(vae.config)
    tensors = {**unet_to_ldm(unet.state_dict(), unet_config), **vae_to_ldm(vae.state_dict(), vae_config)}
    configs = {"arch": arch, "unet": _public(unet_config), "vae": _public(vae_config)}
    for component, (prefix, layout), encoder in zip(component_names(arch), TEXT_ENCODERS[arch], text_encoders):
        state = _hf_clip_state(encoder)
        if layout == "openclip":
            state = _to_openclip(state, encoder.config.num_hidden_layers)
        tensors.update({prefix + k: v for k, v in state.items() if not k.endswith("position_ids")})
        configs[component] = _text_config(encoder)
    configs["scheduler"] = parts["scheduler_config"] or shipped_configs(arch)["scheduler"]
    return tensors, configs


def save_single_file(model, path: str | Path, arch: str | None = None, metadata: dict[str, str] | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """Write UNet, VAE and text encoder(s) of a diffusers model as one LDM-layout `.safetensors` file.

    The keys are the original LDM/SAI names that A1111/Forge and ComfyUI read (diffusers' `from_single_file`
    reads them back tensor for tensor). The metadata carries the diffusers configs (`sdlora.configs`), so sdlora
    loads the file back exactly even at non-standard (tiny) sizes, and modelspec keys (architecture, prediction
    type). SD 2.x files hold the 23 OpenCLIP-H layers SD 2.x uses, not the unused 24th layer and projection.

    Args:
        model: a `BaseModel`, a diffusers StableDiffusion(XL)Pipeline, or a dict with unet, vae, text_encoders
            (or text_encoder / text_encoder_2) and optionally scheduler_config and arch.
        path: the output `.safetensors` file (written crash-safely).
        arch: "sd1", "sd2" or "sdxl"; default: the model's own `arch`.
        metadata: extra string metadata.
        dtype: cast floating tensors (e.g. torch.float16 halves the file); default keeps them.

    Raises:
        ModelError: missing components or keys with no single-file name (e.g. unmerged LoRA layers).
    """
    tensors, configs = single_file_state_dict(model, arch)
    arch = configs["arch"]
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    v_pred = configs["scheduler"].get("prediction_type") == "v_prediction"
    header = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": modelspec_architecture(arch, v_pred),
        "modelspec.title": Path(path).stem,
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        CONFIG_METADATA_KEY: json.dumps(configs, default=list),
        **(metadata or {}),
    }
    save_safetensors({k: v.detach().cpu() for k, v in tensors.items()}, path, header)
    return Path(path)
