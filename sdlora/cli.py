"""The `sdlora` command: thin front ends that build configs/params and call the library.

Known bad input (config, dataset, model, LoRA file) ends with one line on stderr naming the file and the fix:
exit code 2 for usage and config errors, 1 for other failures.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import ConfigError, load_config

USAGE_ERRORS = (ConfigError,)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return args.func(args, extra) or 0
    except USAGE_ERRORS as e:
        print(f"sdlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdlora: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if type(e).__name__ in _USER_ERRORS:
            print(f"sdlora: error: {e}", file=sys.stderr)
            return 1
        raise


# Our own error types (and a missing file) carry complete one-line messages; anything else is a bug and keeps
# its traceback. Matched by name so this module does not import the heavy modules that define them.
_USER_ERRORS = {"DatasetError", "ModelError", "LoraFileError", "TrainingError", "DiskSpaceError", "FileNotFoundError"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlora", description="Stable Diffusion LoRA trainer")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a LoRA from a TOML config",
                       description="Train a LoRA. Overrides: table.key=value or --table.key value "
                                   "(e.g. train.learning_rate=1e-4 --lora.rank 8).")
    p.add_argument("config", help="TOML config file (see configs/)")
    p.add_argument("--resume", help="checkpoint folder, run folder, or 'latest'")
    p.add_argument("--init-lora", help="start from this LoRA file (same rank and targets)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("generate", help="render images with a base model and LoRAs",
                       description="Render PNGs with A1111 metadata. The prompt may hold A1111 tags "
                                   "<lora:name:weight> (or <lora:name:te_weight:unet_weight>), looked up by file "
                                   "name in --lora-dir; prompts over 75 tokens are encoded in chunks, as A1111 does.")
    p.add_argument("--model", default="tiny-sd15",
                   help="diffusers folder, single-file .safetensors checkpoint, or tiny-sd15 / tiny-sdxl")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]", help="repeatable; weight 1.0 by default")
    p.add_argument("--lora-dir", default="outputs", help="where <lora:name> tags in the prompt are looked up")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--width", type=int, default=0, help="0: 1024 for SDXL, 512 otherwise")
    p.add_argument("--height", type=int, default=0)
    p.add_argument("--seed", type=int, default=1, help="-1: a random seed")
    p.add_argument("--count", type=int, default=1, help="images, with seeds seed, seed+1, ...")
    p.add_argument("--sampler", default="euler", help="euler, euler_a, dpmpp_2m_karras, ddim, unipc, lcm")
    p.add_argument("--out", default="outputs/generated")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("app", help="start the Gradio app (generate with LoRAs, X/Y grids, train)",
                       description="The web app on http://127.0.0.1:7860 (local only unless --listen/--share).")
    p.add_argument("--model", default="tiny-sd15", help="base model selected at start (tiny name or a name in --models-dir)")
    p.add_argument("--models-dir", default="models", help="diffusers folders / .safetensors checkpoints to offer")
    p.add_argument("--lora-dir", default="outputs", help="LoRA files to offer (searched recursively)")
    p.add_argument("--out", default="outputs/app", help="where generated PNGs are saved")
    p.add_argument("--data-dir", default=".", help="Train tab: dataset folders must be inside this folder")
    p.add_argument("--port", type=int, default=None, help="default 7860 (or GRADIO_SERVER_PORT)")
    p.add_argument("--listen", action="store_true", help="listen on 0.0.0.0: anyone on your network can use it")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    p.set_defaults(func=_cmd_app)

    p = sub.add_parser("inspect", help="print a LoRA file's architecture, ranks, metadata and problems")
    p.add_argument("file")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("tiny-model", help="write an embedded tiny random-init model as a diffusers folder")
    p.add_argument("name", choices=["tiny-sd15", "tiny-sdxl"])
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tiny_model)

    p = sub.add_parser("demo", help="train on sample_images/ with the tiny model, export, render samples")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--config", default=None, help="default: configs/tiny.toml")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("doctor", help="check image folders before training: unreadable files, captions, duplicates",
                       description="Check datasets as training will read them; one line per finding. Exit code 1 "
                                   "when something would stop training, 0 otherwise.")
    p.add_argument("dirs", nargs="*", metavar="DATASET_DIR", help="image folders (default: data.dirs of --config)")
    p.add_argument("--config", help="TOML config whose [data] table applies (bucket settings, captions, ...)")
    p.add_argument("--resolution", type=int, help="training resolution (default: the config's, else 512)")
    p.set_defaults(func=_cmd_doctor)
    return parser


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


def _cmd_train(args, extra) -> int:
    cfg = load_config(args.config, _overrides(extra))
    from .train import train

    init = _read_init_lora(args.init_lora, cfg) if args.init_lora else None
    path = train(cfg, resume=args.resume, init_lora=init)
    print(f"LoRA written to {path}")
    return 0


def _read_init_lora(file: str, cfg) -> dict:
    from .export import from_kohya_state_dict, read_lora_file
    from .models import component_names, load_base_model

    base = load_base_model(cfg.model.base_model, allow_unsafe_pickle=cfg.model.allow_unsafe_pickle,
                           prediction_type=cfg.model.prediction_type)
    modules = {"unet": base.unet, **dict(zip(component_names(base.arch), base.text_encoders))}
    tensors, _ = read_lora_file(file)
    return from_kohya_state_dict(tensors, {name: [n for n, _ in m.named_modules()] for name, m in modules.items()})


def _cmd_generate(args, extra) -> int:
    from dataclasses import replace

    from .generate import (GenerationError, GenerationParams, LoraCache, LoraSpec, check_params, default_device,
                           default_size, generate_images, load_pipeline, model_label)

    loras = [LoraSpec(Path(path), weight) for path, weight in map(_parse_lora_arg, args.lora)]
    params = GenerationParams(prompt=args.prompt, negative_prompt=args.negative, steps=args.steps, cfg=args.cfg,
                              width=args.width, height=args.height, seed=args.seed, sampler=args.sampler)
    try:
        check_params(replace(params, width=args.width or 512, height=args.height or 512), args.count)
        for spec in loras:
            if not spec.path.is_file():
                raise FileNotFoundError(f"{spec.path}: no such LoRA file")
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # one "Loading weights" bar per component otherwise
        pipe = load_pipeline(args.model, *default_device())
        pipe.set_progress_bar_config(disable=True)
        size = default_size(pipe.sdlora_arch)
        params = replace(params, width=args.width or size, height=args.height or size)
        result = generate_images(pipe, LoraCache(pipe), params, loras, args.count, out_dir=args.out,
                                 lora_dir=args.lora_dir, model_name=model_label(args.model))
    except GenerationError as e:
        print(f"sdlora: error: {e}", file=sys.stderr)
        return 2
    for warning in result.warnings:
        print(f"sdlora: warning: {warning}", file=sys.stderr)
    for path in result.paths:
        print(path)
    logging.getLogger(__name__).info(f"{len(result.paths)} image(s) in {result.generate_seconds:.1f} s "
                                     f"(LoRA loading {result.load_seconds:.1f} s)")
    return 0


def _cmd_app(args, extra) -> int:
    from .app import AppSettings, launch

    settings = AppSettings(models_dir=Path(args.models_dir), lora_dir=Path(args.lora_dir), out_dir=Path(args.out),
                           model=args.model, data_dir=Path(args.data_dir))
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
    from .export import inspect_lora

    print(inspect_lora(args.file))
    return 0


def _cmd_doctor(args, extra) -> int:
    from dataclasses import replace

    overrides = [f"data.resolution={args.resolution}"] if args.resolution is not None else []
    data = load_config(args.config, overrides).data
    if args.dirs:
        data = replace(data, dirs=list(args.dirs))
    elif args.config is None:
        raise ConfigError("doctor: give one or more dataset folders, or --config with data.dirs")
    from .doctor import diagnose, format_report

    report = diagnose(data)
    print(format_report(report))
    return 0 if report.ok else 1


def _cmd_tiny_model(args, extra) -> int:
    from .tiny import build_tiny_model

    print(build_tiny_model(args.name, args.out, args.seed))
    return 0


def _cmd_demo(args, extra) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), Path(args.config) if args.config else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
