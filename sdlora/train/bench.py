"""Training-speed benchmark (`sdlora bench`, benchmarks/train_speed.py): the real training path, timed.

Each setting runs `train.train` on synthetic captioned images with a random-init model of the real architecture
(full-size `sd15`/`sdxl` on a GPU, the tiny models on a CPU so CI exercises this code), then prints one JSON line:
images/s and median step time after warm-up (from the run's train_stats.json), peak VRAM, the bytes of the base
weights as stored (`model.quantize_base`), the FLOPs of one training step counted by torch's FlopCounterMode on the
same LoRA-injected UNet, and MFU against the GPU's peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sdlora.atomic import write_text
from sdlora.config import load_config

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

# torch and PIL are imported where used: `sdlora --help` builds this module's options and must stay fast.

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' datasheets, matched against the device name.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12}


@dataclasses.dataclass
class Setting:
    """One benchmarked combination; the fields are the config keys it sets."""

    batch_size: int = 4
    mixed_precision: str = "fp16"
    rank: int = 4
    train_text_encoder: bool = False
    gradient_checkpointing: bool = False
    cache_latents: str = "memory"
    quantize_base: str = "none"
    channels_last: bool = False
    compile: str = "none"
    compile_mode: str = "default"
    # The host reads the loss (and, through it, waits for the GPU) at log steps only; 1 = a sync every step.
    log_every_n_steps: int = 1000
    # Base-prediction preservation: per step one more text encoding and two more UNet passes.
    preservation_weight: float = 0.0

    def overrides(self) -> list[str]:
        return [f"train.batch_size={self.batch_size}", f"train.mixed_precision={self.mixed_precision}",
                f"lora.rank={self.rank}", f"lora.alpha={self.rank}",
                f"lora.train_text_encoder={str(self.train_text_encoder).lower()}",
                f"train.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
                f'data.cache_latents="{self.cache_latents}"', f'model.quantize_base="{self.quantize_base}"',
                f"train.channels_last={str(self.channels_last).lower()}", f'train.compile="{self.compile}"',
                f'train.compile_mode="{self.compile_mode}"', f"train.log_every_n_steps={self.log_every_n_steps}",
                f"train.preservation_weight={self.preservation_weight}", 'data.trigger_word="bench"']


def settings(plan: str, cuda: bool) -> list[Setting]:
    """`reference`: the peers' comparison point (batch 4, fp16, rank 4, UNet only, cached latents). `sweep`: the
    reference, then one factor changed at a time (batch 1/8, bf16, rank 16/64, +TE, checkpointing, no cache, NF4
    base, base-prediction preservation; on a GPU also channels-last, compile, CUDA graphs, a host sync every
    step); the fp8 base needs checkpointing, so it changes one factor from the checkpointing setting."""
    reference = Setting(mixed_precision="fp16" if cuda else "no")
    if plan == "reference":
        return [reference]
    variants: list[dict[str, Any]] = [
        dict(batch_size=1), dict(batch_size=8), dict(rank=16), dict(rank=64), dict(train_text_encoder=True),
        dict(gradient_checkpointing=True), dict(cache_latents="none"), dict(quantize_base="nf4"),
        dict(gradient_checkpointing=True, quantize_base="fp8"), dict(preservation_weight=1.0)]
    if cuda:
        variants.insert(2, dict(mixed_precision="bf16"))
        # On a CPU inductor compiles for minutes and these layouts/graphs do not apply: measured on GPUs only.
        variants += [dict(channels_last=True), dict(compile="regional"),
                     dict(compile="regional", compile_mode="reduce-overhead"), dict(log_every_n_steps=1)]
    return [reference] + [dataclasses.replace(reference, **v) for v in variants]


def make_dataset(folder: Path, n: int, size: int) -> Path:
    """n random-noise PNGs with captions: the content does not change the speed of a training step."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(n):
        Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"bench image {i}, random colours")
    return folder


def training_flops(model_path: str, setting: Setting, resolution: int) -> float:
    """FLOPs of one training step per image (forward + backward of the LoRA-injected UNet), counted by
    FlopCounterMode on a meta-device copy of the real architecture: exact shapes, no weights, no compute."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sdlora.adapters.methods import adapters_for
    from sdlora.config import LoraConfig
    from sdlora.models.loading import model_configs
    from sdlora.models.meta import meta_models, meta_unet_inputs

    arch, configs = model_configs(model_path)
    unet = cast("UNet2DConditionModel", meta_models(arch, configs, torch.float16)["unet"])
    adapters_for(LoraConfig(rank=setting.rank, alpha=setting.rank), total_steps=1).inject(unet, "unet")
    if setting.gradient_checkpointing:
        unet.train()
        unet.enable_gradient_checkpointing()
    latents, step, states, added = meta_unet_inputs(unet, resolution, torch.float16)
    with FlopCounterMode(display=False) as counter:
        loss = unet(latents, step, states, added_cond_kwargs=added).sample.float().pow(2).mean()
        if setting.preservation_weight:  # the base's prediction without gradients, the adapted one with them
            with torch.no_grad():
                unet(latents, step, states, added_cond_kwargs=added)
            loss = loss + unet(latents, step, states, added_cond_kwargs=added).sample.float().pow(2).mean()
        loss.backward()
    return float(counter.get_total_flops())


def peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def run(model: str, setting: Setting, steps: int, resolution: int, work: Path) -> dict:
    """Train `steps` timed steps (plus warm-up) with `setting`; one result row."""
    import torch

    from sdlora.models.tiny import FULL_SIZE_MODELS, TINY_MODELS, tiny_model_path
    from sdlora.train.deferred import WARMUP_STEPS
    from sdlora.train.recipe import train

    path = str(tiny_model_path(model)) if model in TINY_MODELS + FULL_SIZE_MODELS else model
    data = make_dataset(work / "data", max(8, setting.batch_size), resolution)
    out = Path(tempfile.mkdtemp(dir=work, prefix="run-"))
    cfg = load_config(None, [
        f'model.base_model="{Path(path).as_posix()}"', f'data.dirs=["{data.as_posix()}"]',
        f"data.resolution={resolution}", f"data.min_bucket_reso={resolution}", f"data.max_bucket_reso={resolution}",
        f"train.max_train_steps={WARMUP_STEPS + steps}", "train.save_every_n_epochs=0",
        f'train.output_dir="{out.as_posix()}"', *setting.overrides(),
    ])
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train(cfg)
    stats = json.loads((out / "train_stats.json").read_text())
    flops = training_flops(path, setting, resolution)
    row = {"model": model, "resolution": resolution, **dataclasses.asdict(setting), **stats,
           "tflop_per_image": flops / 1e12, "tflops": flops * stats["images_per_s"] / 1e12}
    peak = peak_flops()
    row["mfu"] = row["tflops"] * 1e12 / peak if peak else None
    gc.collect()
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `sdlora bench` and benchmarks/train_speed.py."""
    parser.add_argument("--model", default=None,
                        help="sd15 / sdxl (full size, random weights; default on a GPU), tiny-sd15 (default on a "
                             "CPU) / tiny-sdxl, or a model folder")
    parser.add_argument("--plan", choices=["reference", "sweep"], default="sweep")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting, after warm-up")
    parser.add_argument("--resolution", type=int, default=0, help="0: 1024 for SDXL, 512 otherwise (64 on CPU)")
    parser.add_argument("--out", default="outputs/bench/results.jsonl", help="JSON lines are appended here too")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdlora bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_all(parser.parse_args(argv))


def run_all(args: argparse.Namespace) -> int:
    """Every setting of args.plan, one JSON line each (printed and appended to args.out)."""
    import torch

    cuda = torch.cuda.is_available()
    args.model = args.model or ("sd15" if cuda else "tiny-sd15")
    resolution = args.resolution or (64 if not cuda else 1024 if "xl" in args.model else 512)
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="sdlora-bench-") as work:
        for setting in settings(args.plan, cuda):
            line = json.dumps(run(args.model, setting, args.steps, resolution, Path(work)))
            print(line, flush=True)
            earlier = out.read_text(encoding="utf-8") if out.is_file() else ""
            write_text(out, earlier + line + "\n")
    return 0
