"""model.quantize_base: the frozen UNet's Linear layers stored in fp8 / NF4, adapters fp32, training end to end."""

import copy
import importlib.abc
import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdlora import bnb_import
from sdlora.adapters.export import load_lora_layers
from sdlora.adapters.files import read_lora_file
from sdlora.adapters.lora import count_parameters, inject_lora, lora_layers, trainable_parameters
from sdlora.config import load_config
from sdlora.errors import ConfigError, ModelError
from sdlora.models.loading import load_base_model
from sdlora.models.quantize import quantize_nf4, store_fp8, stored_bytes
from sdlora.train.recipe import train

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
OVERRIDES = {"fp8": ("model.quantize_base=fp8", "train.gradient_checkpointing=true"),
             "nf4": ("model.quantize_base=nf4",)}
# By distribution, not find_spec: sdlora hides bitsandbytes from imports until a run asks for it (bnb_import).
needs_bnb = pytest.mark.skipif("bitsandbytes" not in importlib.metadata.packages_distributions(),
                               reason="nf4 needs bitsandbytes: pip install 'sdlora[bnb]'")
MODES = [pytest.param("fp8"), pytest.param("nf4", marks=[needs_bnb, pytest.mark.smoke])]

pytestmark = pytest.mark.usefixtures("single_thread_plain_kernels")


@pytest.fixture(scope="module")
def tiny_unet():
    return load_base_model("tiny-sd15").unet.requires_grad_(False)


def quantized_unet(unet, mode):
    """A copy of `unet` with rank-4 LoRA on attention, its base stored as `mode`, as train() builds it."""
    unet = copy.deepcopy(unet)
    if mode == "nf4":
        quantize_nf4(unet, torch.float32, CPU)
    inject_lora(unet, "unet", load_config(None, ["lora.rank=4", "lora.alpha=4.0"]).lora)
    if mode == "fp8":
        store_fp8(unet, torch.float32)
    return unet


def linear_sizes(unet):
    """(weight elements, bias elements, count) of the UNet's own Linear layers, adapters left out."""
    linears = [m for name, m in unet.named_modules() if type(m) is torch.nn.Linear and "lora_" not in name]
    return (sum(m.weight.numel() for m in linears), sum(m.bias.numel() for m in linears if m.bias is not None),
            len(linears))


@pytest.mark.parametrize("mode", MODES)
def test_base_is_stored_small_adapters_stay_fp32_and_output_stays_close(tiny_unet, mode):
    plain, unet = quantized_unet(tiny_unet, "none"), quantized_unet(tiny_unet, mode)
    weights, biases, n_linears = linear_sizes(plain)
    before = stored_bytes([plain], CPU)
    if mode == "fp8":
        # Every Linear weight and bias at one byte instead of four, nothing else touched.
        assert stored_bytes([unet], CPU) == before - 3 * (weights + biases)
        assert unet.conv_in.weight.dtype == torch.float32
        assert unet.dtype == torch.float32  # what pipelines read: the compute dtype, not fp8
    else:
        from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

        bnb = bnb_import.load()
        adapted = [m for m in unet.modules() if isinstance(m, PeftLinear4bit)]
        assert len(adapted) == len(trainable_parameters(unet)) // 2  # peft's bnb layer around every adapted Linear
        quantized = [m for m in unet.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(quantized) == n_linears
        assert all(m.weight.dtype == torch.uint8 and m.weight.numel() * 2 == m.in_features * m.out_features
                   for m in quantized)
        # Two weights a byte (biases stay fp32), plus the scales: a byte per 64 weights and ~1 KB of tables per layer.
        packed = before - 4 * weights + weights // 2
        assert packed < stored_bytes([unet], CPU) <= packed + weights // 64 + 1400 * n_linears
    assert all(p.dtype == torch.float32 for p in trainable_parameters(unet).values())
    assert len(trainable_parameters(unet)) == len(trainable_parameters(plain))
    assert count_parameters([unet]) == count_parameters([plain])  # the log line counts packed weights as weights

    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]),
              torch.randn(2, 77, unet.config.cross_attention_dim, generator=g))
    with torch.no_grad():
        expected = plain(*inputs).sample
    out = unet(*inputs).sample
    # e4m3 rounds each weight by up to 2^-4 of itself; NF4 has 16 levels per block of 64 weights.
    error = ((out - expected).norm() / expected.norm()).item()
    assert 0 < error < {"fp8": 0.05, "nf4": 0.12}[mode], error  # measured 0.016 / 0.048
    out.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable_parameters(unet).values())


@pytest.fixture(scope="module", params=MODES)
def run(request, tmp_path_factory):
    """(mode, final LoRA of a two-step train() with a sample at the end, the same run resumed after step 1)."""
    mode = request.param
    root = tmp_path_factory.mktemp(mode)
    data = root / "imgs"
    data.mkdir()
    for src in sorted((REPO / "sample_images").glob("*.png"))[:4]:
        shutil.copy(src, data / src.name)
        shutil.copy(src.with_suffix(".txt"), data / src.with_suffix(".txt").name)

    def cfg(name, *overrides):
        return load_config(None, [
            f'data.dirs=["{data.as_posix()}"]', "data.resolution=64", "data.min_bucket_reso=64",
            "data.max_bucket_reso=64", "lora.rank=4", "lora.alpha=4.0", "lora.train_text_encoder=false",
            "train.batch_size=2", "train.learning_rate=1e-3", "train.max_train_steps=2", "train.save_every_n_epochs=0",
            "train.checkpoint_every_n_steps=1", "train.save_last_k=0", "export.dtype=fp32",
            f'train.output_dir="{(root / name).as_posix()}"', *OVERRIDES[mode], *overrides])

    final = train(cfg("run", 'sample.prompts=["a cat"]', "sample.steps=1", "sample.grid_weights=[]"))
    return mode, final, train(cfg("resumed"), resume=str(root / "run" / "checkpoint-1"))


def test_training_exports_a_lora_of_the_unquantized_model(run, tiny_unet):
    _, final, _ = run
    tensors, _ = read_lora_file(final)
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))
    # The file maps onto the plain UNet's modules exactly as an adapter trained without quantization would.
    loaded = load_lora_layers(final, {"unet": [name for name, _ in tiny_unet.named_modules()]})[0]["unet"]
    plain = lora_layers(quantized_unet(tiny_unet, "none"))
    assert {k: (v.down.shape, v.up.shape) for k, v in loaded.items()} == {
        k: (v.down.shape, v.up.shape) for k, v in plain.items()}
    assert sorted(p.name for p in (final.parent / "samples").glob("*.png")) == ["step00000002-00.png"]


def test_train_stats_record_the_base_as_stored(run, tiny_unet):
    mode, final, _ = run
    base = load_base_model("tiny-sd15")
    plain = stored_bytes([m.requires_grad_(False) for m in (base.unet, *base.text_encoders)], CPU)
    weights, biases, _ = linear_sizes(tiny_unet)
    stored = json.loads((final.parent / "train_stats.json").read_text())["base_weights_gb"] * 1e9
    if mode == "fp8":
        assert stored == pytest.approx(plain - 3 * (weights + biases), abs=1)
    else:  # NF4's per-layer tables (~1 KB) outweigh its gain over fp8 in the tiny model's small layers only
        assert stored < plain


def test_resume_with_a_quantized_base_is_exact(run):
    _, final, resumed = run
    straight, again = load_file(str(final)), load_file(str(resumed))
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_plan_counts_the_quantized_unet(tiny_unet):
    from sdlora.train.plan import estimate, trace

    weights, biases, _ = linear_sizes(tiny_unet)
    traced = trace(load_config(None, ["train.mixed_precision=no"]))
    unet = {q: estimate(load_config(None, [f"model.quantize_base={q}", "train.gradient_checkpointing=true",
                                           "train.mixed_precision=no"]), traced).unet for q in ("none", "fp8", "nf4")}
    assert unet["none"] - unet["fp8"] == 3 * (weights + biases)  # fp32 training: 4 bytes -> 1
    assert unet["fp8"] - unet["nf4"] == pytest.approx((1 - 0.5 - 1 / 64) * (weights + biases))


@pytest.mark.parametrize("overrides, message", [
    (["model.quantize_base=fp8"], "model.quantize_base: \"fp8\" needs train.gradient_checkpointing = true"),
    ([*OVERRIDES["fp8"], "lora.method=dora"], "lora.method: \"dora\" reads the base weights"),
    (["model.quantize_base=nf4", "lora.init=pissa"], "lora.init: \"pissa\" rewrites the base weights"),
])
def test_config_rejects_what_cannot_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "bitsandbytes":
            raise ModuleNotFoundError("No module named 'bitsandbytes'")


def test_nf4_without_bitsandbytes_names_the_fix(monkeypatch):
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)  # import fails as when it is not installed
    monkeypatch.setattr(sys, "meta_path", [_NotInstalled(), *sys.meta_path])
    with pytest.raises(ModelError, match=r"pip install 'sdlora\[bnb\]'"):
        quantize_nf4(torch.nn.Linear(4, 4), torch.float32, CPU)
