"""Compare the adapter methods on the tiny model and write the table into README.md.

    python benchmarks/adapter_methods.py                 # every method, 100 steps each, updates README.md
    python benchmarks/adapter_methods.py --steps 10 --no-readme

Every method trains the same data (sample_images, a fixed 20 % held out for validation), seed, resolution, batch
size, learning rate and number of steps; only the method's own switches differ. The table reports what each run
wrote: trainable parameters and step time (train_stats.json), the exported file's size, and the validation loss
before and after training (validation.csv). The tiny model has random weights, so the losses compare how fast
each method fits, not image quality.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- adapter-methods:start -->", "<!-- adapter-methods:end -->"

# (name in the table, config overrides). LoRA+ and PiSSA are switches of the plain LoRA method.
METHODS = [
    ("LoRA", []),
    ("LoRA, rsLoRA scale", ["lora.use_rslora=true"]),
    ("LoRA, PiSSA init", ["lora.init=pissa"]),
    ("LoRA+ (B lr x16)", ["train.loraplus_lr_ratio=16.0"]),
    ("DoRA", ["lora.method=dora"]),
    ("AdaLoRA (8 -> 4 avg)", ["lora.method=adalora", "lora.adalora_init_rank=8"]),
    ("QLoRA-style, nf4 base", ["model.quantize_base=nf4"]),
    # fp8 storage needs gradient checkpointing (see sdlora/quantize.py): compare its step time with this row.
    ("LoRA, gradient checkpointing", ["train.gradient_checkpointing=true"]),
    ("QLoRA-style, fp8 base", ["model.quantize_base=fp8", "train.gradient_checkpointing=true"]),
]


def run_method(overrides: list[str], steps: int, data: Path, out: Path) -> dict:
    """Train one method; returns the table's numbers for it."""
    from sdlora.config import load_config
    from sdlora.train import train
    from sdlora.validation import read_history

    cfg = load_config(None, [
        f'data.dirs=["{data.as_posix()}"]', "data.resolution=64", "data.min_bucket_reso=64", "data.max_bucket_reso=64",
        "data.validation_split=0.2", "lora.rank=4", "lora.alpha=4.0", "train.batch_size=4", "train.seed=0",
        "train.learning_rate=1e-3", f"train.max_train_steps={steps}", "train.save_every_n_epochs=0",
        "train.log_every_n_steps=1000", "train.report=false", f"train.validate_every_n_steps={steps}",
        f'train.output_dir="{out.as_posix()}"', *overrides,
    ])
    path = train(cfg)
    stats = json.loads((out / "train_stats.json").read_text())
    losses = [row["val_loss"] for row in read_history(out, steps)]
    return {"trainable_parameters": stats["trainable_parameters"], "file_kb": path.stat().st_size / 1024,
            "step_ms": 1000 * stats["step_s_median"], "val_loss_start": losses[0], "val_loss_end": losses[-1]}


def compare(methods: list[tuple[str, list[str]]], steps: int, work: Path) -> list[dict]:
    rows = []
    for i, (name, overrides) in enumerate(methods):
        row = {"method": name, "config": " ".join(overrides) or "(defaults)",
               **run_method(overrides, steps, REPO / "sample_images", work / f"run{i}")}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict], steps: int) -> str:
    lines = [
        f"Tiny SD1.5 model, 64 px, batch 4, rank 4, {steps} steps, learning rate 1e-3, UNet + text encoder, CPU; "
        "step time is the median after warm-up, measured in one run (compare ratios, not absolute values).",
        "",
        "| method | config | trainable parameters | file size | step time | validation loss (start -> end) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        config = ", ".join(f"`{o}`" for o in r["config"].split()) if r["config"] != "(defaults)" else "defaults"
        lines.append(f"| {r['method']} | {config} | {r['trainable_parameters']:,} | {r['file_kb']:.0f} KB | "
                     f"{r['step_ms']:.0f} ms | {r['val_loss_start']:.4f} -> {r['val_loss_end']:.4f} |")
    return "\n".join(lines)


def update_readme(readme: Path, table: str) -> None:
    """Replace the text between the README's adapter-methods markers with `table`."""
    from sdlora.atomic import write_text

    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: the markers {START} / {END} are missing; add them where the table goes")
    write_text(readme, pattern.sub(lambda _: f"{START}\n{table}\n{END}", text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--methods", nargs="*", help="names (or prefixes) from the table; default all")
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    methods = [m for m in METHODS if not args.methods or any(m[0].startswith(p) for p in args.methods)]
    with tempfile.TemporaryDirectory(prefix="sdlora-methods-") as work:
        table = markdown(compare(methods, args.steps, Path(work)), args.steps)
    print(table)
    if not args.no_readme:
        update_readme(REPO / "README.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
