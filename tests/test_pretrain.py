"""The toy-world pretraining script runs end to end, resumes exactly, and the shipped model matches its configs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sdlora.models.tiny import TOY_MODELS, build_components, config_dir, shipped_weights
from sdlora.toyworld import pretrain
from sdlora.toyworld.pretrain import PretrainConfig

pytestmark = pytest.mark.usefixtures("single_thread_plain_kernels")

SMALL = PretrainConfig(threads=1, checkpoint_every=2, vae_images=8, vae_steps=3, decoder_steps=2, vae_batch=2,
                       scenes=16, unet_steps=4, unet_batch=2, warmup_steps=2, card_seeds=1, card_scenes=1)


def test_runs_every_stage_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    straight, resumed, ship = tmp_path / "straight", tmp_path / "resumed", tmp_path / "ship"
    pretrain.pretrain(SMALL, straight, ship)

    save = pretrain._checkpoint

    def killed_after_step_2(folder, modules, optimizer, state, ema=None):
        save(folder, modules, optimizer, state, ema)
        if folder.name == "unet" and state["step"] == 2:
            raise KeyboardInterrupt  # a kill right after a checkpoint
    monkeypatch.setattr(pretrain, "_checkpoint", killed_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(SMALL, resumed, stop_after="unet")
    monkeypatch.setattr(pretrain, "_checkpoint", save)
    pretrain.pretrain(SMALL, resumed, stop_after="unet")

    a, b = (load_file(str(run / "unet_final.safetensors")) for run in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((straight / "unet_log.json").read_text())
    assert log["step"] == 4 and log["seconds"] > 0

    unet, vae, text_encoder = build_components("toy-sd15", seed=0)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        weights = load_file(str(ship / f"{name}.safetensors"))
        assert all(v.dtype == torch.float16 for v in weights.values())
        module.load_state_dict(weights, strict=True)
    # The latents' measured spread sets the shipped VAE's scaling factor.
    assert json.loads((ship / "vae.json").read_text())["scaling_factor"] == round(pretrain._scaling_factor(straight), 5)
    card = (ship / "MODEL_CARD.md").read_text()
    assert "| the demo's 12 held-out prompts x 1 seeds | 12 |" in card and "--vae-steps 3" in card


def test_unet_until_ships_an_early_step_and_the_run_goes_on_to_the_same_end(tmp_path):
    straight, early, ship = tmp_path / "straight", tmp_path / "early", tmp_path / "ship"
    pretrain.pretrain(SMALL, straight, stop_after="unet")
    pretrain.pretrain(SMALL, early, ship, unet_until=2)
    assert json.loads((early / "unet_until_2_log.json").read_text())["step"] == 2
    card = (ship / "MODEL_CARD.md").read_text()
    assert "UNet + text encoder: 2 steps" in card and "--unet-until 2" in card
    shipped = load_file(str(ship / "unet.safetensors"))
    pretrain.pretrain(SMALL, early, stop_after="unet")  # the same command without --unet-until goes on
    a, b = (load_file(str(run / "unet_final.safetensors")) for run in (straight, early))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(shipped[k], b[f"unet.{k}"].half()) for k in shipped)


def test_a_folder_refuses_other_settings(tmp_path):
    pretrain._record_config(SMALL, tmp_path)
    with pytest.raises(SystemExit, match="unet_steps"):
        pretrain._record_config(PretrainConfig(**{**SMALL.__dict__, "unet_steps": 5}), tmp_path)


@pytest.mark.parametrize("name", TOY_MODELS)
def test_shipped_weights_match_the_shipped_configs(name):
    unet, vae, text_encoder = build_components(name, seed=0)
    for component, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        weights = load_file(str(shipped_weights(name, component)))
        assert all(v.dtype == torch.float16 and torch.isfinite(v).all() for v in weights.values())
        module.load_state_dict(weights, strict=True)
    card = (config_dir(name) / "MODEL_CARD.md").read_text()
    assert "## Prompt following" in card
