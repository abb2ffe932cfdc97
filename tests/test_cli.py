"""The `sdlora` command as a user meets it: what each command imports, one line per error whatever other libraries
print, and `inspect` on files that hold no LoRA. Commands run in fresh processes, as a user starts them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdlora.cli import main

# Runs each (name, argv) of argv[1] through sdlora.cli.main in this one process and prints, per name, which of the
# heavy modules had been imported by then (a None entry in sys.modules is bitsandbytes hidden, not imported).
IMPORTS_AFTER = """
import json, sys
from sdlora.cli import main
seen = {}
for name, argv in json.loads(sys.argv[1]):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    seen[name] = {"code": code, **{m: sys.modules.get(m) is not None for m in ("bitsandbytes", "torch", "peft")}}
print(json.dumps(seen))
"""

# Every heavy third-party import logs a warning and warns, as bitsandbytes' CPU backend does on some CPUs, whatever
# the CPU running the test.
NOISY_IMPORTS = """
import importlib.abc, logging, sys, warnings

class Noisy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in ("torch", "transformers", "peft", "diffusers", "accelerate", "safetensors"):
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
                "Failed to load CPU gemm_4bit_forward from kernels-community: simulated")
            warnings.warn(f"simulated import-time warning of {name}")
        return None

sys.meta_path.insert(0, Noisy())
from sdlora.cli import main
sys.exit(main(sys.argv[1:]))
"""


def tiny_lora(path: Path) -> Path:
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.ones(2, 32),
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.ones(32, 2),
               "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(2.0)}, str(path))
    return path


def train_config(path: Path, data: Path, out: Path, *lines: str) -> Path:
    path.write_text("\n".join([
        '[model]\nbase_model = "tiny-sd15"',
        f'[data]\ndirs = ["{data.as_posix()}"]\nresolution = 64\nmin_bucket_reso = 64\nmax_bucket_reso = 64\n'
        'cache_latents = "none"',
        "[lora]\nrank = 2\ntrain_text_encoder = true",
        f'[train]\noutput_dir = "{out.as_posix()}"\nmax_train_steps = 1\nbatch_size = 2\nsave_every_n_epochs = 0\n'
        "report = false",
        *lines,
    ]) + "\n")
    return path


def test_bitsandbytes_is_imported_only_when_a_config_asks_and_inspect_doctor_stay_light(dataset, tmp_path):
    config = train_config(tmp_path / "run.toml", dataset, tmp_path / "run")
    eight_bit = train_config(tmp_path / "8bit.toml", dataset, tmp_path / "8bit")
    commands = [
        ("help", ["--help"]),
        ("doctor", ["doctor", str(dataset)]),
        ("inspect", ["inspect", str(tiny_lora(tmp_path / "x.safetensors"))]),
        ("generate", ["generate", "--prompt", "a boat", "--width", "64", "--height", "64", "--steps", "1",
                      "--out", str(tmp_path / "png")]),
        ("train", ["train", str(config)]),
        ("train adamw8bit", ["train", str(eight_bit), "train.optimizer=adamw8bit"]),
    ]
    result = subprocess.run([sys.executable, "-c", IMPORTS_AFTER, json.dumps(commands)], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert [seen[name]["code"] for name, _ in commands] == [0, 0, 0, 0, 0, 0], result.stderr[-2000:]
    assert seen["help"] == {"code": 0, "bitsandbytes": False, "torch": False, "peft": False}
    assert seen["doctor"] == {"code": 0, "bitsandbytes": False, "torch": False, "peft": False}
    assert seen["inspect"] == {"code": 0, "bitsandbytes": False, "torch": True, "peft": False}
    assert not seen["generate"]["bitsandbytes"] and not seen["train"]["bitsandbytes"]
    assert seen["train adamw8bit"]["bitsandbytes"]
    assert list((tmp_path / "run").glob("*.safetensors")) and list((tmp_path / "8bit").glob("*.safetensors"))


def noisy_sdlora(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NOISY_IMPORTS, *argv], capture_output=True, text=True, timeout=600)


@pytest.mark.smoke
def test_an_error_is_one_line_whatever_other_libraries_print_and_verbose_shows_them(dataset, tmp_path):
    missing = train_config(tmp_path / "missing.toml", tmp_path / "no_such_folder", tmp_path / "out")
    checkpoint = tmp_path / "vae.safetensors"
    save_file({"encoder.down.0.resnets.0.conv1.weight": torch.zeros(4, 4, 3, 3)}, str(checkpoint))
    for argv, what in (
        (["train", str(missing)], "no_such_folder"),
        (["inspect", str(checkpoint)], "a VAE alone"),
        (["generate", "--prompt", "x", "--lora", str(tmp_path / "nope.safetensors")], "nope.safetensors"),
    ):
        result = noisy_sdlora(*argv)
        assert result.returncode == 1, result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("sdlora: error: ") and what in result.stderr
    verbose = noisy_sdlora("train", str(missing), "--verbose")
    assert verbose.returncode == 1 and "simulated" in verbose.stderr  # the noise is there; the quiet runs drop it


@pytest.mark.smoke
@pytest.mark.parametrize("keys, what", [
    ({"encoder.down.0.resnets.0.conv1.weight": (4, 4, 3, 3)}, "looks like a VAE alone"),
    ({"down_blocks.0.resnets.0.conv1.weight": (4, 4, 3, 3)}, "looks like a diffusers UNet alone"),
    ({"a.weight": (2,), "b.weight": (2,)}, "looks like 2 tensors of no known kind (first keys: a.weight, b.weight)"),
    ({"lora_unet_x.lora_down.weight": (2, 4)}, "LoRA tensors without their pairs"),
    ({"lora_unet_x.hada_w1_a": (2, 4)}, "LoHa tensors without their pairs"),
])
def test_inspect_exits_1_with_one_line_on_a_file_without_lora_modules(tmp_path, capsys, keys, what):
    path = tmp_path / "file.safetensors"
    save_file({key: torch.zeros(shape) for key, shape in keys.items()}, str(path))
    assert main(["inspect", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and str(path) in err and what in err
