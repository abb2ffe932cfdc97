"""Generation with LoRAs: loaded once and blended by weight, weight 0 is the base model exactly, prompt tags equal
sliders, bad files fail with one line and leave the pipeline usable, PNG parameters read back.

`trained_loras` is imported by test_app.py and test_app_browser.py: the two LoRAs are trained once per session.
"""

from __future__ import annotations

import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdlora.adapters.files import file_hashes
from sdlora.errors import GenerationError, LoraFileError
from sdlora.generate.pipeline import (
    GenerationParams,
    LoraCache,
    LoraSpec,
    a1111_parameters,
    generate_images,
    list_lora_files,
    parse_a1111_parameters,
)

REPO = Path(__file__).resolve().parents[1]
PARAMS = GenerationParams(prompt="zkstyle, a boat", steps=2, width=64, height=64, seed=7)


def trained_loras(tmp_path_factory) -> Path:
    """A folder with two tiny SD1 LoRAs, `alpha/alpha.safetensors` and `beta/beta.safetensors`, trained with
    `sdlora.train.recipe` (2 steps, different seeds), plus the checkpoint folders training leaves. Built once a
    session."""
    folder = tmp_path_factory.getbasetemp() / "trained-loras"
    if (folder / "beta" / "beta.safetensors").is_file():
        return folder
    from sdlora.config import load_config
    from sdlora.train.recipe import train

    data = tmp_path_factory.mktemp("lora-data")
    for src in sorted((REPO / "sample_images").glob("*.png"))[:2]:
        shutil.copy(src, data / src.name)
        shutil.copy(src.with_suffix(".txt"), data / src.with_suffix(".txt").name)
    for seed, name in enumerate(("alpha", "beta")):
        train(load_config(None, [
            f'data.dirs=["{data.as_posix()}"]', "data.resolution=64", "data.min_bucket_reso=64",
            "data.max_bucket_reso=64", "data.cache_latents=none", "lora.rank=4", "lora.alpha=4.0",
            "train.batch_size=2", "train.learning_rate=1e-2", "train.max_train_steps=2", "train.save_every_n_epochs=0",
            f"train.seed={seed}", f'train.output_dir="{(folder / name).as_posix()}"', f'train.output_name="{name}"',
            "export.dtype=fp32",
        ]))
    return folder


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return trained_loras(tmp_path_factory)


@pytest.fixture(scope="module")
def alpha(lora_dir):
    return lora_dir / "alpha" / "alpha.safetensors"


@pytest.fixture(scope="module")
def beta(lora_dir):
    return lora_dir / "beta" / "beta.safetensors"


def render(pipe, cache, loras=(), params=PARAMS, **kwargs) -> bytes:
    return generate_images(pipe, cache, params, list(loras), **kwargs).images[0].tobytes()


@pytest.fixture(scope="module")
def base_image(pipe, cache):
    return render(pipe, cache)


@pytest.mark.smoke
def test_weight_zero_is_the_base_model_bit_for_bit(pipe, cache, alpha, beta, base_image):
    assert render(pipe, cache, [LoraSpec(alpha, 1.0)]) != base_image
    assert render(pipe, cache, [LoraSpec(alpha, 0.0)]) == base_image
    assert render(pipe, cache, [LoraSpec(alpha, 0.0), LoraSpec(beta, 0.0)]) == base_image
    assert render(pipe, cache, [LoraSpec(alpha, 0.0, te_weight=0.0)]) == base_image
    assert render(pipe, cache) == base_image  # no LoRA listed: none active, though both stay loaded


def test_per_module_alphas_scale_their_own_module(pipe, cache, alpha, tmp_path):
    # Files with differing alphas (resized with --energy, kohya's dynamic resize) must mean alpha / rank per module:
    # the same file with every alpha / rank folded into the up weights gives the same model.
    tensors = load_file(str(alpha))
    with safe_open(str(alpha), "pt") as f:
        metadata = f.metadata()
    changed, folded = dict(tensors), dict(tensors)
    for i, key in enumerate(sorted(k for k in tensors if k.endswith(".alpha"))[::2]):
        factor = 4.0 if i % 2 else 0.25
        changed[key] = tensors[key] * factor
        up = key.replace(".alpha", ".lora_up.weight")
        folded[up] = tensors[up] * factor
    outputs = []
    torch.manual_seed(0)
    latents, states = torch.randn(1, 4, 8, 8), torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
    for name, file_tensors in (("changed", changed), ("folded", folded)):
        save_file(file_tensors, str(tmp_path / f"{name}.safetensors"), metadata)
        cache.activate([LoraSpec(tmp_path / f"{name}.safetensors")])
        with torch.no_grad():
            outputs.append(pipe.unet(latents, torch.tensor([500]), states).sample)
    cache.activate([])
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=1e-5)


def test_weights_blend_without_reloading(pipe, cache, alpha, beta, monkeypatch):
    cache.activate([LoraSpec(alpha, 1.0), LoraSpec(beta, 1.0)])  # both loaded (a no-op when earlier tests did)
    calls = []
    monkeypatch.setattr(pipe, "load_lora_weights", lambda *a, **k: calls.append(a))
    images = {w: render(pipe, cache, [LoraSpec(alpha, w)]) for w in (0.5, 1.0, -1.0)}
    assert len(set(images.values())) == 3
    both = render(pipe, cache, [LoraSpec(alpha, 0.5), LoraSpec(beta, 0.5)])
    assert both not in images.values()
    assert render(pipe, cache, [LoraSpec(alpha, 0.5)]) == images[0.5]  # deterministic, order of calls irrelevant
    assert calls == []  # switching weights never reloads a file


def test_lora_tags_equal_sliders(pipe, cache, alpha, beta, lora_dir):
    sliders = render(pipe, cache, [LoraSpec(alpha, 0.8), LoraSpec(beta, -0.5)])
    tagged = replace(PARAMS, prompt="zkstyle, a boat <lora:alpha:0.8> <lora: beta :-0.5>")
    assert render(pipe, cache, params=tagged, lora_dir=lora_dir) == sliders
    mixed = replace(PARAMS, prompt="<lora:alpha:0.8> zkstyle, a boat")
    assert render(pipe, cache, [LoraSpec(beta, -0.5)], params=mixed, lora_dir=lora_dir) == sliders
    # Separate text-encoder and UNet weights, A1111 order <lora:name:te:unet>.
    split = render(pipe, cache, [LoraSpec(alpha, 1.0, te_weight=0.0)])
    assert split != render(pipe, cache, [LoraSpec(alpha, 1.0)])
    tag = replace(PARAMS, prompt="zkstyle, a boat <lora:alpha:0:1>")
    assert render(pipe, cache, params=tag, lora_dir=lora_dir) == split


def test_unknown_and_malformed_tags_are_warnings(pipe, cache, lora_dir, base_image):
    params = replace(PARAMS, prompt="zkstyle, a boat <lora:nope:1> <lora:alpha:lots>")
    result = generate_images(pipe, cache, params, lora_dir=lora_dir)
    assert len(result.warnings) == 2
    assert any("'nope' not found" in w for w in result.warnings) and any("'lots'" in w for w in result.warnings)


def test_png_parameters_round_trip(pipe, cache, alpha, beta, lora_dir, tmp_path):
    params = replace(PARAMS, prompt="zkstyle, a boat <lora:beta:0.5>", negative_prompt="blurry, dark",
                     sampler="dpmpp_2m_karras", cfg=5.5, seed=-1)
    result = generate_images(pipe, cache, params, [LoraSpec(alpha, 0.8)], count=2, out_dir=tmp_path,
                             lora_dir=lora_dir, model_name="tiny-sd15")
    assert [p.name for p in result.paths] == [f"00001-{result.seeds[0]}.png", f"00002-{result.seeds[1]}.png"]
    assert result.seeds[1] == result.seeds[0] + 1
    with Image.open(result.paths[1]) as png:
        text = png.info["parameters"]
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in text
    read, fields = parse_a1111_parameters(text)
    assert read == replace(params, prompt="zkstyle, a boat <lora:beta:0.5> <lora:alpha:0.8>", seed=result.seeds[1])
    hashes = dict(item.split(": ") for item in fields["Lora hashes"].split(", "))
    assert hashes == {"beta": file_hashes(beta)["sshs_model_hash"][:12],
                      "alpha": file_hashes(alpha)["sshs_model_hash"][:12]}
    assert fields["Model"] == "tiny-sd15"
    # The PNG alone reproduces the image: its prompt carries every LoRA as a tag.
    again = generate_images(pipe, cache, read, lora_dir=lora_dir)
    assert again.images[0].tobytes() == result.images[1].tobytes()


@pytest.mark.parametrize("text,expected", [
    ("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x768, Model: x",
     dict(prompt="a cat", sampler="euler_a", seed=5, width=512, height=768)),
    ("a cat,\nwith a hat\nNegative prompt: ugly,\nblurry\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 4.5, "
     'Seed: 1, Size: 64x64, Lora hashes: "a: 0123456789ab, b: ba9876543210"',
     dict(prompt="a cat,\nwith a hat", negative_prompt="ugly,\nblurry", steps=30, cfg=4.5, sampler="dpmpp_2m_karras")),
    ("just a prompt", dict(prompt="just a prompt")),
    ("x\nSteps: 8, Sampler: Heun, Schedule type: Automatic, CFG scale: 1, Seed: 2, Size: 64x64",
     dict(steps=8, sampler="euler")),
])
def test_parse_a1111_parameters(text, expected):
    params, fields = parse_a1111_parameters(text)
    for key, value in expected.items():
        assert getattr(params, key) == value, key
    assert params == parse_a1111_parameters(a1111_parameters(params))[0]


def test_sampler_names_survive_the_round_trip():
    from sdlora.config import SAMPLERS

    for sampler in SAMPLERS:
        params = replace(PARAMS, sampler=sampler)
        assert parse_a1111_parameters(a1111_parameters(params))[0] == params


def _bad_files(alpha: Path, folder: Path) -> dict[str, Path]:
    data = alpha.read_bytes()
    tensors = load_file(str(alpha))
    files = {"truncated": folder / "truncated.safetensors", "pickle": folder / "pickle.safetensors",
             "pickle_suffix": folder / "model.ckpt", "not_lora": folder / "not_lora.safetensors",
             "wrong_arch": folder / "wrong_arch.safetensors", "wrong_shapes": folder / "wrong_shapes.safetensors",
             "missing": folder / "missing.safetensors"}
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["pickle"].write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": [1.0]}))
    files["pickle_suffix"].write_bytes(pickle.dumps({}))
    save_file({"model.weight": torch.zeros(2)}, str(files["not_lora"]))
    save_file(tensors, str(files["wrong_arch"]), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    down = sorted(k for k in tensors if k.endswith("lora_down.weight"))[-1]
    shape = list(tensors[down].shape)
    shape[1] += 3
    save_file({**tensors, down: torch.zeros(shape)}, str(files["wrong_shapes"]))
    return files


@pytest.mark.parametrize("kind", ["truncated", "pickle", "pickle_suffix", "not_lora", "wrong_arch", "wrong_shapes",
                                  "missing"])
def test_bad_lora_files_fail_in_one_line_and_leave_the_pipeline_usable(pipe, cache, alpha, base_image, tmp_path,
                                                                         kind):
    good = render(pipe, cache, [LoraSpec(alpha, 1.0)])
    bad = _bad_files(alpha, tmp_path)[kind]
    with pytest.raises(LoraFileError) as err:
        render(pipe, cache, [LoraSpec(alpha, 1.0), LoraSpec(bad, 1.0)])
    message = str(err.value)
    assert "\n" not in message and str(bad.name) in message and len(message) < 300
    assert render(pipe, cache) == base_image
    assert render(pipe, cache, [LoraSpec(alpha, 1.0)]) == good


def test_changed_file_is_loaded_again(pipe, alpha, beta, tmp_path):
    cache = LoraCache(pipe)
    path = tmp_path / "lora.safetensors"
    shutil.copy(alpha, path)
    first = render(pipe, cache, [LoraSpec(path, 1.0)])
    shutil.copy(beta, path)  # retrained under the same name
    assert render(pipe, cache, [LoraSpec(path, 1.0)]) == render(pipe, cache, [LoraSpec(beta, 1.0)])
    assert render(pipe, cache, [LoraSpec(path, 1.0)]) != first


def test_list_lora_files_skips_checkpoints_hidden_and_escaping_links(lora_dir, tmp_path):
    names = [p.relative_to(lora_dir).as_posix() for p in list_lora_files(lora_dir)]
    assert names == ["alpha/alpha.safetensors", "beta/beta.safetensors"]  # not checkpoint-2/adapters.safetensors
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"")
    folder = tmp_path / "loras"
    (folder / ".hidden").mkdir(parents=True)
    (folder / ".hidden" / "x.safetensors").write_bytes(b"")
    (folder / "link.safetensors").symlink_to(outside)
    (folder / "ok.safetensors").write_bytes(b"")
    assert [p.name for p in list_lora_files(folder)] == ["ok.safetensors"]


def test_lcm_sampler_and_setting_checks(pipe, cache):
    image = generate_images(pipe, cache, replace(PARAMS, sampler="lcm", steps=4, cfg=1.5)).images[0]
    assert image.size == (64, 64)
    for bad in (dict(width=100), dict(height=32), dict(steps=0), dict(sampler="heun"), dict(sampler="lcm", steps=60)):
        with pytest.raises(GenerationError):
            generate_images(pipe, cache, replace(PARAMS, **bad))


STRAY = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q"  # the tiny UNet has 2 down blocks


def _with_stray_module(alpha: Path, folder: Path, alphas: str) -> tuple[Path, Path]:
    """(alpha's file plus one module the model lacks, the same file without it), with the file's one alpha or with
    alphas that differ per module: diffusers and our own reader load those two kinds of file."""
    tensors = load_file(str(alpha))
    if alphas == "varied":
        for i, key in enumerate(sorted(k for k in tensors if k.endswith(".alpha"))):
            tensors[key] = tensors[key] * (1 + i % 3)
    clean, stray = folder / f"clean_{alphas}.safetensors", folder / f"stray_{alphas}.safetensors"
    save_file(tensors, str(clean))
    save_file({**tensors, f"{STRAY}.lora_down.weight": torch.ones(4, 32), f"{STRAY}.lora_up.weight": torch.ones(32, 4),
               f"{STRAY}.alpha": torch.tensor(4.0)}, str(stray))
    return stray, clean


@pytest.mark.smoke
@pytest.mark.parametrize("alphas", ["uniform", "varied"])
def test_a_stray_module_is_named_in_a_warning_or_refused_with_strict(pipe, alpha, base_image, tmp_path, alphas):
    stray, clean = _with_stray_module(alpha, tmp_path, alphas)
    modules = len({k.rsplit(".", 2)[0] for k in load_file(str(stray)) if "lora_down" in k})
    result = generate_images(pipe, LoraCache(pipe), PARAMS, [LoraSpec(stray)])
    assert result.warnings == [f"{stray.name}: 1 of {modules} LoRA modules match no module of this model: {STRAY}; "
                               "they are left out (--strict refuses such files)"]
    # Everything else is loaded: the image is the one of the file without the stray module.
    image = result.images[0].tobytes()
    assert image != base_image and image == render(pipe, LoraCache(pipe), [LoraSpec(clean)])

    adapters = pipe.get_list_adapters()
    with pytest.raises(LoraFileError) as err:
        LoraCache(pipe, strict=True).load(stray)
    assert "\n" not in str(err.value) and STRAY in str(err.value) and "--strict" in str(err.value)
    assert pipe.get_list_adapters() == adapters  # nothing of the refused file is left in the pipeline
