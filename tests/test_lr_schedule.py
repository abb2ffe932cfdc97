"""The learning-rate schedules (diffusers' schedules with kohya's restarts and power) and schedule-free AdamW, which
needs none."""

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


def test_schedule_free_adamw_saves_its_average_and_resumes_exactly(dataset, tmp_path):
    """The file holds the optimizer's average x (not the training iterate y the checkpoint keeps), and leaving
    training mode to save or validate puts the training weights back exactly: resume equals the straight run."""
    from safetensors.torch import load_file
    from test_train import assert_same, make_cfg

    from sdlora.train import checkpoint as ckpt
    from sdlora.train.recipe import train

    common = ["train.optimizer=adamw_schedulefree", "train.lr_warmup_steps=2", "data.validation_split=0.34",
              "train.validate_every_n_steps=2", "train.save_last_k=0", "lora.train_text_encoder=false"]
    straight = train(make_cfg(dataset, tmp_path / "a", *common, "train.checkpoint_every_n_steps=3",
                              "train.save_every_n_steps=3"))
    resumed = train(make_cfg(dataset, tmp_path / "b", *common), resume=str(tmp_path / "a" / "checkpoint-3"))
    assert_same(load_file(str(straight)), load_file(str(resumed)))
    saved = load_file(str(tmp_path / "a" / "lora-step00000003.safetensors"))
    iterate, _, _ = ckpt.load_checkpoint(tmp_path / "a" / "checkpoint-3")
    up = next(k for k in saved if k.endswith("lora_up.weight") and "attn2_to_v" in k)
    assert saved[up].abs().sum() > 0
    trained_up = next(v for k, v in iterate.items() if k.endswith("lora_B.default.weight") and "attn2.to_v" in k)
    assert not torch.equal(saved[up].float(), trained_up.float())  # the average, not the iterate


def test_schedule_free_adamw_refuses_a_schedule_and_ema():
    with pytest.raises(ConfigError, match="train.lr_scheduler: schedule-free AdamW needs none"):
        load_config(None, ["train.optimizer=adamw_schedulefree", "train.lr_scheduler=cosine"])
    with pytest.raises(ConfigError, match="train.ema_decay: schedule-free AdamW already averages"):
        load_config(None, ["train.optimizer=adamw_schedulefree", "train.ema_decay=0.9"])
