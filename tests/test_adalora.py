"""AdaLoRA: trained through peft's AdaLoraModel, pruned to a rank budget, exported as a per-module-rank LoRA that
every loader rebuilds exactly, and resumed from checkpoints as if never interrupted."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora.adapters.adalora import AdaLora
from sdlora.adapters.export import save_kohya_lora, save_peft_lora
from sdlora.adapters.files import inspect_lora
from sdlora.adapters.lora import LoraWeights, trainable_parameters
from sdlora.config import load_config
from sdlora.errors import ConfigError
from sdlora.generate.pipeline import LoraCache, LoraSpec, load_pipeline
from sdlora.models.loading import encode_prompt, load_base_model, tokenize
from sdlora.train.loss import compute_loss
from sdlora.train.recipe import train

STEPS = 12
pytestmark = pytest.mark.usefixtures("single_thread_plain_kernels")


@pytest.fixture(scope="module")
def trained():
    """The tiny SD1 model after AdaLoRA (rank 2 of 4, attention + MLP incl. the 1x1 proj convs) on one repeated
    batch, through the final allocation: warm-up 1 step, pruning to step 10, then 2 steps at the final ranks."""
    base = load_base_model("tiny-sd15")
    unet, te = base.unet, base.text_encoders[0]
    before = {k: v.clone() for k, v in {**unet.state_dict(), **te.state_dict()}.items()}
    cfg = load_config(None, ["lora.method=adalora", "lora.rank=2", "lora.alpha=3.0", "lora.targets=attn_mlp"])
    adalora = AdaLora(cfg.lora, STEPS)
    adalora.inject(unet, "unet")
    adalora.inject(te, "text_encoder")
    params = [*trainable_parameters(unet).values(), *trainable_parameters(te).values()]
    optimizer = torch.optim.AdamW(params, lr=5e-2)
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)
    ids = tokenize(base.tokenizers, ["zkstyle, a boat", "zkstyle, a tree"])
    losses = []
    for step in range(1, STEPS + 1):
        states, _ = encode_prompt("sd1", [te], ids)
        loss = compute_loss(unet, DDPMScheduler.from_config(base.scheduler_config), latents, states, None, None,
                            None, torch.Generator().manual_seed(1), cfg.train, torch.float32)
        (loss + adalora.penalty()).backward()
        optimizer.step()
        adalora.after_step(step, finite=True)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return SimpleNamespace(base=base, before=before, cfg=cfg, adalora=adalora, params=params, losses=losses)


def test_adalora_learns_only_its_adapter(trained):
    assert trained.losses[-1] < 0.75 * trained.losses[0], trained.losses
    assert all(p.dtype == torch.float32 for p in trained.params)
    unet, te = trained.base.unet, trained.base.text_encoders[0]
    after = {k.replace(".base_layer", ""): v for k, v in {**unet.state_dict(), **te.state_dict()}.items()
             if "lora_" not in k and ".ranknum." not in k}
    assert after.keys() == trained.before.keys()
    assert all(torch.equal(after[k], trained.before[k]) for k in trained.before), "base weights changed"


def test_rank_budget_prunes_to_the_target_average(trained):
    for component, ranks in trained.adalora.ranks().items():
        values = list(ranks.values())
        # peft masks every triplet whose score ties the threshold, so the mean may fall a little short.
        assert 1.9 <= sum(values) / len(values) <= 2, component
        assert min(values) < 2 < max(values) <= 4, component
        layers = trained.adalora.layers(component, trained.base.unet if component == "unet"
                                        else trained.base.text_encoders[0])
        assert {m: w.rank for m, w in layers.items()} == {m: r for m, r in ranks.items() if r}


def _outputs(unet, text_encoder, tokenizers):
    torch.manual_seed(0)
    latents, ids = torch.randn(1, 4, 8, 8), tokenize(tokenizers, ["zkstyle, a boat"])
    with torch.no_grad():
        states, _ = encode_prompt("sd1", [text_encoder], ids)
        return unet(latents, torch.tensor([500]), states).sample, states


def _assert_same_outputs(got, expected):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


class _Messages(logging.Handler):
    """Every diffusers/peft log record and warning while loading: an unmatched key shows up here."""

    def __enter__(self):
        self.messages, self._loggers = [], [logging.getLogger(n) for n in ("diffusers", "peft")]
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.addHandler(self)
            lg.setLevel(logging.DEBUG)
        self._warnings = warnings.catch_warnings(record=True)
        self._caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        return self.messages

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        self.messages += [str(w.message) for w in self._caught]
        for lg, level in zip(self._loggers, self._levels):
            lg.removeHandler(self)
            lg.setLevel(level)


def test_exported_ranks_load_exactly_in_our_generator_and_diffusers(trained, tmp_path):
    base = trained.base
    expected = _outputs(base.unet, base.text_encoders[0], base.tokenizers)
    layers = {"unet": trained.adalora.layers("unet", base.unet),
              "text_encoder": trained.adalora.layers("text_encoder", base.text_encoders[0])}
    path = save_kohya_lora(layers, "sd1", tmp_path / "ada.safetensors", {}, torch.float32)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    ranks = {k.removesuffix(".lora_down.weight"): v.shape[0] for k, v in tensors.items() if k.endswith("down.weight")}
    assert len(set(ranks.values())) > 1 and 0 not in ranks.values()
    # One alpha for all, scale (lora.alpha / lora.rank) * initial rank, since diffusers mis-scales differing ones.
    assert all(tensors[f"{name}.alpha"].item() == pytest.approx(1.5 * 4) for name in ranks)
    assert any(tensors[f"{n}.lora_down.weight"].dim() == 4 for n in ranks), "no 1x1 conv was exported"

    pipe = load_pipeline("tiny-sd15")
    LoraCache(pipe).activate([LoraSpec(path)])
    _assert_same_outputs(_outputs(pipe.unet, pipe.text_encoder, base.tokenizers), expected)

    save_peft_lora(layers, tmp_path / "peft", torch.float32)
    pipe = load_pipeline("tiny-sd15")
    for source in (path, tmp_path / "peft"):
        with _Messages() as messages:
            pipe.load_lora_weights(str(source))
        assert not [m for m in messages if any(w in m.lower() for w in ("unexpected", "missing", "not loaded"))]
        for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
            loaded = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
            assert loaded == set(layers[component]), (source, component)
        _assert_same_outputs(_outputs(pipe.unet, pipe.text_encoder, base.tokenizers), expected)
        pipe.unload_lora_weights()


def _cfg(dataset, out, *overrides):
    return load_config(None, [
        f'data.dirs=["{dataset.as_posix()}"]', "data.resolution=64", "data.min_bucket_reso=64",
        "data.max_bucket_reso=128", "lora.method=adalora", "lora.rank=2", "lora.alpha=2.0", "train.batch_size=2",
        "train.learning_rate=1e-3", "train.max_train_steps=10", "train.save_every_n_epochs=0",
        f'train.output_dir="{Path(out).as_posix()}"', "export.dtype=fp32", *overrides,
    ])


def test_training_run_exports_dynamic_ranks_and_resumes_exactly(dataset, tmp_path):
    """10 steps: warm-up to step 1, pruning to step 8 (the final allocation), the final ranks to step 10.
    Resuming mid-pruning needs the allocator's importance averages, after it the final rank pattern."""
    straight = train(_cfg(dataset, tmp_path / "a", "train.checkpoint_every_n_steps=4"))
    report = json.loads((tmp_path / "a" / "adalora_ranks.json").read_text())
    tensors = load_file(str(straight))
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_text_model_")):
        kept = {m.replace(".", "_"): r for m, r in report["modules"][component].items() if r}
        in_file = {k.removeprefix(prefix).removesuffix(".lora_down.weight"): v.shape[0]
                   for k, v in tensors.items() if k.startswith(prefix) and k.endswith(".lora_down.weight")}
        assert in_file == kept, component
    text = inspect_lora(straight)
    assert "network dim: Dynamic" in text and "network alpha: Dynamic" in text and '"algo": "adalora"' in text

    for checkpoint in ("checkpoint-4", "checkpoint-8"):
        resumed = train(_cfg(dataset, tmp_path / checkpoint), resume=str(tmp_path / "a" / checkpoint))
        got, want = load_file(str(resumed)), tensors
        assert got.keys() == want.keys(), checkpoint
        assert all(torch.equal(got[k], want[k]) for k in want), checkpoint


def test_inspect_summarises_many_ranks_per_block(tmp_path):
    """One alpha for all (our AdaLoRA export) or alpha proportional to rank (kohya's resize_lora.py)."""
    def module(block, i):
        return f"{block}.attentions.0.transformer_blocks.0.attn{i % 2 + 1}.to_{'qkv'[i // 2]}"

    layers = {"unet": {
        **{module("down_blocks.0", i): LoraWeights(torch.ones(i + 1, 8), torch.ones(8, i + 1), 6.0) for i in range(6)},
        **{module("up_blocks.1", i): LoraWeights(torch.ones(i + 1, 8), torch.ones(8, i + 1), 0.5 * (i + 1))
           for i in range(6)},
    }}
    text = inspect_lora(save_kohya_lora(layers, "sd1", tmp_path / "x.safetensors", {}))
    assert "rank 1-6 (mean 3.5), alpha 6" in text and "rank 1-6 (mean 3.5), alpha/rank 0.5" in text


@pytest.mark.parametrize("overrides,message", [
    (["lora.adalora_init_rank=4"], "lora.adalora_init_rank: must be > lora.rank"),
    (["lora.adalora_warmup_steps=5", "lora.adalora_final_steps=5"], "lora.adalora_warmup_steps + adalora_final_steps"),
    (["lora.init=gaussian"], "lora.init: AdaLoRA"),
])
def test_config_rejects_impossible_schedules(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        load_config(None, ["lora.method=adalora", "lora.rank=4", "train.max_train_steps=10", *overrides])
