"""How long `sdlora inspect` and `sdlora doctor` take from the shell, against `python -c pass` in the same run.

    python benchmarks/startup_time.py               # 7 runs each, prints a markdown table
    python benchmarks/startup_time.py --runs 15

Each command runs as a user starts it (a fresh `python -m sdlora.cli` process, with this interpreter), on a LoRA
file with SD1.5 module names (84 attention modules, rank 4, fp16) and a 20-image captioned folder made here. The
median wall time is reported, and its ratio to `python -c pass` measured in the same run, so machines and loads
compare. Goal (issue 17): both under 1.5 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_inputs(folder: Path) -> tuple[Path, Path]:
    """(a kohya LoRA file on SD1.5's attention modules, 84 of them, rank 4; a folder of 20 captioned PNGs)."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    names = [f"lora_unet_down_blocks_{b}_attentions_{a}_transformer_blocks_0_attn{n}_to_{p}"
             for b in range(3) for a in range(2) for n in (1, 2) for p in ("q", "k", "v", "out_0")]
    names += [f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}_proj" for i in range(12) for p in "qkv"]
    for name in names:
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, 320, dtype=torch.float16)
        tensors[f"{name}.lora_up.weight"] = torch.randn(320, 4, dtype=torch.float16)
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    lora = folder / "lora.safetensors"
    save_file(tensors, str(lora), {"ss_base_model_version": "sd_v1"})
    images = folder / "images"
    images.mkdir()
    sources = sorted((REPO / "sample_images").glob("*.png"))
    for i in range(20):
        src = sources[i % len(sources)]
        shutil.copy(src, images / f"{i:02d}.png")
        (images / f"{i:02d}.txt").write_text(f"zkstyle, picture number {i}, " + src.with_suffix(".txt").read_text())
    return lora, images


def median_seconds(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lora, images = make_inputs(Path(tmp))
        sdlora = [sys.executable, "-m", "sdlora.cli"]
        commands = [
            ("`python -c pass`", [sys.executable, "-c", "pass"]),
            ("`sdlora --help`", [*sdlora, "--help"]),
            ("`sdlora inspect` (84 modules)", [*sdlora, "inspect", str(lora)]),
            ("`sdlora doctor` (20 images)", [*sdlora, "doctor", str(images)]),
        ]
        rows = [(name, median_seconds(argv, args.runs)) for name, argv in commands]
    baseline = rows[0][1]
    print(f"| command | median of {args.runs} runs | x `python -c pass` |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} s | {seconds / baseline:.0f} |")


if __name__ == "__main__":
    main()
