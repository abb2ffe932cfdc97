"""The optimizer over a run's adapters: AdamW (fused on a GPU), 8-bit AdamW, Prodigy, Adafactor or schedule-free
AdamW, with LoRA+'s learning rates for the up matrices, a learning rate per model and kohya's per UNet block; the LR
schedule."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol, cast

import torch

from sdlora import bnb_import
from sdlora.adapters.blocks import parameter_lr_weights
from sdlora.adapters.embeddings import is_embedding
from sdlora.adapters.lora import is_up_weight, trainable_parameters
from sdlora.config import LoraConfig, TrainConfig
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


def make_optimizer(t: TrainConfig, trained: dict[str, torch.nn.Module], fused: bool,
                   lora: LoraConfig | None = None) -> torch.optim.Optimizer:
    """The optimizer over the adapters; `fused` (AdamW on a GPU) also lets the loop skip NaN steps without a sync.

    A parameter group per model ("unet", "text_encoder"), and with `lora`'s per-block learning rates one per UNet
    block ("unet_IN04": the UNet's rate times the block's weight), each with its LoRA+ up matrices' beside ("_up").
    The groups follow the models' parameter order, so that a resumed run's optimizer state fits them.

    On a CPU, fused AdamW is ~15x slower than foreach over LoRA's many small tensors (0.65 s vs 0.04 s a step for
    600 [64, 8] tensors on a 2-core CPU)."""
    groups = []
    for name, module in trained.items():
        lr = (t.unet_lr if name == "unet" else t.text_encoder_lr) or t.learning_rate
        params = trainable_parameters(module)
        words = [params.pop(n) for n in list(params) if is_embedding(n)]
        if words:
            # Pivotal tuning's new words, without weight decay: it would pull them towards the zero vector, far
            # from where the vocabulary's embeddings lie.
            groups.append({"params": words, "lr": t.embedding_lr or t.learning_rate, "weight_decay": 0.0,
                           "name": f"{name}_embeddings"})
        blocks = parameter_lr_weights(lora, module) if lora is not None and name == "unet" else {}
        for block, weight in dict.fromkeys(blocks.get(n, ("", 1.0)) for n in params):  # in parameter order
            label = f"{name}_{block}" if block else name
            part = {n: p for n, p in params.items() if blocks.get(n, ("", 1.0))[0] == block}
            down = [p for n, p in part.items() if not (t.loraplus_lr_ratio and is_up_weight(n))]
            up = [p for n, p in part.items() if t.loraplus_lr_ratio and is_up_weight(n)]
            if down:  # none in a text encoder that trains only new words
                groups.append({"params": down, "lr": lr * weight, "name": label})
            if up:
                # LoRA+ (arXiv 2402.12354): B learns faster than A for the same stability.
                groups.append({"params": up, "lr": lr * weight * t.loraplus_lr_ratio, "name": f"{label}_up"})
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
