"""One entry point for every adapter method (lora.method): `adapters_for(cfg, total_steps)` gives a run's adapters,
and the recipe, the memory planner and the benchmark call only that, as peft registers each tuner under its name;
`read_init_lora` checks that a method can continue a LoRA file.

A method is one class in METHODS with the `Adapters` interface: plain LoRA, DoRA and PiSSA are peft's layers and
nothing else (`lora.LoraAdapters`); AdaLoRA keeps peft's tuner for the whole run (`adalora.AdaLora`); LoHa and LoKr
are peft's LyCORIS layers, exported in LyCORIS' layout (`lycoris.LycorisAdapters`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from sdlora.adapters.adalora import AdaLora
from sdlora.adapters.export import lora_weights_from_tensors
from sdlora.adapters.files import group_lora_keys, read_lora_file, refuse_other_networks
from sdlora.adapters.lora import LoraAdapters, LoraWeights
from sdlora.adapters.lycoris import LycorisAdapters, LycorisWeights
from sdlora.config import LoraConfig
from sdlora.errors import LoraFileError, TrainingError


class Adapters(Protocol):
    """The adapters of one run on its trained components, and what training asks of them."""

    # True: the method needs each step's "loss and gradients were finite" flag on the host before the next step.
    needs_each_flag: bool
    # Names of the nested states `state_dict` returns, saved in checkpoints beside the optimizer's.
    extra_states: tuple[str, ...]

    def inject(self, model: torch.nn.Module, component: str,
               start: Mapping[str, LoraWeights] | None = None) -> list[str]:
        """Freeze `model` and add trainable fp32 adapters (from `start`'s weights where given); their module names."""

    def layers(self, component: str, model: torch.nn.Module) -> Mapping[str, LoraWeights | LycorisWeights]:
        """The adapted modules of `model` as the exported file holds them: LoRA factors, or LyCORIS tensors."""

    def penalty(self) -> torch.Tensor | float:
        """A term added to the loss before backward (not logged)."""

    def after_step(self, step: int, finite: bool) -> None:
        """Called after optimizer step `step` (from 1), before the gradients are zeroed."""

    def state_dict(self) -> dict:
        """{name in extra_states: nested state} for checkpoints."""

    def load_state_dict(self, states: dict) -> None:
        """Restore what `state_dict` returned."""

    def report(self, out: Path) -> str:
        """What the log says about the adapters at the end of training ("" for nothing); may write into `out`."""


METHODS: dict[str, type[LoraAdapters] | type[AdaLora] | type[LycorisAdapters]] = {
    "lora": LoraAdapters, "dora": LoraAdapters, "adalora": AdaLora, "loha": LycorisAdapters, "lokr": LycorisAdapters}


def adapters_for(cfg: LoraConfig, total_steps: int) -> Adapters:
    """The adapters of `cfg.method` for a run of `total_steps` optimizer steps (AdaLoRA's budget schedule)."""
    return METHODS[cfg.method](cfg, total_steps)


def read_init_lora(path: str | Path, cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """The tensors of the LoRA file `path` (--init-lora), after checking, before any model loads, that a run with
    `cfg` can continue it: its method can start from a file and would keep every part of it.

    Raises:
        TrainingError: the adapter method cannot start from a file, or the file has parts the run would not train
            (and so would drop from its output).
        LoraFileError: the file cannot be read, is another network type, or has a module without its pair.
    """
    if cfg.init == "pissa":
        raise TrainingError("lora.init = \"pissa\" starts from the base weights' own singular vectors; it cannot "
                            "continue an existing LoRA file (use init = \"default\")")
    if cfg.method in ("adalora", "loha", "lokr"):
        what = "learns its ranks" if cfg.method == "adalora" else "trains its own factors"
        raise TrainingError(f"lora.method = \"{cfg.method}\" {what} from the start; it cannot continue an "
                            "existing LoRA file (use method = \"lora\")")
    tensors, _ = read_lora_file(path)
    refuse_other_networks(path, tensors)
    modules, _ = group_lora_keys(tensors)
    if not modules:
        raise LoraFileError(f"{path}: holds no LoRA module to continue")
    weights = {module: lora_weights_from_tensors(parts, f"{path}: module {module}")
               for module, parts in modules.items()}
    dora = any(w.magnitude is not None for w in weights.values())
    if dora != (cfg.method == "dora"):
        raise TrainingError(f"{path} is {'a DoRA' if dora else 'a plain LoRA'} file: set lora.method = "
                            f"\"{'dora' if dora else 'lora'}\" to continue it")
    text_encoder = [m.startswith(("lora_te", "text_encoder")) for m in modules]
    for key, present in (("train_unet", not all(text_encoder)), ("train_text_encoder", any(text_encoder))):
        if present and not getattr(cfg, key):
            raise TrainingError(f"{path} has modules that lora.{key} = false would drop from the result: set "
                                f"lora.{key} = true to continue them")
    return tensors
