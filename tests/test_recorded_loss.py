"""Recorded numbers, as torchtune's recipe tests pin theirs: two short runs on the tiny models with fixed seeds, their
logged losses, validation losses, the files they write and a hash of every exported file and sample image. A change
of structure must not change one number; a change meant to change them updates RECORDED (the failure prints the new
values). The data is the first six pictures of sample_images/, so redrawing the demo's style changes them too.

The runs happen in a fresh process that builds its own tiny models, on one thread, with MKL's reproducible mode
(MKL_CBWR=COMPATIBLE) and ATen's portable kernels (ATEN_CPU_CAPABILITY=default): then every x86-64 CPU computes
the same bits. Checked on an AVX-512/AMX Xeon by also limiting MKL to AVX2 and to SSE4.2 (same hashes), while
without those two settings the hashes differ between kernels, and the random initialisation of the tiny models
differs between the portable and the vectorised kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

RUN = r"""
import hashlib, json, sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

torch.set_num_threads(1)
torch.backends.mkldnn.enabled = False
from sdlora.config import load_config
from sdlora.train.recipe import train

RECIPES = {
    # LoRA on the UNet and the text encoder from decoded images, accumulation, warm-up and cosine schedule, offset
    # noise, Min-SNR, validation, an intermediate file, samples, both export formats.
    "sd15": ['model.base_model="tiny-sd15"', "lora.rank=4", "lora.alpha=4.0", "lora.train_text_encoder=true",
             "train.batch_size=2", "train.gradient_accumulation_steps=2", 'train.lr_scheduler="cosine"',
             "train.lr_warmup_steps=2", "train.save_every_n_steps=3", "train.noise_offset=0.05",
             "train.min_snr_gamma=5.0", "data.validation_split=0.34", 'data.cache_latents="none"',
             'export.formats=["kohya", "peft"]', 'sample.prompts=["zkstyle, a boat --d 3"]', "sample.steps=2",
             "sample.every_n_steps=3"],
    # AdaLoRA (ranks pruned while training) on SDXL's UNet, in LDM names, and both text encoders, cached latents.
    "sdxl-adalora": ['model.base_model="tiny-sdxl"', 'lora.method="adalora"', "lora.rank=2", "lora.alpha=2.0",
                     "lora.adalora_init_rank=4", "lora.train_text_encoder=true", "train.batch_size=2",
                     'export.dtype="fp32"'],
}
# Metadata that holds the time of the run, or hashes of the bytes that hold it.
CLOCK = ("ss_training_started_at", "ss_training_finished_at", "modelspec.date", "sshs_model_hash", "sshs_legacy_hash")


def file_hash(path):
    if path.suffix == ".png":
        with Image.open(path) as image:
            return hashlib.sha256(np.asarray(image).tobytes() + image.text["parameters"].encode()).hexdigest()
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    for key in CLOCK:
        header.get("__metadata__", {}).pop(key, None)
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode() + raw[8 + n:]).hexdigest()


data, out, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
cfg = load_config(None, [f'data.dirs=["{data.as_posix()}"]', "data.resolution=64", "data.min_bucket_reso=64",
                         "data.max_bucket_reso=128", "train.learning_rate=1e-3", "train.max_train_steps=6",
                         "train.save_every_n_epochs=0", "train.log_every_n_steps=1", "train.report=false",
                         f'train.output_dir="{out.as_posix()}"', *RECIPES[name]])
losses = []
train(cfg, on_step=lambda info: losses.append(info["loss"]))
files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
               if p.is_file() and p.relative_to(out).parts[0] != "logs")
validation = out / "validation.csv"
print(json.dumps({
    "losses": losses,
    "val_losses": [float(line.split(",")[2]) for line in validation.read_text().splitlines()[1:]]
    if validation.is_file() else [],
    "files": files,
    "hashes": {f: file_hash(out / f) for f in files if f.endswith((".safetensors", ".png")) and "checkpoint-" not in f},
}))
"""

RECORDED = {
    "sd15": {
        "losses": [1.0887246131896973, 1.141800880432129, 1.245473861694336,
                   1.2394155263900757, 0.9797143936157227, 1.1756117343902588],
        "val_losses": [1.130917251110077, 1.130917251110077, 1.1303603053092957, 1.1291964650154114,
                       1.1282964944839478, 1.1276456117630005, 1.1275048851966858],
        "files": [
            "checkpoint-3/adapters.safetensors", "checkpoint-3/optimizer.json", "checkpoint-3/optimizer.safetensors",
            "checkpoint-3/state.json", "checkpoint-6/adapters.safetensors", "checkpoint-6/optimizer.json",
            "checkpoint-6/optimizer.safetensors", "checkpoint-6/state.json", "config.toml",
            "lora-step00000003.safetensors", "lora-step00000003/pytorch_lora_weights.safetensors", "lora.safetensors",
            "lora/pytorch_lora_weights.safetensors", "samples/step00000003-00.png", "samples/step00000006-00.png",
            "train_stats.json", "validation.csv",
        ],
        "hashes": {
            "lora-step00000003.safetensors":
                "e4aac38e1df8d1b3cdc239961c7c263aacca137be6ff78f71991028b4b02ad10",
            "lora-step00000003/pytorch_lora_weights.safetensors":
                "fae7672c0c5e69e7ddfbb326af4eb0125aaf89fa9829c65e3afdde465390dfb0",
            "lora.safetensors":
                "89f4963f825ae41bc8cbd76757dd2538d3005c23e2326abc91df2360cb3f1186",
            "lora/pytorch_lora_weights.safetensors":
                "cb54c4231473fe12940f32f95225f803bf14521a8fed3affd19ed6887e0dabd8",
            "samples/step00000003-00.png":
                "e2a819856a31a3773341f33944320c42a5d6229de2ca57a3f29e748459f3aace",
            "samples/step00000006-00.png":
                "a11fdab573068c8dfbc133a1ccdb850ab211e284fc695e6f6f807ed6f3cb472e",
        },
    },
    "sdxl-adalora": {
        "losses": [1.0015262365341187, 1.0197234153747559, 1.0689421892166138,
                   1.2296680212020874, 0.9851772785186768, 1.1380997896194458],
        "val_losses": [],
        "files": [
            "adalora_ranks.json", "checkpoint-6/adalora.json", "checkpoint-6/adalora.safetensors",
            "checkpoint-6/adapters.safetensors", "checkpoint-6/optimizer.json", "checkpoint-6/optimizer.safetensors",
            "checkpoint-6/state.json", "config.toml", "lora.safetensors", "train_stats.json",
        ],
        "hashes": {
            "lora.safetensors":
                "58758d27d4e3e20e84a9cc1fed4fff9c8ee15c060755221ab474159896ca4809",
        },
    },
}


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="recorded with MKL's reproducible mode (x86-64)")
@pytest.mark.parametrize("recipe", sorted(RECORDED))
def test_a_short_run_gives_the_recorded_numbers(dataset, tmp_path, recipe):
    env = {**os.environ, "SDLORA_CACHE": str(tmp_path / "models"), "MKL_CBWR": "COMPATIBLE",
           "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", RUN, str(dataset), str(tmp_path / "run"), recipe], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    want = RECORDED[recipe]
    assert got == want, f"the numbers changed; if that is intended, record these:\n{json.dumps(got, indent=1)}"
