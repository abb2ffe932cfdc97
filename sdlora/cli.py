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
_USER_ERRORS = {"DatasetError", "ModelError", "LoraFileError", "TrainingError", "FileNotFoundError"}


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

    p = sub.add_parser("generate", help="render images with a base model and LoRAs")
    p.add_argument("--model", default="tiny-sd15", help="diffusers folder or tiny-sd15 / tiny-sdxl")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]", help="repeatable; weight 1.0 by default")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--width", type=int, default=0, help="0: 1024 for SDXL, 512 otherwise")
    p.add_argument("--height", type=int, default=0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--count", type=int, default=1, help="images, with seeds seed, seed+1, ...")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--out", default="outputs/generated")
    p.set_defaults(func=_cmd_generate)

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

    base = load_base_model(cfg.model.base_model, allow_unsafe_pickle=cfg.model.allow_unsafe_pickle)
    modules = {"unet": base.unet, **dict(zip(component_names(base.arch), base.text_encoders))}
    tensors, _ = read_lora_file(file)
    return from_kohya_state_dict(tensors, {name: [n for n, _ in m.named_modules()] for name, m in modules.items()})


def _cmd_generate(args, extra) -> int:
    from .generate import GenerationParams, a1111_parameters, apply_loras, generate, load_pipeline, save_png

    loras = [_parse_lora_arg(item) for item in args.lora]
    pipe = load_pipeline(args.model)
    apply_loras(pipe, loras)
    pipe.set_progress_bar_config(disable=True)
    size = 1024 if pipe.sdlora_arch == "sdxl" else 512
    out = Path(args.out)
    from .export import file_hashes
    from tqdm.auto import tqdm

    lora_hashes = {Path(p).stem: file_hashes(p)["sshs_model_hash"] for p, _ in loras}
    for i in tqdm(range(args.count), desc="generating", unit="img"):
        params = GenerationParams(
            prompt=args.prompt, negative_prompt=args.negative, steps=args.steps, cfg=args.cfg,
            width=args.width or size, height=args.height or size, seed=args.seed + i, sampler=args.sampler,
        )
        image = generate(pipe, params)
        path = save_png(image, out / f"{params.seed:010d}.png",
                        a1111_parameters(params, Path(args.model).name, lora_hashes=lora_hashes))
        print(path)
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
