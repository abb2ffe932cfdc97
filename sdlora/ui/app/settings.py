"""The app's settings (what it may read, where it writes) and the safe resolution of a name picked in the UI inside
its folders: the models, VAEs, LoRAs and dataset folders it offers."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from sdlora.errors import PathError
from sdlora.generate.pipeline import list_lora_files
from sdlora.models.tiny import TINY_MODELS


@dataclass
class AppSettings:
    """What the app may read and where it writes; fixed when it starts (nothing in the UI changes them)."""

    models_dir: Path = Path("models")  # diffusers folders and single-file .safetensors checkpoints
    lora_dir: Path = Path("outputs")  # searched recursively for *.safetensors
    out_dir: Path = Path("outputs/app")  # every generated PNG, and grids/ for X/Y grids
    model: str = "toy-sd15"  # the base model selected at start
    data_dir: Path = Path(".")  # Train tab: dataset folders must be inside this one
    configs_dir: Path = Path("configs")  # Train tab: the presets (*.toml)
    strict: bool = False  # refuse LoRA files with modules that match nothing in the model (else: a warning)
    embedding_dir: Path = Path("models/embeddings")  # embeddings a prompt names by file name (A1111's folder)


def resolve_inside(root: str | Path, name: str) -> Path:
    """The path of `name` (a relative name as listed in the UI) inside `root`.

    Raises:
        PathError: empty, absolute, with `..`, or (through a symlink) resolving outside `root`.
    """
    if not name or "\x00" in name:
        raise PathError("no name given")
    rel = PurePosixPath(name.replace("\\", "/"))
    if rel.is_absolute() or PureWindowsPath(name).drive or ".." in rel.parts:
        raise PathError(f"{name!r}: only names inside {root} can be used (no absolute paths, no '..')")
    base = Path(root).resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base):
        raise PathError(f"{name!r} leads outside {root} (a symlink?); only files inside it can be used")
    return path


OWN_VAE = "model's own"


def _is_vae(path: Path) -> bool:
    """A diffusers VAE folder (config.json of an AutoencoderKL), or a .safetensors file with VAE weights only
    (an encoder/decoder and no UNet or text encoder)."""
    import json

    if path.is_dir():
        with contextlib.suppress(Exception):
            return json.loads((path / "config.json").read_text()).get("_class_name") == "AutoencoderKL"
        return False
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # unreadable: left to the model list, which reports the error when it is chosen
        return False
    decoder = any(k.startswith(("decoder.", "first_stage_model.decoder.", "vae.decoder.")) for k in keys)
    others = ("model.diffusion_model.", "cond_stage_model.", "conditioner.", "unet.", "text_encoder", "lora_")
    return decoder and not any(k.startswith(others) for k in keys)


def model_choices(settings: AppSettings) -> list[str]:
    """The tiny models, then diffusers folders and single-file .safetensors checkpoints in models_dir (VAE
    files are listed by `vae_choices` instead)."""
    choices = list(TINY_MODELS)
    folder = Path(settings.models_dir)
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue
            if (path / "model_index.json").is_file() or (path.is_file() and path.suffix == ".safetensors"
                                                         and not _is_vae(path)):
                choices.append(path.name)
    return choices


def vae_choices(settings: AppSettings) -> list[str]:
    """"model's own", then the VAE .safetensors files and diffusers VAE folders in models_dir."""
    folder = Path(settings.models_dir)
    found = [p.name for p in sorted(folder.iterdir()) if not p.name.startswith(".") and _is_vae(p)] \
        if folder.is_dir() else []
    return [OWN_VAE, *found]


def resolve_vae(settings: AppSettings, name: str | None) -> str:
    """"" for the model's own VAE, else the path of a VAE file or folder inside models_dir."""
    if not name or name == OWN_VAE:
        return ""
    if name not in vae_choices(settings):
        raise PathError(f"{name!r} is not a VAE in {settings.models_dir} (press Refresh after adding one)")
    return str(resolve_inside(settings.models_dir, name))


def lora_choices(settings: AppSettings) -> list[str]:
    """LoRA files in lora_dir as relative names (`run/name.safetensors`), sorted."""
    root = Path(settings.lora_dir)
    return [path.relative_to(root).as_posix() for path in list_lora_files(root)]


def resolve_model(settings: AppSettings, name: str) -> str:
    """A tiny model name as is, else the path of a folder or file inside models_dir."""
    if name in TINY_MODELS:
        return name
    if name not in model_choices(settings):
        raise PathError(f"{name!r} is not a model in {settings.models_dir} (press Refresh after adding one)")
    return str(resolve_inside(settings.models_dir, name))


def size_for_model(settings: AppSettings, name: str) -> int:
    """Default width/height: the size the model was trained at (`models.native_size`), 512 when unreadable."""
    from sdlora.models.loading import native_size

    with contextlib.suppress(Exception):
        return native_size(resolve_model(settings, name))
    return 512


def dataset_folder(settings: AppSettings, dataset: str | None) -> Path:
    data = resolve_inside(settings.data_dir, (dataset or "").strip())
    if not data.is_dir():
        raise PathError(f"{dataset!r} is not a folder inside {settings.data_dir}")
    return data
