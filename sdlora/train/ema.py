"""An exponential moving average of the adapter weights (`train.ema_decay`), kept by diffusers' `EMAModel`.

The optimizer trains the raw weights; the average is what the files, samples and validation see (`applied`).
Checkpoints hold both, so a resumed run continues the same average.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from sdlora.config import TrainConfig


class AdapterEMA:
    """The average of `params`, updated every `train.ema_update_every` optimizer steps.

    The decay is diffusers' EMAModel's: min(ema_decay, (1 + n) / (10 + n)) at its n-th update (the first copies
    the weights), so the average does not cling to the untrained start in a short run.
    """

    def __init__(self, params: list[torch.nn.Parameter], t: TrainConfig) -> None:
        from diffusers.training_utils import EMAModel

        self.params = params
        self.every = t.ema_update_every
        self.ema = EMAModel(params, decay=t.ema_decay)

    def after_step(self, step: int) -> None:
        """Fold in the weights after optimizer step `step` (counted from 1) when an update is due."""
        if step % self.every == 0:
            self.ema.step(self.params)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the block; the trained ones back afterwards, bit for bit."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)
        self.ema.to(self.params[0].device)
