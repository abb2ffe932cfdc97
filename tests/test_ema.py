"""train.ema_decay: the exported LoRA is the EMA recurrence over the trained weights, and resume keeps it exact."""

import pytest
import torch
from safetensors.torch import load_file

from sdlora.config import load_config
from sdlora.errors import ConfigError
from sdlora.train import checkpoint as ckpt
from sdlora.train import plan
from sdlora.train.ema import AdapterEMA
from sdlora.train.recipe import train
from tests.test_train import assert_same, make_cfg

pytestmark = pytest.mark.usefixtures("single_thread_plain_kernels")


def test_average_follows_the_recurrence_and_applied_restores_bit_for_bit():
    t = load_config(None, ["train.ema_decay=0.9", "train.ema_update_every=2"]).train
    param = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEMA([param], t)
    expected, updates = torch.zeros(3), 0
    for step in range(1, 31):
        with torch.no_grad():
            param.add_(torch.full((3,), float(step)))
        ema.after_step(step)
        if step % 2 == 0:  # every second step: the n-th update uses min(0.9, (1 + n - 1) / (10 + n - 1)), 0 first
            updates += 1
            n = updates - 1
            decay = 0.0 if n == 0 else min(0.9, (1 + n) / (10 + n))
            expected = decay * expected + (1 - decay) * param.detach()
    trained = param.detach().clone()
    with ema.applied():
        torch.testing.assert_close(param.detach(), expected)
    assert torch.equal(param.detach(), trained)


def test_exported_file_is_the_average_and_resume_is_exact(dataset, tmp_path):
    """A 6-step run with EMA: its checkpoint's raw weights are not the file's (the file is the average), and a run
    resumed from step 3 writes the same file as the uninterrupted one."""
    ema = ("train.ema_decay=0.5", "train.checkpoint_every_n_steps=3", "train.save_last_k=0")
    straight = train(make_cfg(dataset, tmp_path / "a", *ema))
    raw = load_file(str(tmp_path / "a" / "checkpoint-6" / "adapters.safetensors"))
    exported = load_file(str(straight))
    raw_key = next(k for k in raw if k.startswith("unet.") and ".attn2.to_k.lora_B" in k)
    up = "lora_unet_" + raw_key.removeprefix("unet.").split(".lora_B")[0].replace(".", "_") + ".lora_up.weight"
    assert not torch.allclose(exported[up], raw[raw_key]), "the file holds the raw weights, not the average"
    assert ckpt.load_extra(tmp_path / "a" / "checkpoint-3", "ema")["optimization_step"] == 3
    resumed = train(make_cfg(dataset, tmp_path / "b", *ema), resume=str(tmp_path / "a" / "checkpoint-3"))
    assert_same(load_file(str(straight)), load_file(str(resumed)))


def test_the_planner_counts_the_average(sd15_path):
    base = [f'model.base_model="{sd15_path}"', 'data.dirs=["unused"]', "data.resolution=64", "data.min_bucket_reso=64",
            "train.mixed_precision=fp16"]
    cfg, with_ema = load_config(None, base), load_config(None, [*base, "train.ema_decay=0.99"])
    traced = plan.trace(cfg)
    assert plan.estimate(with_ema, traced).adapter - plan.estimate(cfg, traced).adapter == traced.lora_params * 4


def test_adalora_with_ema_is_refused():
    with pytest.raises(ConfigError, match="train.ema_decay: AdaLoRA prunes ranks"):
        load_config(None, ["train.ema_decay=0.9", "lora.method=adalora"])
