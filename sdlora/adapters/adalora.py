"""AdaLoRA (arXiv 2303.10512) through peft: adapters whose rank per module is learned while training.

Why a module of its own: plain LoRA and DoRA go in through peft's `inject_adapter_in_model`, which builds peft's tuner
and drops it. AdaLoRA's tuner (peft's AdaLoraModel) has to live as long as the run: its RankAllocator scores every
singular triplet from the gradients after each optimizer step and masks the least important ones
(`update_and_allocate`), and it owns the orthogonality penalty, which peft adds only to a model output that has
`.loss` (a UNet's output has none). `AdaLora` keeps the tuners of the trained components and gives the training
loop those two hooks, the allocator's state for checkpoints and the final ranks for the report, behind the same
interface as plain LoRA (`adapters.methods.Adapters`). `adalora_weights` reads a pruned module back as an
ordinary LoRA of its own rank, so exports need no special case.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import peft.tuners.adalora as peft_adalora
import torch
from peft import AdaLoraConfig
from peft.tuners.adalora import AdaLoraLayer, AdaLoraModel

from sdlora.adapters.lora import ADAPTER, LoraWeights, effective_scale, target_module_names, trainable_parameters
from sdlora.atomic import write_text
from sdlora.config import LoraConfig
from sdlora.errors import ModelError

RANKS_FILE = "adalora_ranks.json"
_RANKNUM_EPS = 1e-5  # what peft's SVD layers add to ranknum before dividing by it
_BLOCK = re.compile(r"(down_blocks\.\d+|mid_block|up_blocks\.\d+|layers\.\d+)")


class AdaLora:
    """AdaLoRA on the trained components of one run of `total_steps` optimizer steps."""

    needs_each_flag = True  # the allocator must not score the gradients of a skipped (NaN/Inf) step
    extra_states: tuple[str, ...] = ("adalora",)  # the allocator's averages, saved in checkpoints under this name

    def __init__(self, cfg: LoraConfig, total_steps: int):
        self.cfg, self.total_steps = cfg, total_steps
        self.tuners: dict[str, AdaLoraModel] = {}

    def inject(self, model: torch.nn.Module, component: str, start: Mapping[str, LoraWeights] | None = None
               ) -> list[str]:
        """Freeze `model` and add a trainable fp32 AdaLoRA adapter on the modules plain LoRA would adapt."""
        if start:
            raise ValueError("AdaLoRA learns its ranks from the start; it cannot start from a LoRA file")
        names = target_module_names(model, component, self.cfg.targets)
        if not names:
            raise ValueError(f"no LoRA target modules found in the {component} for targets={self.cfg.targets!r}")
        modules = dict(model.named_modules())
        if not hasattr(peft_adalora, "SVDConv2d") and any(isinstance(modules[n], torch.nn.Conv2d) for n in names):
            raise ModelError(f"AdaLoRA on the {component}'s convolutions (SD1.x proj_in/proj_out, targets = \"all\") "
                             "needs peft >= 0.20: pip install -U peft, or set lora.targets = \"attn\"")
        init_rank, warmup, final = self.cfg.adalora_schedule(self.total_steps)
        model.requires_grad_(False)
        config = AdaLoraConfig(
            init_r=init_rank, target_r=self.cfg.rank, tinit=warmup, tfinal=final, total_step=self.total_steps,
            deltaT=self.cfg.adalora_update_every, orth_reg_weight=self.cfg.adalora_orth_reg,
            lora_dropout=self.cfg.dropout, target_modules=names,
            # peft scales by lora_alpha / init_r; this makes the scale what lora.alpha / lora.rank means for LoRA.
            # peft annotates lora_alpha as int but only divides by it: a float alpha is exact.
            lora_alpha=effective_scale(self.cfg) * init_rank,  # type: ignore[arg-type]
        )
        self.tuners[component] = AdaLoraModel(model, config, ADAPTER)
        # fp32 whatever the base dtype, as lora.trained_in_fp32 makes them; ranknum too, so the scale is exact in the
        # forward.
        for name, param in model.named_parameters():
            if param.requires_grad or ".ranknum." in name:
                param.data = param.data.float()
        return names

    def penalty(self) -> torch.Tensor:
        """adalora_orth_reg times the mean of ||A A^T - I||_F and ||B^T B - I||_F over every factor.

        peft computes this only inside AdaLoraModel.forward, and only adds it to an output's `.loss`, which the
        UNet's output does not have; so these lines repeat peft's formula. It keeps A's rows and B's columns
        orthonormal, which is what makes E's entries singular values that can be pruned one by one.
        """
        if not self.cfg.adalora_orth_reg:
            return torch.zeros(())
        terms = []
        for tuner in self.tuners.values():
            for layer in _layers(tuner.model).values():
                a, _, b = _factors(layer)
                for gram in (a @ a.T, b.T @ b):
                    terms.append(torch.linalg.matrix_norm(gram - torch.eye(len(gram), device=gram.device)))
        return self.cfg.adalora_orth_reg * torch.stack(terms).mean()

    def after_step(self, step: int, finite: bool) -> None:
        """peft's `update_and_allocate` after optimizer step `step` (counted from 1): importance scores from this
        step's gradients, then the budget's mask on the singular values. Call it before the gradients are zeroed."""
        # peft's total_step - tfinal, as `inject` configured them: from there on its allocator only keeps the mask.
        last_allocation = self.total_steps - self.cfg.adalora_schedule(self.total_steps)[2]
        for tuner in self.tuners.values():
            if not finite and step < last_allocation:
                continue  # NaN/Inf gradients would stay in the importance averages for good
            for param in trainable_parameters(tuner.model).values():
                if param.grad is None:  # a module outside the graph (SDXL's last text-encoder layer) scores 0
                    param.grad = torch.zeros_like(param)
            tuner.update_and_allocate(step)

    def layers(self, component: str, model: torch.nn.Module) -> dict[str, LoraWeights]:
        """The modules AdaLoRA kept (rank > 0) of `model`, each as an ordinary LoRA of its own rank."""
        kept = {name: adalora_weights(layer) for name, layer in _layers(model).items()}
        return {name: weights for name, weights in kept.items() if weights.rank}

    def state_dict(self) -> dict:
        """{"adalora": the allocator's importance averages and the rank pattern per component} (for checkpoints)."""
        return {"adalora": {
            name: {"ipt": t.rankallocator.ipt, "exp_avg_ipt": t.rankallocator.exp_avg_ipt,
                   "exp_avg_unc": t.rankallocator.exp_avg_unc, "rank_pattern": _config(t).rank_pattern}
            for name, t in self.tuners.items()}}

    def load_state_dict(self, states: dict) -> None:
        for name, tuner in self.tuners.items():
            saved, allocator = states["adalora"][name], tuner.rankallocator
            device = next(iter(trainable_parameters(tuner.model).values())).device
            for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                setattr(allocator, key, {n: v.to(device) for n, v in saved[key].items()})
            _config(tuner).rank_pattern = saved["rank_pattern"]

    def ranks(self) -> dict[str, dict[str, int]]:
        """{component: {module: rank}}: how many singular values each module keeps (non-zero entries of E)."""
        return {name: {m: int(layer.lora_E[ADAPTER].count_nonzero()) for m, layer in _layers(t.model).items()}
                for name, t in self.tuners.items()}

    def report(self, out: Path) -> str:
        """Write the ranks per module and per block to <out>/adalora_ranks.json; return the per-block summary."""
        init_rank = self.cfg.adalora_schedule(self.total_steps)[0]
        ranks = self.ranks()
        blocks = {component: _per_block(modules) for component, modules in ranks.items()}
        write_text(out / RANKS_FILE, json.dumps(
            {"target_rank": self.cfg.rank, "init_rank": init_rank, "blocks": blocks, "modules": ranks}, indent=1))
        lines = [f"AdaLoRA ranks (target average {self.cfg.rank}, started at {init_rank}); every module's in "
                 f"{out / RANKS_FILE}"]
        for component, modules in ranks.items():
            pruned = sum(r == 0 for r in modules.values())
            lines.append(f"  {component}: mean {sum(modules.values()) / len(modules):.2f} over {len(modules)} "
                         f"modules ({pruned} pruned to 0, left out of the LoRA file)")
            for block, s in blocks[component].items():
                lines.append(f"    {block:<14} mean {s['mean_rank']:5.2f}  min {s['min_rank']:>2}  "
                             f"max {s['max_rank']:>2}  ({s['modules']} modules)")
        return "\n".join(lines)


def adalora_weights(layer: AdaLoraLayer) -> LoraWeights:
    """One AdaLoRA module as an ordinary LoRA of the rank it kept (0 when AdaLoRA pruned all of it).

    peft's delta W = B @ (A * E) * scaling / (ranknum + eps), E holding the singular values (pruned ones are 0),
    so the kept rows give down = (A * E)[kept] and up = B[:, kept]. Every module gets the same alpha, `scaling`
    (the alpha of the initial rank), and the rest of its scale goes into the weights: diffusers' kohya loader
    (diffusers 0.42) mangles the names of per-module alphas that differ and silently applies the most common one,
    while one alpha for all loads right there and in every other loader, which all apply alpha / rank per module.
    """
    a, e, b = (p.detach().float() for p in _factors(layer))
    ranknum = layer.ranknum[ADAPTER].detach().float()
    kept = e.flatten() != 0
    rank = int(kept.sum())
    # alpha / rank * up @ down = scaling / rank * (rank / ranknum) B (ranknum / (ranknum + eps)) A E
    down, up = (a * e * (ranknum / (ranknum + _RANKNUM_EPS)))[kept], b[:, kept] * (rank / ranknum)
    base = layer.get_base_layer()
    if isinstance(base, torch.nn.Conv2d):  # A holds the flattened kernel; kohya's conv layout is 4-D
        down, up = down.reshape(-1, *base.weight.shape[1:]), up[:, :, None, None]
    return LoraWeights(down, up, float(layer.scaling[ADAPTER]))


def _layers(model: torch.nn.Module) -> dict[str, AdaLoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaLoraLayer) and ADAPTER in m.lora_A}


def _factors(layer: AdaLoraLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, E, B) of this run's adapter in `layer`: delta W = B @ (A * E) * scaling / (ranknum + eps)."""
    # AdaLoraLayer keeps them in ParameterDicts without declaring so: mypy sees the ModuleDicts of LoraLayer, which
    # it subclasses.
    a, e, b = (cast(torch.nn.ParameterDict, p)[ADAPTER] for p in (layer.lora_A, layer.lora_E, layer.lora_B))
    return a, e, b


def _config(tuner: AdaLoraModel) -> AdaLoraConfig:
    # peft types a tuner's configs as the base PeftConfig; an AdaLoraModel's are the AdaLoraConfig it was given.
    return cast(AdaLoraConfig, tuner.peft_config[ADAPTER])


def _per_block(ranks: dict[str, int]) -> dict[str, dict]:
    """Rank statistics per UNet block (down_blocks.N, mid_block, up_blocks.N) or text-encoder layer (layers.N)."""
    grouped: dict[str, list[int]] = {}
    for module, rank in ranks.items():
        match = _BLOCK.search(module)
        grouped.setdefault(match[1] if match else module, []).append(rank)
    return {block: {"modules": len(r), "mean_rank": sum(r) / len(r), "min_rank": min(r), "max_rank": max(r)}
            for block, r in sorted(grouped.items(), key=lambda kv: _block_order(kv[0]))}


def _block_order(block: str) -> tuple:
    number = re.search(r"\d+", block)
    return block.startswith("up"), block.startswith(("up", "mid")), int(number[0]) if number else 0, block
