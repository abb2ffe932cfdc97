"""LoRA tools: merge into a base model, merge LoRAs, resize, extract.

Every check is a property of the math, with the expected values computed here in float64 from the tensors in
the files (written files are read back with safetensors directly): a concatenated merge's delta is the weighted
sum of the inputs' deltas, SVD errors are the ones the singular values predict, a full-rank resize and an
extraction of a low-rank difference are lossless, and a merged base model has W + sum of weighted deltas and
renders what the pipeline renders with the LoRAs switched on.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdlora.adapters.export import arch_metadata, from_kohya_state_dict, save_kohya_lora, to_peft_state_dict
from sdlora.adapters.lora import LoraWeights, target_module_names
from sdlora.adapters.tools import choose_rank, merge_loras, read_lora, resize_lora
from sdlora.atomic import save_safetensors
from sdlora.cli import main
from sdlora.errors import LoraFileError

SD1 = arch_metadata("sd1")  # tiny models have no telling widths: the metadata names the architecture


pytestmark = pytest.mark.usefixtures("single_thread_plain_kernels")


@pytest.fixture(scope="module")
def sd15(sd15_path):
    from sdlora.models.loading import load_base_model

    return load_base_model(str(sd15_path))


def parts(model):
    return {"unet": model.unet, "text_encoder": model.text_encoders[0]}


def random_layers(model, targets: str, rank: int, alpha: float, seed: int,
                  only: tuple[str, ...] = ()) -> dict[str, dict[str, LoraWeights]]:
    """Random LoRA weights (both factors non-zero) on the training targets of a loaded model (those whose names
    contain one of `only`, when given)."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for component, module in parts(model).items():
        modules = dict(module.named_modules())
        layers[component] = {}
        for name in target_module_names(module, component, targets):
            if only and not any(part in name for part in only):
                continue
            m = modules[name]
            if isinstance(m, torch.nn.Linear):
                down_shape, up_shape = (rank, m.in_features), (m.out_features, rank)
            else:
                down_shape, up_shape = (rank, m.in_channels, *m.kernel_size), (m.out_channels, rank, 1, 1)
            layers[component][name] = LoraWeights(torch.randn(down_shape, generator=generator) * 0.1,
                                                  torch.randn(up_shape, generator=generator) * 0.1, alpha)
    return layers


def delta_of(weights: LoraWeights) -> torch.Tensor:
    """(alpha / r) * up @ down in float64, as the weight's shape."""
    down, up = weights.down.double(), weights.up.double()
    product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return (weights.alpha / down.shape[0]) * product.reshape(up.shape[0], *down.shape[1:])


def file_deltas(path) -> dict[str, torch.Tensor]:
    """{kohya module name: delta} of a kohya file, straight from its tensors."""
    sd = load_file(str(path))
    out = {}
    for key in sd:
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            out[name] = delta_of(LoraWeights(sd[key], sd[f"{name}.lora_up.weight"], sd[f"{name}.alpha"].item()))
    return out


def write_alpha2_lora(path, modules) -> dict[str, torch.Tensor]:
    """Write (kohya name, down, up) modules, each with alpha 2, as an SD1 LoRA file; returns its tensors."""
    tensors = {}
    for name, down, up in modules:
        tensors.update({f"{name}.lora_down.weight": down.contiguous(), f"{name}.lora_up.weight": up.contiguous(),
                        f"{name}.alpha": torch.tensor(2.0)})
    save_safetensors(tensors, path, SD1)
    return tensors


def metadata_of(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def loras(sd15, tmp_path_factory):
    """Two fp32 LoRA files: A rank 4 alpha 2 on attention + MLP + convs (4-D), B rank 2 alpha 3 on attention."""
    folder = tmp_path_factory.mktemp("loras")
    a = save_kohya_lora(random_layers(sd15, "all", 4, 2.0, 0), "sd1", folder / "a.safetensors", SD1, torch.float32)
    b = save_kohya_lora(random_layers(sd15, "attn", 2, 3.0, 1), "sd1", folder / "b.safetensors", SD1, torch.float32)
    return a, b


@pytest.fixture(scope="module")
def small_loras(sd15, tmp_path_factory):
    """Like `loras` on a few blocks only: diffusers takes ~10 ms per module to load a LoRA file."""
    folder = tmp_path_factory.mktemp("small")
    a = random_layers(sd15, "all", 4, 2.0, 3, only=("down_blocks.1.", "mid_block.", "layers.0."))
    b = random_layers(sd15, "attn", 2, 3.0, 4, only=("down_blocks.1.", "up_blocks.2.", "layers.0.", "layers.1."))
    return (save_kohya_lora(a, "sd1", folder / "a.safetensors", SD1, torch.float32),
            save_kohya_lora(b, "sd1", folder / "b.safetensors", SD1, torch.float32))


def assert_close(actual, expected, name="", tol=1e-6):
    """Equal up to fp32 rounding: |difference| <= tol * the largest entry of the expected delta."""
    scale = float(expected.abs().max())
    assert float((actual.double() - expected.double()).abs().max()) <= tol * max(scale, 1e-12), name


# ----------------------------------------------------------------------------------------------------------------
# merge-loras
# ----------------------------------------------------------------------------------------------------------------


def test_concat_merge_is_the_weighted_sum(loras, tmp_path):
    a, b = loras
    out = tmp_path / "merged.safetensors"
    assert main(["merge-loras", f"{a}:0.7", f"{b}:-0.5", "--out", str(out), "--dtype", "fp32"]) == 0
    da, db, merged = file_deltas(a), file_deltas(b), file_deltas(out)
    assert set(merged) == set(da) | set(db) and len(db) < len(da)  # B adapts a subset: union of the modules
    for name, delta in merged.items():
        expected = 0.7 * da[name] - 0.5 * db[name] if name in db else 0.7 * da[name]
        assert_close(delta, expected, name)
    sd = load_file(str(out))
    name = next(iter(db))
    assert sd[f"{name}.lora_down.weight"].shape[0] == 6 and sd[f"{name}.alpha"].item() == 6  # ranks 4 + 2, scale 1
    meta = metadata_of(out)
    sources = json.loads(meta["sdlora_merged_from"])
    assert [(s["file"], s["weight"]) for s in sources] == [("a.safetensors", 0.7), ("b.safetensors", -0.5)]
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_base_model_version"] == "sd_v1"
    assert read_lora(out).arch == "sd1"  # the output is recognised like the inputs


def test_svd_merge_error_is_what_the_singular_values_say(loras):
    a, b = read_lora(loras[0]), read_lora(loras[1])
    merged, report = merge_loras([(a, 1.0), (b, 0.5)], rank=3)
    errors = {m.name: m for m in report.modules}
    for name, weights in merged.items():
        exact = delta_of(a.modules[name]) + (0.5 * delta_of(b.modules[name]) if name in b.modules else 0)
        s = torch.linalg.svdvals(exact.reshape(exact.shape[0], -1))
        assert weights.rank == 3
        expected = math.sqrt(float((s[3:] ** 2).sum() / (s ** 2).sum()))
        assert errors[name].relative_error == pytest.approx(expected, abs=1e-6), name
        actual = float(torch.linalg.norm(delta_of(weights) - exact) / torch.linalg.norm(exact))
        assert actual == pytest.approx(expected, abs=1e-6), name  # and the written factors have that error


# ----------------------------------------------------------------------------------------------------------------
# resize
# ----------------------------------------------------------------------------------------------------------------


def test_resize_to_full_rank_is_lossless(loras, tmp_path, capsys):
    a = loras[0]
    out = tmp_path / "full.safetensors"
    assert main(["resize", str(a), "--rank", "4", "--out", str(out), "--dtype", "fp32"]) == 0
    before, after = file_deltas(a), file_deltas(out)
    assert set(after) == set(before)
    for name, delta in before.items():
        assert after[name].shape == delta.shape  # conv LoRAs come back 4-D
        assert_close(after[name], delta, name, tol=1e-5)
    printed = capsys.readouterr().out
    overall = float(printed.split("overall ")[1].split(";")[0])
    assert overall < 1e-6 and "rank 4 -> 4" in printed
    sd_in, sd_out = load_file(str(a)), load_file(str(out))
    conv = next(k for k, v in sd_in.items() if k.endswith("lora_down.weight") and v.dim() == 4 and v.shape[-1] == 3)
    assert sd_out[conv].shape == sd_in[conv].shape
    assert metadata_of(out)["ss_network_dim"] == "4" and metadata_of(out)["ss_network_alpha"] == "2"


def test_resize_to_lower_rank_reports_the_svd_error(loras):
    lora = read_lora(loras[0])
    resized, report = resize_lora(lora, rank=2)
    norms, errors = 0.0, 0.0
    for module in report.modules:
        exact = delta_of(lora.modules[module.name])
        s = torch.linalg.svdvals(exact.reshape(exact.shape[0], -1))
        expected = math.sqrt(float((s[2:] ** 2).sum() / (s ** 2).sum()))
        assert module.relative_error == pytest.approx(expected, abs=1e-6), module.name
        written = resized[module.name]
        assert written.rank == 2 and written.alpha == pytest.approx(1.0)  # scale alpha / rank = 0.5 kept
        assert float(torch.linalg.norm(delta_of(written) - exact)) == pytest.approx(module.error, rel=1e-5, abs=1e-9)
        norms += float((s ** 2).sum())
        errors += float((s[2:] ** 2).sum())
    assert report.relative_error == pytest.approx(math.sqrt(errors / norms), rel=1e-5)
    assert 0.1 < report.relative_error < 0.9  # random rank-4 deltas lose a real part at rank 2


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))[0]


def test_energy_mode_picks_the_smallest_rank_with_that_energy(tmp_path):
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])  # energy fractions 0.753, 0.941, 0.988, 1
    assert [choose_rank(s, energy=e) for e in (0.5, 0.7, 0.9, 0.95, 0.99, 1.0)] == [1, 1, 2, 3, 4, 4]
    assert choose_rank(s, rank=8) == 4 and choose_rank(s, rank=2) == 2
    with pytest.raises(ValueError):
        choose_rank(s, rank=2, energy=0.5)

    # A linear and a 3x3 conv module whose deltas have exactly these singular values (times alpha / r = 0.5).
    linear_up, linear_down = orthonormal(8, 4, 0) * s, orthonormal(12, 4, 1).T
    conv_up, conv_down = (orthonormal(8, 4, 2) * s)[:, :, None, None], orthonormal(27, 4, 3).T.reshape(4, 3, 3, 3)
    tensors = write_alpha2_lora(tmp_path / "known.safetensors", [
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", linear_down, linear_up),
        ("lora_unet_down_blocks_0_resnets_0_conv1", conv_down, conv_up)])
    out = tmp_path / "energy.safetensors"
    assert main(["resize", str(tmp_path / "known.safetensors"), "--energy", "0.95", "--out", str(out),
                 "--dtype", "fp32"]) == 0
    sd = load_file(str(out))
    assert {k: v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")} == {
        k: 3 for k in tensors if k.endswith("lora_down.weight")}
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (3, 3, 3, 3)
    _, report = resize_lora(read_lora(tmp_path / "known.safetensors"), energy=0.95)
    for module in report.modules:
        assert module.relative_error == pytest.approx(math.sqrt(0.25 / 21.25), abs=1e-6)
    assert metadata_of(out)["ss_network_dim"] == "3"


def test_resized_ranks_differ_but_the_file_has_one_alpha(tmp_path):
    # diffusers applies a file's most common alpha to every module, so per-module alphas would load mis-scaled.
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_"
    write_alpha2_lora(tmp_path / "in.safetensors", [
        (f"{prefix}{leaf}", orthonormal(12, 4, 2 * i).T, orthonormal(8, 4, 2 * i + 1) * torch.tensor(s))
        for i, (leaf, s) in enumerate((("to_q", [4.0, 2.0, 1.0, 0.5]), ("to_k", [4.0, 0.1, 0.1, 0.1])))])
    out = tmp_path / "out.safetensors"
    assert main(["resize", str(tmp_path / "in.safetensors"), "--energy", "0.95", "--out", str(out),
                 "--dtype", "fp32"]) == 0
    sd = load_file(str(out))
    assert {k: v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")} == {
        f"{prefix}to_q.lora_down.weight": 3, f"{prefix}to_k.lora_down.weight": 1}
    assert len({v.item() for k, v in sd.items() if k.endswith(".alpha")}) == 1
    before, after = file_deltas(tmp_path / "in.safetensors"), file_deltas(out)
    for name, delta in before.items():  # the deltas are the SVD cuts of the input's, whatever alpha holds
        assert torch.linalg.matrix_norm(after[name] - delta) <= 0.11 * torch.linalg.matrix_norm(delta)


def test_read_lora_takes_peft_files_by_kohya_name(sd15, tmp_path):
    layers = random_layers(sd15, "attn", 2, 1.0, 5)
    save_safetensors(to_peft_state_dict(layers, torch.float32), tmp_path / "peft.safetensors", SD1)
    kohya = save_kohya_lora(layers, "sd1", tmp_path / "kohya.safetensors", SD1, torch.float32)
    from_peft, expected = read_lora(tmp_path / "peft.safetensors").modules, file_deltas(kohya)
    assert set(from_peft) == set(expected)
    for name, weights in from_peft.items():
        assert_close(delta_of(weights), expected[name], name)


# ----------------------------------------------------------------------------------------------------------------
# Wrong architecture
# ----------------------------------------------------------------------------------------------------------------


def test_lora_for_another_architecture_is_one_line(sd15_path, sd15, loras, tmp_path, capsys):
    from sdlora.generate.merge import merge_into_base

    layers = random_layers(sd15, "attn", 2, 2.0, 7)
    # SD1.5 modules (SDXL has no LDM name for some) in a file whose metadata says SDXL, as an SDXL LoRA says.
    xl = save_kohya_lora(layers, "sd1", tmp_path / "xl.safetensors", arch_metadata("sdxl"), torch.float32)
    with pytest.raises(LoraFileError) as error:
        merge_into_base(str(sd15_path), [(xl, 1.0)], tmp_path / "out")
    assert "\n" not in str(error.value) and "SDXL" in str(error.value) and "SD 1.x" in str(error.value)
    assert "xl.safetensors" in str(error.value)
    capsys.readouterr()
    assert main(["merge-into-base", "--model", str(sd15_path), "--lora", f"{xl}:0.5", "--out",
                 str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdlora: error:") and "\n" not in err and "SDXL" in err and "SD 1.x" in err
    assert not (tmp_path / "out").exists()
    assert main(["merge-loras", str(loras[0]), str(xl), "--out", str(tmp_path / "mix.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "SDXL" in err and "SD 1.x" in err


# ----------------------------------------------------------------------------------------------------------------
# merge-into-base
# ----------------------------------------------------------------------------------------------------------------


def test_merge_into_base_adds_the_deltas_and_renders_like_the_loras(sd15_path, sd15, small_loras, tmp_path):
    from sdlora.generate.pipeline import GenerationParams, LoraCache, LoraSpec, generate, load_pipeline
    from sdlora.models.single_file import single_file_state_dict

    a, b = small_loras
    folder, single = tmp_path / "merged", tmp_path / "merged.safetensors"
    lora_args = ["--model", str(sd15_path), "--lora", f"{a}:0.8", "--lora", f"{b}:-0.5"]
    assert main(["merge-into-base", *lora_args, "--out", str(folder), "--dtype", "fp32"]) == 0
    assert main(["merge-into-base", *lora_args, "--out", str(single)]) == 0  # default dtype: fp16
    merged = load_pipeline(str(folder))
    merged.set_progress_bar_config(disable=True)
    names = {c: [n for n, _ in m.named_modules()] for c, m in parts(sd15).items()}
    la, lb = (from_kohya_state_dict(load_file(str(path)), names) for path in (a, b))
    assert any(w.down.dim() == 4 and w.down.shape[-1] == 3 for w in la["unet"].values())  # 3x3 convs fused too
    for component, model in parts(sd15).items():
        base_state, merged_state = model.state_dict(), getattr(merged, component).state_dict()
        assert set(merged_state) == set(base_state)
        changed = set()
        for name in set(la[component]) | set(lb[component]):
            expected = base_state[f"{name}.weight"].double()
            for layers, weight in ((la, 0.8), (lb, -0.5)):
                if name in layers[component]:
                    expected = expected + weight * delta_of(layers[component][name])
            torch.testing.assert_close(merged_state[f"{name}.weight"].double(), expected, rtol=1e-5, atol=1e-6)
            changed.add(f"{name}.weight")
        assert set(la[component]) & set(lb[component])  # modules both LoRAs change are in the check
        for key in set(base_state) - changed:  # everything else is the base model, bit for bit
            assert torch.equal(merged_state[key], base_state[key]), key
    # The single file holds the same merged weights in the A1111 layout, rounded to fp16.
    expected, _ = single_file_state_dict(merged)
    written = load_file(str(single))
    assert set(written) == set(expected)
    for key, value in expected.items():
        assert torch.equal(written[key], value.to(torch.float16) if value.is_floating_point() else value), key
    assert json.loads((folder / "sdlora_merged_loras.json").read_text())[0]["file"] == "a.safetensors"

    params = GenerationParams(prompt="a red boat", steps=2, width=64, height=64, seed=3)
    pipe = load_pipeline(str(sd15_path))
    pipe.set_progress_bar_config(disable=True)
    cache = LoraCache(pipe)
    cache.activate([LoraSpec(a, 0.8), LoraSpec(b, -0.5)])
    with_loras = np.asarray(generate(pipe, params), dtype=np.int16)
    cache.activate([])
    without = np.asarray(generate(pipe, params), dtype=np.int16)
    fused = np.asarray(generate(merged, params), dtype=np.int16)
    assert np.abs(with_loras - without).max() > 10  # the LoRAs change the image...
    assert np.abs(fused - with_loras).max() <= 1  # ...and the merged model renders the same (fp rounding only)


STRAY = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q"  # the tiny UNet has 2 down blocks


@pytest.mark.parametrize("alphas", ["uniform", "varied"])
def test_merge_into_base_names_a_stray_module_or_refuses_it_with_strict(sd15_path, small_loras, tmp_path, capsys,
                                                                         caplog, alphas):
    tensors = load_file(str(small_loras[1]))  # rank 2, alpha 3 everywhere
    if alphas == "varied":
        for i, key in enumerate(sorted(k for k in tensors if k.endswith(".alpha"))):
            tensors[key] = tensors[key] * (1 + i % 3)
    clean, stray = tmp_path / "clean.safetensors", tmp_path / "stray.safetensors"
    save_safetensors(tensors, clean, SD1)
    save_safetensors({**tensors, f"{STRAY}.lora_down.weight": torch.ones(2, 32),
                      f"{STRAY}.lora_up.weight": torch.ones(32, 2), f"{STRAY}.alpha": torch.tensor(2.0)}, stray, SD1)
    merged = {}
    for name, path in (("stray", stray), ("clean", clean)):
        out = tmp_path / f"{name}-merged.safetensors"
        assert main(["merge-into-base", "--model", str(sd15_path), "--lora", str(path), "--out", str(out)]) == 0
        merged[name] = load_file(str(out))
    notes = [r.getMessage() for r in caplog.records if STRAY in r.getMessage()]
    assert len(notes) == 1 and "stray.safetensors: 1 of" in notes[0] and "--strict" in notes[0]
    assert merged["stray"].keys() == merged["clean"].keys()  # the rest of the file is merged as without the module
    assert all(torch.equal(merged["stray"][k], merged["clean"][k]) for k in merged["clean"])

    capsys.readouterr()
    out = tmp_path / "strict.safetensors"
    assert main(["merge-into-base", "--model", str(sd15_path), "--lora", str(stray), "--out", str(out),
                 "--strict"]) == 1
    last = capsys.readouterr().err.splitlines()[-1]  # in-process, after transformers' loading bars
    assert last.startswith("sdlora: error: ") and STRAY in last and "--strict" in last and not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# extract
# ----------------------------------------------------------------------------------------------------------------


def test_extract_recovers_a_low_rank_difference(sd15_path, sd15, tmp_path, capsys):
    from sdlora.models.single_file import save_single_file

    tuned = copy.deepcopy(sd15)
    known = random_layers(tuned, "attn", 2, 2.0, 11)
    attn_mlp = set(target_module_names(tuned.unet, "unet", "attn_mlp"))
    convs = random_layers(tuned, "all", 2, 2.0, 12)["unet"]  # --conv: what "all" adds to "attn_mlp"
    known["unet"].update({n: w for n, w in convs.items() if n not in attn_mlp})
    untouched = sorted(known["text_encoder"])[:4]  # equal in both models: left out of the LoRA
    for name in untouched:
        del known["text_encoder"][name]
    for component, model in parts(tuned).items():
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, weights in known[component].items():
                modules[name].weight += delta_of(weights).float()
    save_single_file(tuned, tmp_path / "tuned.safetensors")
    out = tmp_path / "extracted.safetensors"
    capsys.readouterr()
    assert main(["extract", "--base", str(sd15_path), "--tuned", str(tmp_path / "tuned.safetensors"), "--rank", "2",
                 "--conv", "--out", str(out), "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert float(printed.split("overall ")[1].split(";")[0]) < 1e-5
    assert f"{len(untouched)} of" in printed and "left out" in printed
    layers = from_kohya_state_dict(load_file(str(out)),
                                   {c: [n for n, _ in m.named_modules()] for c, m in parts(tuned).items()})
    for component in known:
        assert set(layers[component]) == set(known[component]), component
        for name, weights in layers[component].items():
            assert weights.rank == 2
            assert_close(delta_of(weights), delta_of(known[component][name]), name, tol=1e-5)
    meta = metadata_of(out)
    assert json.loads(meta["sdlora_extracted_from"])["tuned"] == "tuned.safetensors"
    assert meta["ss_base_model_version"] == "sd_v1"
