"""Resumable training state without pickle: adapter + optimizer tensors in safetensors, the rest in JSON.

A checkpoint is a folder `checkpoint-<step>/` written under a temporary name and renamed, so a crash leaves
either a complete checkpoint or none. Optimizer state dicts are nested dicts/lists of tensors and plain values;
we store each tensor under its path in the nesting and the skeleton as JSON, which round-trips any optimizer
(AdamW, Adafactor, Prodigy, bitsandbytes) without torch.save.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sdlora.atomic import atomic_dir, save_safetensors, write_text
from sdlora.errors import MissingFileError

_TENSOR = "__tensor__"


def flatten_state(state: Any, tensors: dict[str, torch.Tensor], path: str = "s") -> Any:
    """Replace every tensor in a nested state with a reference and collect it in `tensors`."""
    if isinstance(state, torch.Tensor):
        tensors[path] = state.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(state, dict):
        # JSON keys are strings: remember int keys (optimizer param ids) so they come back as ints.
        return {"__dict__": [[k, flatten_state(v, tensors, f"{path}.{k}")] for k, v in state.items()]}
    if isinstance(state, (list, tuple)):
        return [flatten_state(v, tensors, f"{path}.{i}") for i, v in enumerate(state)]
    return state


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict) and _TENSOR in skeleton:
        return tensors[skeleton[_TENSOR]]
    if isinstance(skeleton, dict):
        return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def save_checkpoint(
    folder: Path, adapters: dict[str, torch.Tensor], optimizer_state: dict, state: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write adapters.safetensors, optimizer.safetensors/.json and state.json into `folder`, atomically as a whole.

    `extra` holds more nested states by name (e.g. {"adalora": AdaLoRA's rank allocator}), each written like the
    optimizer's as <name>.safetensors + <name>.json and read back with `load_extra`.
    """
    with atomic_dir(folder) as tmp:
        save_safetensors({k: v.detach().cpu() for k, v in adapters.items()}, tmp / "adapters.safetensors")
        for name, nested in {"optimizer": optimizer_state, **(extra or {})}.items():
            tensors: dict[str, torch.Tensor] = {}
            skeleton = flatten_state(nested, tensors)
            save_safetensors(tensors, tmp / f"{name}.safetensors")
            write_text(tmp / f"{name}.json", json.dumps(skeleton))
        write_text(tmp / "state.json", json.dumps(state, indent=2))
    return folder


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, Any]]:
    """(adapters, optimizer state dict, state) from a checkpoint folder."""
    adapters = load_file(str(folder / "adapters.safetensors"))
    state = json.loads((folder / "state.json").read_text())
    return adapters, load_extra(folder, "optimizer"), state


def load_extra(folder: Path, name: str) -> Any:
    """A nested state saved under `name` (see `save_checkpoint`).

    Raises:
        MissingFileError: the checkpoint has no such state (it was saved by a run configured otherwise).
    """
    if not (folder / f"{name}.json").is_file():
        raise MissingFileError(f"{folder}: this checkpoint has no {name} state (saved by a run with another config?)")
    tensors = load_file(str(folder / f"{name}.safetensors"))
    return unflatten_state(json.loads((folder / f"{name}.json").read_text()), tensors)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (temporary folders from a crash are ignored)."""
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, output_dir: Path) -> Path:
    """`--resume latest` or a checkpoint folder (or a run folder: its newest checkpoint).

    Raises:
        MissingFileError: nothing to resume from, with the path looked at.
    """
    path = Path(output_dir) if resume == "latest" else Path(resume)
    if (path / "state.json").is_file():
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise MissingFileError(f"{path}: no checkpoint-<step> folder to resume from")
    return checkpoints[-1]


def prune(paths: list[Path], keep: int) -> None:
    """Delete all but the newest `keep` of `paths` (oldest first); keep = 0 keeps everything."""
    if keep <= 0:
        return
    for p in paths[:-keep]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
