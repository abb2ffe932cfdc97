"""The optimizer over a run's adapters: AdamW (fused on a GPU), 8-bit AdamW, Prodigy, Adafactor or schedule-free
AdamW, with LoRA+'s learning rates for the up matrices and a learning rate per model; the LR schedule."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol, cast

import torch

from sdlora import bnb_import
from sdlora.adapters.lora import is_up_weight, trainable_parameters
from sdlora.config import TrainConfig
from sdlora.errors import TrainingError


def make_lr_scheduler(t: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' schedule `train.lr_scheduler` over the run, with its warm-up, restarts (cosine_with_restarts) or
    power (polynomial)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                         num_training_steps=t.max_train_steps, num_cycles=t.lr_scheduler_num_cycles,
                         power=t.lr_scheduler_power)


class _ScheduleFree(Protocol):
    param_groups: list[dict]

    def train(self) -> None: ...

    def eval(self) -> None: ...


@contextlib.contextmanager
def evaluation_weights(optimizer: torch.optim.Optimizer | _ScheduleFree) -> Iterator[None]:
    """Schedule-free AdamW's weights to evaluate and save (its average x) in the parameters, and afterwards the
    training weights exactly as they were: its own train() would bring them back only up to rounding, and a resumed
    run, which never left training mode, would then differ. Other optimizers: nothing to do."""
    if "train_mode" not in optimizer.param_groups[0]:  # not schedule-free
        yield
        return
    optimizer = cast(_ScheduleFree, optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    kept = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)


def make_optimizer(t: TrainConfig, trained: dict[str, torch.nn.Module], fused: bool) -> torch.optim.Optimizer:
    """The optimizer over the adapters; `fused` (AdamW on a GPU) also lets the loop skip NaN steps without a sync.

    On a CPU, fused AdamW is ~15x slower than foreach over LoRA's many small tensors (0.65 s vs 0.04 s a step for
    600 [64, 8] tensors on a 2-core CPU)."""
    groups = []
    for name, module in trained.items():
        lr = (t.unet_lr if name == "unet" else t.text_encoder_lr) or t.learning_rate
        params = trainable_parameters(module)
        down = [p for n, p in params.items() if not (t.loraplus_lr_ratio and is_up_weight(n))]
        up = [p for n, p in params.items() if t.loraplus_lr_ratio and is_up_weight(n)]
        groups.append({"params": down, "lr": lr, "name": f"{name}"})
        if up:
            # LoRA+ (arXiv 2402.12354): B learns faster than A for the same stability.
            groups.append({"params": up, "lr": lr * t.loraplus_lr_ratio, "name": f"{name}_up"})
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=t.weight_decay, fused=fused or None,
                                 foreach=None if fused else True)
    if t.optimizer == "adamw_schedulefree":
        try:
            import schedulefree
        except ImportError:
            raise TrainingError("train.optimizer = \"adamw_schedulefree\" needs schedulefree: "
                                "pip install 'sdlora[schedulefree]'") from None
        optimizer = schedulefree.AdamWScheduleFree(groups, weight_decay=t.weight_decay, warmup_steps=t.lr_warmup_steps)
        optimizer.train()  # it starts in evaluation mode
        return optimizer
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=t.learning_rate, weight_decay=t.weight_decay, relative_step=False,
                         scale_parameter=False, warmup_init=False)
    if t.optimizer == "adamw8bit":
        try:
            bnb = bnb_import.load()
        except ImportError:
            raise TrainingError(
                "train.optimizer = \"adamw8bit\" needs bitsandbytes: pip install 'sdlora[bnb]'") from None
        return bnb.optim.AdamW8bit(groups, weight_decay=t.weight_decay)
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise TrainingError("train.optimizer = \"prodigy\" needs prodigyopt: pip install 'sdlora[prodigy]'") from None
    # Prodigy estimates the step size itself; the learning rate is a multiplier (1.0 is the usual choice).
    return Prodigy(groups, weight_decay=t.weight_decay)
