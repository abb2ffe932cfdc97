"""What each adapter method's LoRA does to pictures, on the toy-world model; writes the README's table.

    python benchmarks/lora_quality.py                      # every row, the demo's config, updates README.md
    python benchmarks/lora_quality.py --rows LoRA DoRA --no-readme
    python benchmarks/lora_quality.py --lora my.safetensors   # measure a file instead of training one

Every row trains the demo's LoRA (configs/tiny.toml: sample_images/, the toy-world model `toy-sd15`) with the
same data, seed and steps; only the row's own switches differ. Each file is then measured by sdlora.toyworld.quality on
the 12 held-out prompts at weights 0 / 0.5 / 1 with fixed seeds: the style score, content kept (colour, position,
shape), bleed (the style without the trigger word), and whether weight 0 renders the base model bit for bit.
Rows print as JSON lines and are kept in benchmarks/lora_quality.jsonl (the results of record: a row measured again
replaces its line); the README's table is made from that file, in ROWS order, so running some rows keeps the others.
To add a row (a new adapter kind, a training option), add its name and config overrides to ROWS.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- lora-quality:start -->", "<!-- lora-quality:end -->"
CONFIG = REPO / "configs" / "tiny.toml"
RECORD = REPO / "benchmarks" / "lora_quality.jsonl"
REG_IMAGES = "{reg_images}"  # in a row's overrides: a folder of regularization images that `plain_renders` draws

# (name in the table, config overrides). LoRA+ and PiSSA are switches of the plain LoRA method.
ROWS = [
    ("LoRA", []),
    ("LoRA, rsLoRA scale", ["lora.use_rslora=true"]),
    # peft's PiSSA starts Linear layers only, and SD1's proj_in/proj_out are 1x1 convs: attention only.
    ("LoRA, PiSSA init (attn)", ["lora.init=pissa", "lora.targets=attn"]),
    ("LoRA+ (B lr x16)", ["train.loraplus_lr_ratio=16.0"]),
    ("DoRA", ["lora.method=dora"]),
    ("AdaLoRA (16 -> 8 avg)", ["lora.method=adalora", "lora.adalora_init_rank=16"]),
    # LyCORIS, at LoRA's file size (rank 8: 274,432 values): LoHa's two rank-4 products hold exactly as many, LoKr's
    # Kronecker factors (the small one 2 x 2, the other rank 16) 262,496; alpha = rank, scale 1 as LoRA's.
    ("LoHa", ["lora.method=loha", "lora.rank=4", "lora.alpha=4.0"]),
    ("LoKr", ["lora.method=lokr", "lora.decompose_factor=2", "lora.rank=16", "lora.alpha=16.0"]),
    ("QLoRA-style, nf4 base", ["model.quantize_base=nf4"]),
    # fp8 storage needs gradient checkpointing (see sdlora/models/quantize.py).
    ("QLoRA-style, fp8 base", ["model.quantize_base=fp8", "train.gradient_checkpointing=true"]),
    # Keeping the base model: regularization images a user would collect (the training scenes drawn plain, captioned
    # without the trigger), class images the base model draws itself, and base-prediction preservation.
    ("LoRA + reg images", [f'data.reg_dirs=["{REG_IMAGES}"]']),
    ("LoRA + auto class images", ["data.class_images_per_image=1"]),
    ("LoRA + base-prediction preservation", ["train.preservation_weight=0.1"]),
    # Training options of issue 21 on the plain LoRA.
    ("LoRA + EMA 0.99", ["train.ema_decay=0.99"]),
    ("LoRA, logit-normal timesteps", ["train.timestep_sampling=logit_normal"]),
    ("LoRA, pseudo-Huber loss (snr)", ["train.loss_type=huber"]),
    ("LoRA, debiased estimation", ["train.debiased_estimation=true"]),
    # Pivotal tuning (issue 20): the trigger word becomes a new token trained beside the LoRA.
    ("LoRA + pivotal word (lr 5e-3)", ['train.new_tokens=["zkstyle"]', "train.embedding_lr=5e-3"]),
    ("LoRA + pivotal word (lr 1e-3)", ['train.new_tokens=["zkstyle"]', "train.embedding_lr=1e-3"]),
]


def train_row(overrides: list[str], out: Path, steps: int | None) -> tuple[Path, dict]:
    """Train the demo LoRA with `overrides`; the file and the run's figures (time, size, parameters)."""
    from sdlora.config import load_config
    from sdlora.train.recipe import train

    reg = plain_renders(out / "reg") if any(REG_IMAGES in o for o in overrides) else out
    cfg = load_config(CONFIG, [f'train.output_dir="{out.as_posix()}"', "train.report=false", "sample.prompts=[]",
                               *([f"train.max_train_steps={steps}"] if steps else []),
                               *(o.replace(REG_IMAGES, reg.as_posix()) for o in overrides)])
    started = time.perf_counter()
    path = train(cfg)
    stats = json.loads((out / "train_stats.json").read_text())
    return path, {"train_s": time.perf_counter() - started, "step_s": stats["step_s_median"],
                  "file_kb": path.stat().st_size / 1024, "trainable_parameters": stats["trainable_parameters"],
                  "steps": cfg.train.max_train_steps}


def plain_renders(folder: Path) -> Path:
    """The demo's training scenes drawn in the plain toy-world look, captioned without the trigger word: the
    regularization set a user would collect (same subjects, not the style)."""
    from sdlora.toyworld.render import render
    from sdlora.toyworld.style_set import SAMPLE_SIZE, training_scenes

    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(training_scenes(), start=1):
        render(scene, SAMPLE_SIZE).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(scene.caption() + "\n", encoding="utf-8")
    return folder


def measure_file(path: Path, seeds: tuple[int, ...]) -> dict:
    from sdlora.generate.pipeline import LoraCache, load_pipeline
    from sdlora.toyworld.quality import RenderSettings, measure

    pipe = load_pipeline("toy-sd15")
    pipe.set_progress_bar_config(disable=True)
    return measure(pipe, LoraCache(pipe), path, settings=RenderSettings(seeds=seeds)).to_json()


def run(rows: list[tuple[str, list[str]]], work: Path, steps: int | None, seeds: tuple[int, ...]) -> list[dict]:
    results = []
    for i, (name, overrides) in enumerate(rows):
        path, figures = train_row(overrides, work / f"row{i}", steps)
        row = {"row": name, "config": " ".join(overrides) or "(demo config)", **figures,
               **measure_file(path, seeds)}
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def merge_record(record: Path, results: list[dict]) -> list[dict]:
    """The rows of record with `results` in place of their namesakes, in ROWS order (rows no longer in ROWS drop)."""
    kept = {}
    if record.is_file():
        kept = {r["row"]: r for r in map(json.loads, record.read_text(encoding="utf-8").splitlines()) if r}
    kept.update((r["row"], r) for r in results)
    return [kept[name] for name, _ in ROWS if name in kept]


def markdown(rows: list[dict], seeds: int) -> str:
    steps = rows[0]["steps"] if rows else 0
    lines = [
        f"Toy-world model `toy-sd15`, the demo's config (`configs/tiny.toml`: sample_images/, 128 px, {steps} steps), "
        f"measured on 12 held-out prompts x {seeds} seed(s); CPU, times from one run (compare ratios). Style: 0 = "
        "plain toy world, 1 = the trained style; content: objects drawn in the prompt's colour / position / shape; "
        "bleed: the style score without the trigger word, LoRA at weight 1.",
        "",
        "| row | config | style w0 -> 0.5 -> 1 | content base | content w1 | bleed | w0 = base | file | train time | "
        "step |",
        "|---|---|---|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        config = ", ".join(f"`{o}`" for o in r["config"].split()) if r["config"] != "(demo config)" else "demo config"
        w = r["by_weight"]
        lines.append(
            f"| {r['row']} | {config} | {w['0']['style']:.2f} -> {w['0.5']['style']:.2f} -> {w['1']['style']:.2f} | "
            f"{_content(w['0'])} | {_content(w['1'])} | {r['bleed']:.2f} | "
            f"{'yes' if r['weight0_equals_base'] else 'NO'} | {r['file_kb']:.0f} KB | {r['train_s']:.0f} s | "
            f"{_step(r)} |")
    return "\n".join(lines)


def _step(row: dict) -> str:
    return f"{row['step_s']:.2f} s" if "step_s" in row else "not recorded"  # rows measured before step_s was kept


def _content(scores: dict) -> str:
    return f"{scores['colour']:.0%} / {scores['position']:.0%} / {scores['shape']:.0%}"


def update_readme(readme: Path, table: str) -> None:
    """Replace the text between the README's lora-quality markers with `table`."""
    from sdlora.atomic import write_text

    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: the markers {START} / {END} are missing; add them where the table goes")
    write_text(readme, pattern.sub(lambda _: f"{START}\n{table}\n{END}", text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", help="names (or prefixes) from ROWS; default all")
    parser.add_argument("--steps", type=int, help="training steps (default: the demo config's)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per held-out prompt")
    parser.add_argument("--lora", type=Path, help="measure this file instead of training rows")
    parser.add_argument("--no-readme", action="store_true",
                        help="print the table only (the record and the README stay as they are)")
    args = parser.parse_args(argv)
    seeds = tuple(range(1, args.seeds + 1))
    if args.lora:
        print(json.dumps({"row": args.lora.name, **measure_file(args.lora, seeds)}))
        return 0
    rows = [r for r in ROWS if not args.rows or any(r[0].startswith(p) for p in args.rows)]
    with tempfile.TemporaryDirectory(prefix="sdlora-quality-") as work:
        results = run(rows, Path(work), args.steps, seeds)
    if args.no_readme:
        print(markdown(results, len(seeds)))
        return 0
    from sdlora.atomic import write_text

    recorded = merge_record(RECORD, results)
    write_text(RECORD, "".join(json.dumps(r) + "\n" for r in recorded))
    table = markdown(recorded, len(seeds))
    print(table)
    update_readme(REPO / "README.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
