"""model.clip_skip and `sdlora generate --clip-skip`: the hidden layer kohya and A1111 read, in training and in
generation, for SD 1.x, and SDXL's penultimate layer."""

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sdlora.config import load_config
from sdlora.errors import ConfigError, GenerationError, ModelError
from sdlora.generate.pipeline import (
    GenerationParams,
    a1111_parameters,
    build_pipeline,
    parse_a1111_parameters,
)
from sdlora.generate.prompt import encode_prompt_embeds
from sdlora.models.loading import encode_prompt, load_base_model, tokenize

PROMPT = "zkstyle, a small pink star in the center"


@torch.no_grad()
def test_sd1_clip_skip_is_the_final_norm_of_the_hidden_state_n_layers_from_the_end(sd15_path):
    full = load_base_model(str(sd15_path))
    cut = load_base_model(str(sd15_path), clip_skip=3)
    ids = tokenize(full.tokenizers, [PROMPT])
    encoder = full.text_encoders[0]
    hidden = encoder(ids[0], output_hidden_states=True).hidden_states
    expected = encoder.final_layer_norm(hidden[-3])
    trained, _ = encode_prompt("sd1", cut.text_encoders, ids)  # what training, caches and validation read
    torch.testing.assert_close(trained, expected)
    assert not torch.allclose(trained, encode_prompt("sd1", full.text_encoders, ids)[0])
    assert cut.text_encoders[0].config.num_hidden_layers == encoder.config.num_hidden_layers - 2
    # Generation picks the same state from the whole encoder. (diffusers' own clip_skip, N - 1, cannot be compared:
    # it reads text_encoder.text_model, which transformers 5's CLIPTextModel no longer has.)
    pipe = build_pipeline("sd1", full.unet, full.vae, full.text_encoders, full.tokenizers, full.scheduler_config)
    torch.testing.assert_close(encode_prompt_embeds(pipe, PROMPT, "", clip_skip=3)["prompt_embeds"], expected)


@torch.no_grad()
def test_sdxl_reads_the_penultimate_layer_and_refuses_clip_skip(sdxl_path):
    base = load_base_model(str(sdxl_path))
    ids = tokenize(base.tokenizers, [PROMPT])
    states, _ = encode_prompt("sdxl", base.text_encoders, ids)
    first = base.text_encoders[0](ids[0], output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(states[..., :first.shape[-1]], first)
    with pytest.raises(ModelError, match="model.clip_skip: SDXL"):
        load_base_model(str(sdxl_path), clip_skip=2)
    pipe = build_pipeline("sdxl", base.unet, base.vae, base.text_encoders, base.tokenizers, base.scheduler_config)
    with pytest.raises(GenerationError, match="SDXL"):
        encode_prompt_embeds(pipe, PROMPT, "", clip_skip=2)


def test_config_and_png_parameters():
    with pytest.raises(ConfigError, match="model.clip_skip: must be at least 1"):
        load_config(None, ["model.clip_skip=0"])
    params = GenerationParams(prompt=PROMPT, clip_skip=2)
    text = a1111_parameters(params, "toy-sd15")
    assert text.endswith("Model: toy-sd15, Clip skip: 2")
    assert parse_a1111_parameters(text)[0].clip_skip == 2
    assert "Clip skip" not in a1111_parameters(GenerationParams(prompt=PROMPT), "toy-sd15")  # as A1111 writes 1


def test_training_with_clip_skip_records_it(dataset, tmp_path):
    from sdlora.train.recipe import train
    from tests.test_train import make_cfg

    path = train(make_cfg(dataset, tmp_path, "train.max_train_steps=2", "model.clip_skip=2",
                          'sample.prompts=["zkstyle, a cat"]', "sample.steps=1"))
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_clip_skip"] == "2" and meta["modelspec.encoder_layer"] == "2"
    layers = load_base_model("tiny-sd15").text_encoders[0].config.num_hidden_layers
    assert any(f"encoder_layers_{layers - 2}_" in k for k in keys)
    assert not any(f"encoder_layers_{layers - 1}_" in k for k in keys)  # the skipped layer is not trained
    with Image.open(tmp_path / "samples" / "step00000002-00.png") as png:
        assert "Clip skip: 2" in png.text["parameters"]
