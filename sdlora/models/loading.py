"""Base models: resolve `model.base_model` (tiny name, diffusers folder, single file, hub id), detect the
architecture, load the components, encode prompts. Single-file checkpoints live in `single_file.py`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdlora.errors import ModelError
from sdlora.models.arch import SHIPPED_CONFIGS
from sdlora.models.single_file import (
    PICKLE_SUFFIXES,
    detect_checkpoint,
    file_configs,
    load_checkpoint,
    load_vae_file,
    read_header,
    refuse_pickle,
    shipped_configs,
)
from sdlora.models.tiny import FULL_SIZE_MODELS, TINY_MODELS, tiny_model_path

if TYPE_CHECKING:  # diffusers takes seconds to import; `sdlora inspect` and `doctor` never load a model
    # The module itself: mypy reads `from diffusers import ...` as the placeholder classes diffusers defines for
    # installs without torch, which have none of the model's methods.
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import PreTrainedModel

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the Hugging Face hub spells repo ids



@dataclass
class BaseModel:
    """The pieces of a Stable Diffusion pipeline that training and generation use."""

    arch: str  # "sd1", "sd2" or "sdxl"
    path: Path
    unet: UNet2DConditionModel
    vae: torch.nn.Module
    text_encoders: list[PreTrainedModel]  # CLIPTextModel, and for SDXL CLIPTextModelWithProjection
    tokenizers: list
    scheduler_config: dict = field(default_factory=dict)
    clip_skip: int | None = None  # the text encoder was cut to it (`cut_text_encoder`)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def name(self) -> str:
        return self.path.name


def resolve_model_path(base_model: str, allow_unsafe_pickle: bool = False) -> Path:
    """Turn `model.base_model` into a local diffusers folder or single-file checkpoint.

    Tiny model names build the tiny model on first use. A hub id (`owner/name` that is not a local path) is
    downloaded with diffusers when HF_HUB_OFFLINE is not set.

    Raises:
        ModelError: the path does not exist, is a refused pickle, is not a diffusers folder, or is a hub id
            that cannot be downloaded (offline, no connection, no such repository).
    """
    if base_model in TINY_MODELS:
        return tiny_model_path(base_model)
    path = Path(base_model).expanduser()
    refuse_pickle(path, allow_unsafe_pickle)
    if not path.exists():
        if _HUB_ID.match(base_model) and path.suffix.lower() not in (".safetensors", *PICKLE_SUFFIXES):
            return _download(base_model)
        raise ModelError(f"{base_model}: no such model folder or file; tiny models: {', '.join(TINY_MODELS)}")
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise ModelError(f"{path}: not a diffusers model folder (no model_index.json)")
    if path.is_file() and path.suffix.lower() not in (".safetensors", *PICKLE_SUFFIXES):
        raise ModelError(f"{path}: unsupported file type {path.suffix!r}; use a single-file .safetensors "
                         "checkpoint or a diffusers folder")
    return path


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _download(repo_id: str) -> Path:
    """The hub snapshot folder of a diffusers model (DiffusionPipeline.download, which from_pretrained uses)."""
    message = (f"{repo_id}: not a local path; hub ids need a network connection — download the model and pass "
               "its folder")
    if hub_offline():
        raise ModelError(f"{message} (HF_HUB_OFFLINE is set)")
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(repo_id))
    except Exception as e:  # connection errors, missing or gated repositories: all end the same way for the user
        reason = " ".join(str(e).split())[:160]
        raise ModelError(f"{message} ({type(e).__name__}: {reason})") from None


def detect_arch(model_index: dict, unet_config: dict) -> str:
    """'sdxl' when there are two text encoders, 'sd2' for 1024-dim cross-attention (OpenCLIP-H), else 'sd1'."""
    if model_index.get("text_encoder_2") or unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if unet_config.get("cross_attention_dim") == 1024 else "sd1"


def detect_model(base_model: str, allow_unsafe_pickle: bool = False) -> str:
    """'sd1', 'sd2' or 'sdxl' for a tiny model name, diffusers folder or single file, without loading weights.

    Raises:
        ModelError: see `resolve_model_path` and `single_file.detect_checkpoint`.
    """
    path = resolve_model_path(base_model, allow_unsafe_pickle)
    if path.is_file():
        return detect_checkpoint(read_header(path, allow_unsafe_pickle)[0], str(path))
    model_index = json.loads((path / "model_index.json").read_text())
    return detect_arch(model_index, json.loads((path / "unet" / "config.json").read_text()))


def native_size(base_model: str, allow_unsafe_pickle: bool = False) -> int:
    """The side length a model was trained at, read from its configs without loading weights (see `side_length`).

    Raises:
        ModelError: see `resolve_model_path` and `single_file.file_configs`.
    """
    path = resolve_model_path(base_model, allow_unsafe_pickle)
    if path.is_file():
        configs = file_configs(path, allow_unsafe_pickle)
        return side_length(configs["unet"], configs["vae"])
    return side_length(*(json.loads((path / part / "config.json").read_text()) for part in ("unet", "vae")))


def model_configs(base_model: str, allow_unsafe_pickle: bool = False) -> tuple[str, dict[str, dict]]:
    """(arch, {component: config}) of a base model from its configs alone (a single file's header, no weights).

    The full-size names (`sd15`, `sdxl`) give the shipped real-size configs: plans and benchmarks before anything
    is downloaded.

    Raises:
        ModelError: see `resolve_model_path` and `single_file.file_configs`.
    """
    if base_model in FULL_SIZE_MODELS:
        arch = next(arch for arch, folder in SHIPPED_CONFIGS.items() if folder == base_model)
        return arch, shipped_configs(arch)
    path = resolve_model_path(base_model, allow_unsafe_pickle)
    if path.is_file():
        return detect_checkpoint(read_header(path, allow_unsafe_pickle)[0], str(path)), file_configs(path)
    configs = {part: json.loads((path / part / "config.json").read_text())
               for part in ("unet", "vae", "text_encoder", "text_encoder_2") if (path / part / "config.json").is_file()}
    return detect_arch(json.loads((path / "model_index.json").read_text()), configs["unet"]), configs


def side_length(unet_config, vae_config) -> int:
    """Pixels per side at the UNet's training size, as diffusers' pipelines default it: the UNet's sample size
    times the VAE's downscaling (SD 1.x 512, SD 2.x 768-v 768, SDXL 1024, the tiny models 128)."""
    return unet_config["sample_size"] * 2 ** (len(vae_config["block_out_channels"]) - 1)


def load_base_model(base_model: str, vae: str = "", allow_unsafe_pickle: bool = False,
                    prediction_type: str = "", clip_skip: int | None = None) -> BaseModel:
    """Load UNet, VAE, text encoder(s) and tokenizer(s) of a base model on the CPU in fp32.

    Args:
        base_model: tiny model name, diffusers folder, single-file checkpoint (LDM/A1111 layout) or hub id.
        vae: "" (the model's own), or a VAE folder or single `.safetensors` file.
        allow_unsafe_pickle: allow `.ckpt/.pt/.pth/.bin` (loaded with torch.load(weights_only=True)).
        prediction_type: "" (the model's scheduler config / file metadata) or "epsilon" / "v_prediction".
        clip_skip: `model.clip_skip`: the text encoder comes cut to it (`cut_text_encoder`).

    Raises:
        ModelError: see `resolve_model_path`; for single files also `single_file.load_checkpoint`; a clip_skip
            `cut_text_encoder` refuses.
    """
    path = resolve_model_path(base_model, allow_unsafe_pickle)
    if path.is_file():
        parts = load_checkpoint(path, allow_unsafe_pickle, prediction_type, with_vae=not vae)
        arch, unet, vae_model = parts["arch"], parts["unet"], parts["vae"]
        text_encoders, tokenizers = parts["text_encoders"], parts["tokenizers"]
        scheduler_config, vae_config = parts["scheduler_config"], parts["vae_config"]
    else:
        arch, unet, vae_model, text_encoders, tokenizers, scheduler_config = _load_folder(path, load_vae=not vae)
        vae_config = json.loads((path / "vae" / "config.json").read_text()) if vae else {}
    if vae:
        vae_model = _load_vae(vae, allow_unsafe_pickle, vae_config)
    if prediction_type:
        scheduler_config = {**scheduler_config, "prediction_type": prediction_type}
    base = BaseModel(arch, path, unet, vae_model, text_encoders, tokenizers, scheduler_config)
    if clip_skip is not None:
        cut_text_encoder(base, clip_skip)
    return base


def cut_text_encoder(base: BaseModel, clip_skip: int) -> None:
    """Clip skip N for training: the SD 1.x/2.x text encoder without its last N - 1 layers, so that its output is
    its final layer norm of the hidden state N - 1 layers before the end, which is what kohya (get_hidden_states) and
    A1111 read for clip skip N. Cutting the layers instead of picking a hidden state makes every caller of the
    encoder (training, caches, validation, samples) read the same state and skips the unused layers' work; SD 2.x's
    diffusers checkpoints are OpenCLIP cut the same way. Generation picks the hidden state instead
    (`prompt.encode_prompt_embeds`), as its pipelines are shared between settings.

    Raises:
        ModelError: SDXL (it always reads the penultimate layer, and kohya ignores clip_skip for it), or N not
            below the encoder's number of layers.
    """
    if clip_skip == 1:
        return
    if base.arch == "sdxl":
        raise ModelError("model.clip_skip: SDXL always reads its text encoders' penultimate layer (kohya ignores "
                         "clip_skip for SDXL); leave it unset")
    encoder = base.text_encoders[0]
    text_model: Any = getattr(encoder, "text_model", encoder)  # transformers 5's CLIPTextModel has no text_model
    layers: torch.nn.ModuleList = text_model.encoder.layers
    if clip_skip > len(layers) + 1:
        raise ModelError(f"model.clip_skip: {clip_skip} is more than the text encoder's {len(layers)} layers")
    del layers[len(layers) - (clip_skip - 1):]
    encoder.config.num_hidden_layers = len(layers)
    base.clip_skip = clip_skip


def _load_folder(path: Path, load_vae: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    model_index = json.loads((path / "model_index.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    arch = detect_arch(model_index, dict(unet.config))
    text_encoders: list[PreTrainedModel] = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder")]
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")]
    if arch == "sdxl":
        text_encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"))
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
    vae_model = AutoencoderKL.from_pretrained(path, subfolder="vae") if load_vae else None
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    return arch, unet, vae_model, text_encoders, tokenizers, scheduler_config


def _load_vae(vae: str, allow_unsafe_pickle: bool, base_vae_config: dict):
    """model.vae: a diffusers VAE folder (or model folder with vae/), or one file loaded offline."""
    from diffusers import AutoencoderKL

    path = Path(vae).expanduser()
    refuse_pickle(path, allow_unsafe_pickle)
    if not path.exists():
        raise ModelError(f"{path}: VAE not found (model.vae)")
    if path.is_dir():
        return AutoencoderKL.from_pretrained(path / "vae" if (path / "vae").is_dir() else path)
    return load_vae_file(path, base_vae_config, allow_unsafe_pickle)


def token_chunks(tokenizer, text: str) -> list[list[int]]:
    """Token ids of `text` in chunks of 75, each as BOS + chunk + EOS + padding: 77 ids (never an empty list).

    For a prompt of up to 75 tokens this is exactly what the pipelines' own `tokenizer(..., padding="max_length",
    truncation=True)` gives, so short prompts encode as before. A1111 chunks long prompts so, and these are the ids
    kohya's get_input_ids gives a long caption too (its rules for the chunk ends come out the same).
    """
    ids = tokenizer(expand_vectors(text, tokenizer), add_special_tokens=False, truncation=False,
                    verbose=False).input_ids
    size = tokenizer.model_max_length - 2
    chunks = [ids[i:i + size] for i in range(0, len(ids), size)] or [[]]
    pad = tokenizer.pad_token_id
    return [[tokenizer.bos_token_id, *c, tokenizer.eos_token_id] + [pad] * (size - len(c)) for c in chunks]


def expand_vectors(text: str, tokenizer) -> str:
    """`text` with each word of an embedding of several vectors (an added token `w` with `w_1`, ... beside it,
    diffusers' convention) written out as all of them, as diffusers' pipelines do (`maybe_convert_prompt`)."""
    added = tokenizer.added_tokens_encoder
    if not any(f"{word}_1" in added for word in added):
        return text
    for token in set(tokenizer.tokenize(text)):
        if f"{token}_1" in added:
            vectors = next(i for i in range(1, len(added) + 1) if f"{token}_{i}" not in added)
            text = text.replace(token, " ".join([token] + [f"{token}_{i}" for i in range(1, vectors)]))
    return text


def tokenize(tokenizers: list, captions: list[str], max_token_length: int = 75) -> list[torch.Tensor]:
    """Token ids [batch, 77] per tokenizer, longer captions cut; with `data.max_token_length` 150 or 225 (kohya's
    long captions) [batch, 154 / 231]: the caption in 2 / 3 `token_chunks`, cut there, empty chunks after a shorter
    one. `encode_prompt` encodes the chunks one by one and joins them."""
    if max_token_length == 75:
        return [
            tok([expand_vectors(c, tok) for c in captions], padding="max_length", max_length=tok.model_max_length,
                truncation=True, return_tensors="pt").input_ids
            for tok in tokenizers
        ]
    n = max_token_length // 75
    return [
        torch.tensor([sum((token_chunks(tok, caption) + token_chunks(tok, "") * n)[:n], []) for caption in captions])
        for tok in tokenizers
    ]


def encode_prompt(arch: str, text_encoders: list,
                  input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-attention states [batch, 77, dim] and (SDXL) pooled embeds [batch, proj_dim], as the pipelines do.

    SD1.x uses the last hidden state; SDXL concatenates the penultimate hidden states of both encoders and pools
    with the second encoder's projection. Ids of n chunks (`tokenize` with a max_token_length) are encoded chunk by
    chunk and joined as kohya does (`join_chunks`): [batch, 75 n + 2, dim], SDXL pooling the first chunk.
    """
    b, n = input_ids[0].shape[0], input_ids[0].shape[1] // 77
    if arch != "sdxl":
        encoder = text_encoders[0]
        return join_chunks(encoder(input_ids[0].reshape(b * n, 77).to(encoder.device))[0], n), None
    states, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids):
        out = encoder(ids.reshape(b * n, 77).to(encoder.device), output_hidden_states=True)
        states.append(join_chunks(out.hidden_states[-2], n))
        pooled = out[0][::n]  # text_embeds of CLIPTextModelWithProjection (the last encoder), first chunks
    return torch.cat(states, dim=-1), pooled


def join_chunks(states: torch.Tensor, n: int) -> torch.Tensor:
    """Per-chunk states [batch * n, 77, dim] as kohya's get_hidden_states joins them: the first chunk's BOS state,
    positions 1-75 of every chunk, the last chunk's final state: [batch, 75 n + 2, dim] (one chunk: unchanged)."""
    if n == 1:
        return states
    chunks = states.reshape(-1, n, 77, states.shape[-1])
    return torch.cat([chunks[:, 0, :1], chunks[:, :, 1:76].flatten(1, 2), chunks[:, -1, 76:]], dim=1)


def sdxl_time_ids(original_size, crop_top_left, target_size) -> torch.Tensor:
    """SDXL micro-conditioning [batch, 6]: original (h, w), crop (top, left), target (h, w) per sample."""
    rows = [list(o) + list(c) + list(t) for o, c, t in zip(original_size, crop_top_left, target_size)]
    return torch.tensor(rows, dtype=torch.float32)
