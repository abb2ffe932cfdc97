"""LoHa and LoKr (LyCORIS): trained through peft, exported in LyCORIS' key layout, loaded from anyone's files.

The reference for a file is what ComfyUI does with it: the names its loader reads (comfy/weight_adapter/loha.py and
lokr.py `load`, comfy/lora.py's `.alpha`) and the delta its `calculate_weight` computes, rewritten below from its
code; every trained module's delta (peft's `get_delta_weight`) must be that delta.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdlora.adapters.export import (
    COMPONENTS,
    RunInfo,
    build_metadata,
    from_kohya_state_dict,
    kohya_module_name,
    match_lora_keys,
    save_kohya_lora,
    to_kohya_state_dict,
)
from sdlora.adapters.files import inspect_lora, lycoris_rank
from sdlora.adapters.lora import ADAPTER, inject_lora, lora_layers, trainable_parameters
from sdlora.adapters.methods import adapters_for, read_init_lora
from sdlora.config import load_config
from sdlora.errors import ConfigError, LoraFileError, TrainingError
from sdlora.generate.pipeline import GenerationParams, LoraCache, LoraSpec, generate, load_pipeline
from sdlora.models.ldm_names import unet_layout_from_config
from sdlora.models.loading import load_base_model

pytestmark = pytest.mark.usefixtures("single_thread_plain_kernels")

ARCH = {"tiny-sd15": "sd1", "tiny-sdxl": "sdxl"}
# What ComfyUI's LoHaAdapter.load / LoKrAdapter.load read under "<module>.", and comfy/lora.py's "<module>.alpha".
COMFY_KEYS = {"loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"},
              "lokr": {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"}}


def comfy_delta(sd: dict[str, torch.Tensor], name: str, shape) -> torch.Tensor:
    """ComfyUI's LoHaAdapter / LoKrAdapter.calculate_weight at strength 1 for module `name` of state dict `sd`."""
    def get(part):
        return sd[f"{name}.{part}"].float() if f"{name}.{part}" in sd else None

    alpha = get("alpha")
    if get("hada_w1_a") is not None:
        w1a, w1b, w2a, w2b, t1, t2 = (get(p) for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1",
                                                       "hada_t2"))
        scale = alpha / w1b.shape[0] if alpha is not None else 1.0
        if t1 is not None:
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
        else:
            m1, m2 = w1a @ w1b, w2a @ w2b
        return scale * (m1 * m2).reshape(shape)
    w1, w2, dim = get("lokr_w1"), get("lokr_w2"), None
    if w1 is None:
        dim = get("lokr_w1_b").shape[0]
        w1 = get("lokr_w1_a") @ get("lokr_w1_b")
    if w2 is None:
        dim = get("lokr_w2_b").shape[0]
        t2 = get("lokr_t2")
        w2 = (get("lokr_w2_a") @ get("lokr_w2_b") if t2 is None
              else torch.einsum("i j k l, j r, i p -> p r k l", t2, get("lokr_w2_b"), get("lokr_w2_a")))
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return scale * torch.kron(w1, w2).reshape(shape)


@pytest.fixture(scope="module")
def trained():
    """trained(model, *overrides) -> (base, layers): every component of the tiny model with LoHa / LoKr adapters
    on all target modules (convolutions included), every factor moved off its start."""
    cache = {}

    def make(model: str, *overrides: str):
        if (model, overrides) not in cache:
            base = load_base_model(model)
            cfg = load_config(None, ["lora.rank=4", "lora.alpha=2.0", "lora.targets=all", *overrides])
            adapters = adapters_for(cfg.lora, 10)
            layers = {}
            for component, module in zip(COMPONENTS, [base.unet, *base.text_encoders]):
                adapters.inject(module, component)
                generator = torch.Generator().manual_seed(len(cache))
                with torch.no_grad():
                    for param in trainable_parameters(module).values():  # one factor of each starts at zero
                        param.add_(0.1 * torch.randn(param.shape, generator=generator))
                layers[component] = adapters.layers(component, module)
            cache[model, overrides] = base, layers
        return cache[model, overrides]

    return make


def _peft_layers(base) -> dict[str, dict[str, torch.nn.Module]]:
    from peft.tuners.lycoris_utils import LycorisLayer

    return {component: {n: m for n, m in module.named_modules() if isinstance(m, LycorisLayer)}
            for component, module in zip(COMPONENTS, [base.unet, *base.text_encoders])}


@pytest.mark.parametrize("model, overrides, parts", [
    ("tiny-sd15", ("lora.method=loha",), {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    ("tiny-sd15", ("lora.method=loha", "lora.effective_conv=true"), {"hada_t1", "hada_t2"}),
    ("tiny-sd15", ("lora.method=lokr",), {"lokr_w1", "lokr_w2"}),
    # A small factor of 2 leaves the big one wide enough to be low-rank, with a Tucker core on the 3x3 convs, which
    # the file holds rebuilt as lokr_w2 (see lycoris.lycoris_weights).
    ("tiny-sd15", ("lora.method=lokr", "lora.rank=2", "lora.decompose_factor=2", "lora.effective_conv=true"),
     {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_w2"}),
    ("tiny-sdxl", ("lora.method=loha",), {"hada_w1_a"}),
    ("tiny-sdxl", ("lora.method=lokr", "lora.rank=2", "lora.decompose_factor=4"), {"lokr_w2_a"}),
])
def test_file_keys_are_comfyuis_and_its_delta_is_the_trained_one(trained, model, overrides, parts):
    base, layers = trained(model, *overrides)
    algo = overrides[0].split("=")[1]
    arch = ARCH[model]
    sd = to_kohya_state_dict(layers, arch, torch.float32, dict(base.unet.config))
    layout = unet_layout_from_config(base.unet.config) if arch == "sdxl" else None
    names = {(component, path): kohya_module_name(component, path, arch, layout)
             for component, modules in layers.items() for path in modules}
    written = {key.rsplit(".", 1)[0] for key in sd}
    assert written == set(names.values())  # the module names of a plain LoRA export, which test_export checks
    assert {key.rsplit(".", 1)[1] for key in sd} <= COMFY_KEYS[algo]
    assert parts <= {key.rsplit(".", 1)[1] for key in sd} and not any(key.endswith(".lokr_t2") for key in sd)
    assert all(layers[c] for c in COMPONENTS[: 1 + len(base.text_encoders)])  # text encoders included
    module_names = {c: [n for n, _ in m.named_modules()] for c, m in zip(COMPONENTS, [base.unet, *base.text_encoders])}
    matched, unmatched = match_lora_keys(sd, module_names)  # how sdlora's generator finds the modules
    assert not unmatched and set(matched) == set(names)
    peft = _peft_layers(base)
    for (component, path), name in names.items():
        layer = peft[component][path]
        want = layer.get_delta_weight(ADAPTER).detach()
        got = comfy_delta(sd, name, layer.get_base_layer().weight.shape)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
        # alpha = the rank loaders read: a scale of 1 also under LyCORIS' own module, which scales LoKr twice.
        rank = lycoris_rank({k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.startswith(f"{name}.")})
        assert rank is None or sd[f"{name}.alpha"].item() == rank


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_metadata_is_lycoris_kohya(algo):
    cfg = load_config(None, [f"lora.method={algo}", "lora.rank=8", "lora.alpha=4.0", "lora.targets=attn_mlp"])
    meta = build_metadata(cfg, "sd1", RunInfo(steps=1, epoch=1, num_train_images=1, training_started_at=0.0,
                                             training_finished_at=1.0))
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "8")  # the files' alphas: scale 1
    assert args["algo"] == algo and args["preset"] == "attn-mlp" and args["sdlora_alpha"] == "4"
    assert all(isinstance(v, str) for v in args.values())  # kohya's --network_args strings
    assert ("factor" in args) == (algo == "lokr")


def _image(pipe, seed=3):
    params = GenerationParams(prompt="a red boat", steps=2, width=64, height=64, seed=seed)
    return np.asarray(generate(pipe, params), dtype=np.int16)


def _lora_file(base, path):
    """A plain kohya LoRA of the tiny SD1 model (attention and convs), every factor random."""
    import copy

    cfg = load_config(None, ["lora.rank=2", "lora.alpha=1.0", "lora.targets=all"])
    layers = {}
    for component, module in (("unet", base.unet), ("text_encoder", base.text_encoders[0])):
        module = copy.deepcopy(module)
        inject_lora(module, component, cfg.lora)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for param in trainable_parameters(module).values():
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        layers[component] = lora_layers(module)
    return save_kohya_lora(layers, "sd1", path, {}, torch.float32)


def _expected_weights(plain, files: list[tuple[dict, float]]) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {module: base weight + sum of weight * ComfyUI's delta}} of LyCORIS / LoRA state dicts."""
    from sdlora.adapters.export import lora_weights_from_tensors

    out: dict[str, dict[str, torch.Tensor]] = {}
    names = {c: [n for n, _ in getattr(plain, c).named_modules()] for c in ("unet", "text_encoder")}
    for sd, weight in files:
        matched, unmatched = match_lora_keys(sd, names)
        assert not unmatched
        for (component, path), keys in matched.items():
            module = getattr(plain, component).get_submodule(path)
            current = out.setdefault(component, {}).get(path, module.weight.detach().double())
            name = next(iter(keys.values())).rsplit(".", 1)[0]
            if "down" in keys:
                w = lora_weights_from_tensors({k: sd[v] for k, v in keys.items()}, name)
                delta = w.alpha / w.rank * (w.up.flatten(1) @ w.down.flatten(1)).reshape(module.weight.shape)
            else:
                delta = comfy_delta(sd, name, module.weight.shape)
            out[component][path] = current + weight * delta.double()
    return out


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_generator_and_merge_load_a_file_blended_with_a_lora(trained, tmp_path, algo):
    from sdlora.generate.merge import merge_into_base

    base, layers = trained("tiny-sd15", f"lora.method={algo}", "lora.rank=2", "lora.decompose_factor=2",
                           "lora.effective_conv=true")
    lyco = save_kohya_lora(layers, "sd1", tmp_path / f"{algo}.safetensors", {}, torch.float32)
    lora = _lora_file(load_base_model("tiny-sd15"), tmp_path / "plain.safetensors")
    pipe = load_pipeline("tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    before = _image(pipe)
    cache = LoraCache(pipe)
    cache.activate([LoraSpec(lyco, 0.0), LoraSpec(lora, 0.0)])
    assert np.array_equal(_image(pipe), before)  # weight 0: the base model, bit for bit
    cache.activate([LoraSpec(lyco, 0.7), LoraSpec(lora, 0.5)])
    assert cache.notes == {}
    blended = _image(pipe)
    assert np.abs(blended - before).max() > 10
    files = [(load_file(str(lyco)), 0.7), (load_file(str(lora)), 0.5)]
    expected = _expected_weights(load_pipeline("tiny-sd15"), files)
    # Each module as the pipeline runs it: its base weight plus what every active adapter adds at its weight.
    pipe.fuse_lora(components=list(pipe.get_list_adapters()), lora_scale=1.0)
    for component, modules in expected.items():
        for path, weight in modules.items():
            fused = getattr(pipe, component).get_submodule(path).get_base_layer().weight.double()
            torch.testing.assert_close(fused, weight, rtol=1e-5, atol=1e-6, msg=path)

    out = merge_into_base("tiny-sd15", [(lyco, 0.7), (lora, 0.5)], tmp_path / "merged", dtype=torch.float32)
    merged = load_pipeline(str(out))
    merged.set_progress_bar_config(disable=True)
    for component, modules in expected.items():
        for path, weight in modules.items():
            got = getattr(merged, component).get_submodule(path).weight.double()
            torch.testing.assert_close(got, weight, rtol=1e-5, atol=1e-6, msg=path)
    assert np.abs(_image(merged) - blended).max() <= 1


def test_sdxl_file_loads_into_every_component_at_its_weight(trained, tmp_path):
    base, layers = trained("tiny-sdxl", "lora.method=lokr", "lora.rank=2", "lora.decompose_factor=4")
    path = save_kohya_lora(layers, "sdxl", tmp_path / "xl.safetensors", {}, torch.float32, dict(base.unet.config))
    pipe = load_pipeline("tiny-sdxl")
    cache = LoraCache(pipe)
    cache.activate([LoraSpec(path, 0.5)])
    assert cache.notes == {} and set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    loaded, trained_layers = _peft_layers_of(pipe), _peft_layers(base)
    assert {c: set(m) for c, m in loaded.items()} == {c: set(m) for c, m in trained_layers.items()}
    for component, modules in loaded.items():
        for name, layer in modules.items():
            (adapter,) = layer.active_adapters
            want = 0.5 * trained_layers[component][name].get_delta_weight(ADAPTER).detach()
            torch.testing.assert_close(layer.get_delta_weight(adapter), want, rtol=1e-5, atol=1e-7, msg=name)


def _peft_layers_of(pipe) -> dict[str, dict[str, torch.nn.Module]]:
    from peft.tuners.lycoris_utils import LycorisLayer

    return {c: {n: m for n, m in getattr(pipe, c).named_modules() if isinstance(m, LycorisLayer)}
            for c in pipe.get_list_adapters()}


def test_others_files_load_with_any_factor_layout(tmp_path):
    """A file as LyCORIS writes it with other settings than ours: LoKr with both factors low-rank (decompose_both)
    or none (full matrices, alpha unused), LoHa without alpha, LoRA modules beside them (a per-module algo map), a
    LyCORIS `0x` hash; each module loads with the delta ComfyUI computes."""
    pipe = load_pipeline("tiny-sd15")
    generator = torch.Generator().manual_seed(5)

    def rand(*shape):
        return 0.2 * torch.randn(shape, generator=generator)

    unet = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
    q = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").weight.shape
    sd = {  # to_q is 16 x 16 = kron(2 x 8, 8 x 2): factors other than peft's (4 x 4, 4 x 4) for this rank
        f"{unet}attn1_to_q.lokr_w1_a": rand(2, 1), f"{unet}attn1_to_q.lokr_w1_b": rand(1, 8),
        f"{unet}attn1_to_q.lokr_w2_a": rand(8, 1), f"{unet}attn1_to_q.lokr_w2_b": rand(1, 2),
        f"{unet}attn1_to_q.alpha": torch.tensor(0.5),
        f"{unet}attn1_to_k.lokr_w1": rand(4, 4), f"{unet}attn1_to_k.lokr_w2": rand(4, 4),
        f"{unet}attn1_to_k.alpha": torch.tensor(3.0),
        f"{unet}attn1_to_v.hada_w1_a": rand(16, 3), f"{unet}attn1_to_v.hada_w1_b": rand(3, 16),
        f"{unet}attn1_to_v.hada_w2_a": rand(16, 3), f"{unet}attn1_to_v.hada_w2_b": rand(3, 16),
        f"{unet}attn2_to_q.lora_down.weight": rand(2, 16), f"{unet}attn2_to_q.lora_up.weight": rand(16, 2),
        f"{unet}attn2_to_q.alpha": torch.tensor(1.0),
    }
    assert q == (16, 16)
    path = tmp_path / "others.safetensors"
    save_file(sd, str(path), {"ss_network_module": "lycoris.kohya", "sshs_model_hash": "0x" + "ab" * 32})
    report = inspect_lora(path)
    assert "LyCORIS LoHa + LoKr + LoRA" in report and "Modules: 4" in report and "full" in report
    assert "!" not in report  # no warning: the 0x hash is LyCORIS' own, every module is complete
    cache = LoraCache(pipe)
    assert len(cache.load(path)) == 3  # one adapter per kind of module
    cache.activate([LoraSpec(path, -0.6)])
    expected = _expected_weights(load_pipeline("tiny-sd15"), [(sd, -0.6)])
    pipe.fuse_lora(components=list(pipe.get_list_adapters()), lora_scale=1.0)
    for p, weight in expected["unet"].items():
        fused = pipe.unet.get_submodule(p).get_base_layer().weight.double()
        torch.testing.assert_close(fused, weight, rtol=1e-5, atol=1e-6, msg=p)


def test_trained_file_inspects_with_its_algorithm_and_ranks(trained, tmp_path):
    base, layers = trained("tiny-sd15", "lora.method=loha")
    path = save_kohya_lora(layers, "sd1", tmp_path / "loha.safetensors", {"ss_network_module": "lycoris.kohya"})
    report = inspect_lora(path)
    modules = sum(len(m) for m in layers.values())
    assert f"Modules: {modules}" in report and "LyCORIS LoHa" in report and "rank 4 alpha 4" in report
    assert "!" not in report


def test_inspect_names_what_a_module_lacks(tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_"
    sd = {f"{name}q.{part}": torch.ones(2, 2) for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    sd |= {f"{name}k.hada_w1_a": torch.ones(2, 2), f"{name}k.hada_w1_b": torch.ones(2, 2)}
    path = tmp_path / "half.safetensors"
    save_file(sd, str(path))
    report = inspect_lora(path)
    assert "Modules: 1" in report and "rank 2" in report
    assert f"! {name}k has no hada_w2_a, hada_w2_b" in report and "down weight" not in report


def test_what_is_not_read_is_refused_in_one_line(trained, tmp_path):
    base, layers = trained("tiny-sd15", "lora.method=loha")
    path = save_kohya_lora(layers, "sd1", tmp_path / "loha.safetensors", {})
    names = {"unet": [n for n, _ in base.unet.named_modules()]}
    with pytest.raises(LoraFileError, match="LoHa"):  # the LoRA-only readers (merge-loras, resize, --init-lora)
        from_kohya_state_dict(load_file(str(path)), names)
    cfg = load_config(None, ["lora.method=loha"])
    with pytest.raises(TrainingError, match="cannot continue"):
        read_init_lora(path, cfg.lora)
    full = tmp_path / "full.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.diff": torch.zeros(32, 32, 1, 1)}, str(full))
    with pytest.raises(LoraFileError, match="full weight difference.*which sdlora does not read") as e:
        LoraCache(load_pipeline("tiny-sd15")).load(full)
    assert "\n" not in str(e.value)
    half = tmp_path / "half.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1": torch.zeros(4, 4)}, str(half))
    with pytest.raises(LoraFileError, match=r"LoKr module .*proj_in has no lokr_w2 or lokr_w2_a/_b$"):
        LoraCache(load_pipeline("tiny-sd15")).load(half)
    for override in ("export.formats=[\"kohya\", \"peft\"]", "lora.use_rslora=true", "train.loraplus_lr_ratio=16",
                     "model.quantize_base=nf4"):
        with pytest.raises(ConfigError):
            load_config(None, ["lora.method=lokr", override])


def test_train_writes_a_lycoris_file_that_loads(dataset, tmp_path):
    from sdlora.train.recipe import train

    cfg = load_config(None, [
        f'data.dirs=["{dataset.as_posix()}"]', "data.resolution=64", "data.min_bucket_reso=64",
        "data.max_bucket_reso=128", "lora.method=lokr", "lora.rank=2", "lora.decompose_factor=2",
        "lora.module_dropout=0.1", "train.batch_size=2", "train.max_train_steps=3", "train.learning_rate=1e-2",
        "train.save_every_n_epochs=0", f'train.output_dir="{tmp_path.as_posix()}"', "train.report=false"])
    path = train(cfg)
    sd = load_file(str(path))
    assert any(k.startswith("lora_te_") for k in sd) and all(k.rsplit(".", 1)[1] in COMFY_KEYS["lokr"] for k in sd)
    pipe = load_pipeline("tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    before = _image(pipe)
    cache = LoraCache(pipe)
    cache.activate([LoraSpec(path)])
    assert not np.array_equal(_image(pipe), before)
    cache.activate([LoraSpec(path, 0.0)])
    assert np.array_equal(_image(pipe), before)
