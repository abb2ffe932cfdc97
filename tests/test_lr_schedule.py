"""The learning-rate schedules: diffusers' schedules with kohya's restarts and power."""

import pytest
import torch

from sdlora.config import load_config
from sdlora.errors import ConfigError
from sdlora.train.optimizer import make_lr_scheduler


def lrs(*overrides: str) -> list[float]:
    t = load_config(None, ["train.max_train_steps=100", "train.learning_rate=1.0", *overrides]).train
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.learning_rate)
    schedule = make_lr_scheduler(t, optimizer)
    values = []
    for _ in range(t.max_train_steps):
        values.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return values


def test_cosine_with_restarts_starts_over_num_cycles_times():
    two = lrs("train.lr_scheduler=cosine_with_restarts", "train.lr_scheduler_num_cycles=2")
    assert two[0] == two[50] == 1.0  # a hard restart half way
    assert two[49] < 0.01 and two[25] == pytest.approx(0.5, abs=0.02)
    one = lrs("train.lr_scheduler=cosine_with_restarts")
    assert one[50] == pytest.approx(0.5, abs=0.02) and one[99] < 0.01


def test_polynomial_follows_its_power_after_the_warmup():
    square = lrs("train.lr_scheduler=polynomial", "train.lr_scheduler_power=2.0", "train.lr_warmup_steps=10")
    assert square[5] == pytest.approx(0.5) and square[10] == pytest.approx(1.0)
    assert square[55] == pytest.approx(0.5**2, abs=1e-6)  # half of the decay left: (1/2) ** power
    linear = lrs("train.lr_scheduler=polynomial", "train.lr_warmup_steps=10")
    assert linear[55] == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("override, key", [("train.lr_scheduler_num_cycles=0", "train.lr_scheduler_num_cycles"),
                                           ("train.lr_scheduler_power=0.0", "train.lr_scheduler_power")])
def test_bad_schedule_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])
