"""The `sdlora` command: thin front ends that build configs/params and call the library.

Known bad input (config, dataset, model, LoRA file, settings) ends with one line on stderr naming the file and the
fix: an `SdloraError`, exiting with its `exit_code` (2 for usage, config and settings errors, 1 for the others).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from pathlib import Path

from sdlora.config import SAMPLERS, FileDtype, Targets, derive, load_config, torch_dtype
from sdlora.errors import USER_ERRORS, ConfigError, MissingFileError, SdloraError

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "plan"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _configure_output(args.verbose)
    try:
        return args.func(args, extra) or 0
    except USER_ERRORS as e:  # complete one-line messages; anything else is a bug and keeps its traceback
        print(f"sdlora: error: {e}", file=sys.stderr)
        return e.exit_code if isinstance(e, SdloraError) else 1
    except KeyboardInterrupt:
        print("sdlora: interrupted", file=sys.stderr)
        return 130


def _configure_output(verbose: bool) -> None:
    """sdlora's own log lines on stderr; other libraries' log lines, warnings and progress bars only with --verbose.

    A user acts on what sdlora says, and an error must stay one line: a library's notice (bitsandbytes' kernel
    download, diffusers' float32 note, transformers' loading bars) in front of it reads as the failure.
    transformers and diffusers log through handlers of their own, set from these variables when they are imported.
    Where logging is already set up (a test runner, a program that calls `main`), it is left as it is.
    """
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    if not verbose:
        for variable, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                                ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
            os.environ.setdefault(variable, value)
        handler.addFilter(lambda record: record.name.partition(".")[0] == "sdlora")
        logging.captureWarnings(True)  # warnings.warn() becomes a "py.warnings" record, which the filter drops
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _parser() -> argparse.ArgumentParser:
    from sdlora.models.tiny import TINY_MODELS

    parser = argparse.ArgumentParser(prog="sdlora", description="Stable Diffusion LoRA trainer")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a LoRA from a TOML config",
                       description="Train a LoRA. Overrides: table.key=value or --table.key value "
                                   "(e.g. train.learning_rate=1e-4 --lora.rank 8).")
    p.add_argument("config", help="TOML config file (see configs/)")
    p.add_argument("--resume", help="checkpoint folder, run folder, or 'latest'")
    p.add_argument("--init-lora", help="continue this LoRA file: each of its modules keeps its rank and alpha")
    p.add_argument("--allow-unsafe-pickle", action="store_true",
                   help="load a .ckpt/.pt/.bin base model (pickles can run code: only files you trust)")
    p.add_argument("--vram", type=_vram_or_auto,
                   help="fit this much GPU memory (e.g. 8GB, or auto for this GPU's): apply `sdlora plan`'s fastest "
                        "settings that fit, then train")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("generate", help="render images with a base model and LoRAs",
                       description="Render PNGs with A1111 metadata. The prompt may hold A1111 tags "
                                   "<lora:name:weight> (or <lora:name:te_weight:unet_weight>), looked up by file "
                                   "name in --lora-dir; prompts over 75 tokens are encoded in chunks, as A1111 does.")
    p.add_argument("--model", default="toy-sd15",
                   help="diffusers folder, single-file .safetensors checkpoint, or toy-sd15 (pretrained on the toy "
                        "world) / tiny-sd15 / tiny-sdxl (random weights)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="repeatable; weight 1.0 by default")
    p.add_argument("--lora-dir", default="outputs", help="where <lora:name> tags in the prompt are looked up")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="repeatable: a textual-inversion embedding (.safetensors); its file name is the word to "
                        "write in the prompt. Embeddings bundled in a LoRA file load with it")
    p.add_argument("--embedding-dir", default="", metavar="DIR",
                   help="load the embeddings in DIR (recursively) whose file name the prompt holds, as A1111 does")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--width", type=int, default=0, help="0: 1024 for SDXL, 512 otherwise")
    p.add_argument("--height", type=int, default=0)
    p.add_argument("--seed", type=int, default=1, help="-1: a random seed")
    p.add_argument("--count", type=int, default=1, help="batches, with seeds seed, seed+1, ... across all images")
    p.add_argument("--batch-size", type=_positive_int, default=1,
                   help="images per pipeline call (A1111's batch size): faster per image, more memory")
    p.add_argument("--sampler", default="euler", choices=SAMPLERS)
    p.add_argument("--clip-skip", type=int, default=1,
                   help="read the prompt this many text-encoder layers from the end (A1111's Clip skip; SD 1.x/2.x)")
    p.add_argument("--out", default="outputs/generated")
    p.add_argument("--allow-unsafe-pickle", action="store_true",
                   help="load a .ckpt/.pt/.bin base model (pickles can run code: only files you trust)")
    _add_strict_option(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("app", help="start the Gradio app (generate with LoRAs, X/Y grids, train)",
                       description="The web app on http://127.0.0.1:7860 (local only unless --listen/--share).")
    p.add_argument("--model", default="toy-sd15",
                   help="base model selected at start (toy-sd15, a tiny model, or a name in --models-dir)")
    p.add_argument("--models-dir", default="models", help="diffusers folders / .safetensors checkpoints to offer")
    p.add_argument("--embedding-dir", default="", help="textual-inversion embeddings a prompt may name (as A1111's "
                                                         "embeddings folder; default: <models-dir>/embeddings)")
    p.add_argument("--lora-dir", default="outputs", help="LoRA files to offer (searched recursively)")
    p.add_argument("--out", default="outputs/app", help="where generated PNGs are saved")
    p.add_argument("--data-dir", default=".", help="Train tab: dataset folders must be inside this folder")
    p.add_argument("--port", type=int, default=None, help="default 7860 (or GRADIO_SERVER_PORT)")
    p.add_argument("--listen", action="store_true", help="listen on 0.0.0.0: anyone on your network can use it")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    _add_strict_option(p)
    p.set_defaults(func=_cmd_app)

    p = sub.add_parser("inspect", help="print a LoRA file's architecture, ranks, metadata and problems")
    p.add_argument("file")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("tiny-model", help="write an embedded model (toy-sd15, or a tiny random-init one) as a "
                                          "diffusers folder")
    p.add_argument("name", choices=TINY_MODELS)
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tiny_model)

    p = sub.add_parser("demo", help="train on sample_images/ with the toy-world model, export, render, measure")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--config", default=None, help="default: configs/tiny.toml")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("doctor", help="check image folders before training: unreadable files, captions, duplicates",
                       description="Check datasets as training will read them; one line per finding. Exit code 1 "
                                   "when something would stop training, 0 otherwise.")
    p.add_argument("dirs", nargs="*", metavar="DATASET_DIR", help="image folders (default: data.dirs of --config)")
    p.add_argument("--config", help="TOML config whose [data] table applies (bucket settings, captions, ...)")
    p.add_argument("--resolution", type=int, help="training resolution (default: the config's, else 512)")
    p.add_argument("--reg", action="append", metavar="REG_DIR",
                   help="a regularization image folder to check with them (repeatable; default: data.reg_dirs)")
    p.add_argument("--trigger", help="the trigger word that regularization captions must not hold (default: "
                                     "data.trigger_word, else data.caption_prefix)")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("import-kohya", help="translate a kohya sd-scripts / kohya_ss config into an sdlora config",
                       description="Read a kohya training config (sd-scripts --config_file TOML or the kohya_ss "
                                   "GUI's JSON) and its dataset config, write the sdlora TOML and list what maps and "
                                   "what does not.")
    p.add_argument("config", help="the kohya training config (.toml or .json)")
    p.add_argument("--dataset-config", help="kohya's --dataset_config TOML ([[datasets]] / [[datasets.subsets]])")
    p.add_argument("--out", required=True, help="the sdlora config to write (TOML; `sdlora train` runs it)")
    p.set_defaults(func=_cmd_import_kohya)

    p = sub.add_parser("merge-into-base", help="fuse LoRAs into a base model and write the merged model",
                       description="Write BASE + weight * LoRA delta for each LoRA, as a diffusers folder or (OUT "
                                   "ending in .safetensors) a single-file checkpoint for A1111/ComfyUI.")
    p.add_argument("--model", required=True,
                   help="base model: diffusers folder, single-file .safetensors checkpoint, or a built-in name "
                        "(toy-sd15, tiny-sd15, tiny-sdxl)")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]",
                   help="repeatable; weight 1.0 by default")
    p.add_argument("--out", required=True, help="output folder, or a .safetensors file for a single-file checkpoint")
    _add_written_options(p)
    _add_strict_option(p)
    p.set_defaults(func=_cmd_merge_into_base)

    p = sub.add_parser("merge-loras", help="merge several LoRAs into one LoRA file",
                       description="Sum the weighted deltas of LoRAs for one model family into one kohya LoRA. "
                                   "Without --rank the ranks are concatenated (exact); with --rank the sum is cut "
                                   "to that rank by SVD.")
    p.add_argument("loras", nargs="+", metavar="FILE[:WEIGHT]", help="LoRA files, weight 1.0 by default")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--rank", type=_positive_int, help="SVD to this rank per module (default: concatenate, exact)")
    _add_written_options(p)
    p.set_defaults(func=_cmd_merge_loras)

    p = sub.add_parser("resize", help="change a LoRA's rank by SVD (fixed rank or kept energy)",
                       description="Cut every module of a LoRA to a lower rank by SVD and print the relative "
                                   "Frobenius error per module and overall. Keeping the full rank is lossless.")
    p.add_argument("file", help="input LoRA .safetensors")
    p.add_argument("--out", required=True, help="output .safetensors file")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=_positive_int, help="the same rank for every module (at most its current rank)")
    how.add_argument("--energy", type=_fraction, metavar="FRACTION",
                     help="per module, the smallest rank keeping this fraction of the sum of squared singular "
                          "values, e.g. 0.95")
    _add_written_options(p)
    p.set_defaults(func=_cmd_resize)

    p = sub.add_parser("extract", help="extract a LoRA from the difference of a fine-tuned model and its base",
                       description="SVD of tuned - base on the modules LoRA training adapts; prints the relative "
                                   "Frobenius error per module and overall.")
    p.add_argument("--base", required=True, help="base model: diffusers folder, single file, or tiny name")
    p.add_argument("--tuned", required=True, help="the fine-tuned model (same architecture)")
    p.add_argument("--rank", type=_positive_int, required=True, help="LoRA rank per module")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--targets", choices=typing.get_args(Targets), default="attn",
                   help="module set, as lora.targets in training (default attn: attention projections)")
    p.add_argument("--conv", action="store_true", help="also the ResNet and sampler convs (LoCon)")
    _add_written_options(p)
    p.set_defaults(func=_cmd_extract)

    grid_help = ("Render every saved LoRA file of a run (rows, by epoch/step, final last) at several weights "
                 "(columns) for each prompt, with fixed seeds, into one PNG. Prompts, seed, size and sampler "
                 "default to the run's config.toml [sample].")
    p = sub.add_parser("grid", help="a labelled grid of a run's saved LoRA files x weights x prompts",
                       description=grid_help)
    p.add_argument("sources", nargs="+", metavar="RUN_DIR_OR_FILE", help="run folders and/or LoRA files")
    p.add_argument("--model", help="base model (default: model.base_model of the run's config.toml)")
    p.add_argument("--vae", help="separate VAE (default: the run's model.vae)")
    p.add_argument("--weights", type=_float_list, default=[0.0, 0.5, 0.75, 1.0], help="default 0,0.5,0.75,1")
    p.add_argument("--prompt", action="append", help="repeatable; kohya flags (--n/--w/--h/--d/--l/--s) allowed")
    p.add_argument("--negative")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float)
    p.add_argument("--width", type=int, help="0: 1024 for SDXL, 512 otherwise")
    p.add_argument("--height", type=int)
    p.add_argument("--sampler", choices=SAMPLERS)
    p.add_argument("--out", help="PNG to write (default: RUN_DIR/grid.png)")
    p.add_argument("--clip", metavar="PATH", help="local CLIP model folder: also write RUN_DIR/similarity.csv "
                   "(CLIP-T to the prompt, CLIP-I to the training images, per file and weight)")
    p.set_defaults(func=_cmd_grid)

    p = sub.add_parser("report", help="write RUN_DIR/report.md: config, dataset, loss curves, grid, best epoch")
    p.add_argument("run_dir")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=None,
                   help="--grid renders RUN_DIR/grid.png first; --no-grid leaves it out (default: shown if there)")
    p.add_argument("--model", help="base model for --grid (default: the run's model.base_model)")
    p.add_argument("--weights", type=_float_list, default=[0.0, 0.5, 0.75, 1.0], help="--grid weights")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("plan", help="estimate a config's peak GPU memory and the settings that fit a card",
                       description="Estimate peak GPU memory from the model's configs (no weights are loaded) and "
                                   "pick the fastest settings that fit --vram. Overrides as in `sdlora train`; "
                                   "model.base_model may also be sd15 / sdxl to plan before downloading.")
    p.add_argument("config", help="TOML config file")
    p.add_argument("--vram", required=True, type=_vram, help="the GPU's memory, e.g. 8GB")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("bench", help="time training steps (full-size random model on a GPU, tiny on CPU)",
                       description="One JSON line per setting: images/s, step time, peak VRAM, TFLOP/s, MFU.")
    from sdlora.train.bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=_cmd_bench)

    for name, command in sub.choices.items():
        what = "list the error of every module, and " if name in _SVD_TOOLS else ""
        command.add_argument("--verbose", action="store_true",
                             help=f"{what}show other libraries' warnings, log lines and progress bars too")
    return parser


_SVD_TOOLS = ("merge-loras", "resize", "extract")  # their reports list every module's error with --verbose


def _add_strict_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict", action="store_true",
                   help="refuse a LoRA file with modules that match nothing in the base model (by default they are "
                        "left out with a warning)")


def _add_written_options(p: argparse.ArgumentParser) -> None:
    """--dtype of the files the LoRA tools write."""
    p.add_argument("--dtype", choices=typing.get_args(FileDtype), default="fp16",
                   help="dtype of the written tensors (default fp16)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _vram(text: str) -> float:
    from sdlora.errors import PlanError
    from sdlora.train.plan import parse_vram

    try:
        return parse_vram(text)
    except PlanError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _vram_or_auto(text: str) -> float | str:
    return "auto" if text.strip().lower() == "auto" else _vram(text)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {value:g}")
    return value


def _overrides(extra: list[str]) -> list[str]:
    """`--train.lr 1e-4` and `train.lr=1e-4` both become `train.lr=1e-4`."""
    items, i = [], 0
    while i < len(extra):
        arg = extra[i]
        if arg.startswith("--") and "=" not in arg:
            if i + 1 >= len(extra):
                raise ConfigError(f"option {arg} needs a value")
            items.append(f"{arg[2:]}={extra[i + 1]}")
            i += 2
        else:
            items.append(arg[2:] if arg.startswith("--") else arg)
            i += 1
    return items


def _cmd_plan(args, extra) -> int:
    from sdlora.train.plan import report

    print(report(load_config(args.config, _overrides(extra)), args.vram))
    return 0


def _cmd_bench(args, extra) -> int:
    from sdlora.train.bench import run_all

    return run_all(args)


def _cmd_train(args, extra) -> int:
    unsafe = ["model.allow_unsafe_pickle=true"] if args.allow_unsafe_pickle else []
    cfg = load_config(args.config, _overrides(extra) + unsafe)
    if args.vram is not None:
        from sdlora.train.plan import fit

        cfg, changes, summary = fit(cfg, args.vram)
        print("\n".join([summary, *(f"  - {c}" for c in changes)]))
    from sdlora.train.recipe import train

    path = train(cfg, resume=args.resume, init_lora=args.init_lora)
    if int(os.environ.get("RANK", "0")) != 0:  # other ranks of a multi-process run: rank 0 reports
        return 0
    if cfg.train.report:
        from sdlora.ui.report import finish_run

        finish_run(cfg, cfg.train.output_dir)  # after train() returns, so its models are freed first
    print(f"LoRA written to {path}")
    return 0


def _cmd_generate(args, extra) -> int:
    from dataclasses import replace

    from sdlora.generate.pipeline import (
        GenerationParams,
        LoraCache,
        LoraSpec,
        check_params,
        default_device,
        default_size,
        generate_images,
        load_pipeline,
        model_label,
    )

    loras = [LoraSpec(Path(path), weight) for path, weight in map(_parse_lora_arg, args.lora)]
    params = GenerationParams(prompt=args.prompt, negative_prompt=args.negative, steps=args.steps, cfg=args.cfg,
                              width=args.width, height=args.height, seed=args.seed, sampler=args.sampler,
                              clip_skip=args.clip_skip)
    check_params(replace(params, width=args.width or 512, height=args.height or 512), args.count)
    for path, what in [(spec.path, "LoRA") for spec in loras] + [(Path(e), "embedding") for e in args.embedding]:
        if not path.is_file():
            raise MissingFileError(f"{path}: no such {what} file")
    pipe = load_pipeline(args.model, *default_device(), allow_unsafe_pickle=args.allow_unsafe_pickle)
    pipe.set_progress_bar_config(disable=True)
    size = default_size(pipe)
    params = replace(params, width=args.width or size, height=args.height or size)
    cache = LoraCache(pipe, strict=args.strict)
    for embedding in args.embedding:
        cache.embed(embedding)
    result = generate_images(pipe, cache, params, loras, args.count, out_dir=args.out, lora_dir=args.lora_dir,
                             model_name=model_label(args.model), batch_size=args.batch_size,
                             embedding_dir=args.embedding_dir or None)
    _print_warnings(result.warnings)
    for path in result.paths:
        print(path)
    logger.info(f"{len(result.paths)} image(s) in {result.generate_seconds:.1f} s "
                                     f"(LoRA loading {result.load_seconds:.1f} s)")
    return 0


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"sdlora: warning: {warning}", file=sys.stderr)


def _cmd_app(args, extra) -> int:
    from sdlora.ui.app.page import launch
    from sdlora.ui.app.settings import AppSettings

    settings = AppSettings(models_dir=Path(args.models_dir), lora_dir=Path(args.lora_dir), out_dir=Path(args.out),
                           model=args.model, data_dir=Path(args.data_dir), strict=args.strict,
                           embedding_dir=Path(args.embedding_dir or Path(args.models_dir) / "embeddings"))
    launch(settings, listen=args.listen, share=args.share, port=args.port)
    return 0


def _parse_lora_arg(item: str) -> tuple[str, float]:
    path, sep, weight = item.rpartition(":")
    if sep and path and _is_number(weight):
        return path, float(weight)
    return item, 1.0


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _cmd_inspect(args, extra) -> int:
    from sdlora.adapters.files import inspect_lora  # not from .export, which imports peft: inspect reads a file only

    print(inspect_lora(args.file))
    return 0


def _cmd_merge_into_base(args, extra) -> int:
    from sdlora.generate.merge import merge_into_base

    print(merge_into_base(args.model, [_parse_lora_arg(item) for item in args.lora], args.out, torch_dtype(args.dtype),
                          strict=args.strict))
    return 0


def _cmd_merge_loras(args, extra) -> int:
    from sdlora.adapters.tools import merge_lora_files

    report = merge_lora_files([_parse_lora_arg(item) for item in args.loras], args.out, args.rank,
                              torch_dtype(args.dtype))
    print(report.summary(verbose=args.verbose))
    print(f"LoRA written to {args.out}")
    return 0


def _cmd_resize(args, extra) -> int:
    from sdlora.adapters.tools import resize_lora_file

    report = resize_lora_file(args.file, args.out, args.rank, args.energy, torch_dtype(args.dtype))
    print(report.summary(verbose=args.verbose))
    print(f"LoRA written to {args.out}")
    return 0


def _cmd_extract(args, extra) -> int:
    from sdlora.adapters.tools import extract_lora_file

    report = extract_lora_file(args.base, args.tuned, args.out, args.rank, args.targets, args.conv,
                               torch_dtype(args.dtype))
    print(report.summary(verbose=args.verbose))
    print(f"LoRA written to {args.out}")
    return 0


def _cmd_import_kohya(args, extra) -> int:
    from sdlora.atomic import write_text
    from sdlora.config import dump_toml
    from sdlora.ui.kohya_import import read_kohya_file, translate

    dataset = read_kohya_file(args.dataset_config) if args.dataset_config else None
    result = translate(read_kohya_file(args.config), dataset)
    write_text(Path(args.out), dump_toml(result.config))
    print(result.report())
    print(f"sdlora config written to {args.out}; train with: sdlora train {args.out}")
    return 0


def _cmd_doctor(args, extra) -> int:
    changes = {"data.resolution": args.resolution} if args.resolution is not None else {}
    if args.reg:
        changes["data.reg_dirs"] = list(args.reg)
    if args.trigger is not None:
        changes["data.trigger_word"] = args.trigger
    if args.dirs:
        changes["data.dirs"] = list(args.dirs)
    elif args.config is None:
        raise ConfigError("doctor: give one or more dataset folders, or --config with data.dirs")
    cfg = derive(load_config(args.config), changes)
    from sdlora.data.doctor import diagnose, format_report

    report = diagnose(cfg.data)
    print(format_report(report))
    return 0 if report.ok else 1


def _cmd_tiny_model(args, extra) -> int:
    from sdlora.models.tiny import build_tiny_model

    print(build_tiny_model(args.name, args.out, args.seed))
    return 0


def _cmd_demo(args, extra) -> int:
    from sdlora.ui.demo import run_demo

    run_demo(Path(args.out), Path(args.config) if args.config else None)
    return 0


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers")
    return values


def _cmd_grid(args, extra) -> int:
    from sdlora.generate.grid import make_grid
    from sdlora.ui.similarity import load_clip, markdown_table, measure_grid

    clip = load_clip(args.clip) if args.clip else None  # before the grid: a wrong path fails at once
    result = make_grid(args.sources, args.model, args.weights, args.prompt, args.out, negative=args.negative,
                       seed=args.seed, steps=args.steps, cfg=args.cfg, width=args.width, height=args.height,
                       sampler=args.sampler, vae=args.vae)
    _print_warnings(result.warnings)
    print(result.path)
    if clip is not None:
        rows, path = measure_grid(clip, result, next((s for s in map(Path, args.sources) if s.is_dir()), None))
        print(markdown_table(rows))
        print(path)
    return 0


def _cmd_report(args, extra) -> int:
    from sdlora.generate.grid import make_grid
    from sdlora.ui.report import write_report

    grid: Path | typing.Literal[False] | None = False if args.grid is False else None  # None: RUN_DIR/grid.png if any
    if args.grid:
        grid = make_grid([args.run_dir], args.model, args.weights).path
    print(write_report(args.run_dir, grid=grid))
    return 0

