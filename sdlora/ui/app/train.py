"""The Train tab's handlers: presets and the advanced fields, the config they make, training with live progress,
Stop and Resume, the loss curve and the latest samples."""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

from PIL import Image

from sdlora.errors import GenerationError, PathError
from sdlora.ui.app.engine import Engine, user_errors
from sdlora.ui.app.loras import latest_sample_files
from sdlora.ui.app.settings import AppSettings, dataset_folder, resolve_inside


def preset_choices(settings: AppSettings) -> list[str]:
    """The *.toml presets in configs_dir."""
    folder = Path(settings.configs_dir)
    return sorted(p.name for p in folder.glob("*.toml")) if folder.is_dir() else []


def preset_values(settings: AppSettings, preset: str | None) -> tuple:
    """(dataset, trigger, rank, learning rate, steps, adapter method, regularization folder, class word, auto class
    images, preservation) of a preset, to fill the Train tab."""
    from sdlora.config import load_config

    cfg = load_config(resolve_inside(settings.configs_dir, preset) if preset else None)
    d, t = cfg.data, cfg.train
    return (_data_name(settings, d.dirs[0]) if d.dirs else "", d.caption_prefix, cfg.lora.rank, t.learning_rate,
            t.max_train_steps, cfg.lora.method, d.reg_dirs[0] if d.reg_dirs else "", d.class_word,
            bool(d.class_images_per_image), bool(t.preservation_weight))


def _data_name(settings: AppSettings, folder: str) -> str:
    """A preset's dataset folder as the Train tab names it: relative to data_dir when it lies inside (presets saved
    from the app hold absolute paths, so that `sdlora train` finds them from any working directory)."""
    path = Path(folder)
    if path.is_absolute():
        with contextlib.suppress(ValueError):
            return path.resolve().relative_to(Path(settings.data_dir).resolve()).as_posix()
    return folder


# The Train tab's advanced fields, in order: the config key each one sets (everything else comes from the preset).
ADVANCED_KEYS = ("lora.targets", "lora.train_text_encoder", "train.text_encoder_lr", "data.resolution",
                 "train.batch_size", "lora.init", "model.quantize_base", "train.loraplus_lr_ratio", "sample.prompts",
                 "sample.every_n_steps", "train.save_every_n_epochs", "train.save_every_n_steps", "train.ema_decay",
                 "model.clip_skip", "train.min_timestep", "train.max_timestep", "train.new_tokens",
                 "train.embedding_lr")
# Advanced fields whose empty value means "unset" (the config's None). The page sends an emptied number field as 0,
# so 0 means unset too (the text encoder is switched off by its own checkbox, not by a zero learning rate).
_UNSET_WHEN_EMPTY = ("train.text_encoder_lr", "model.clip_skip", "train.max_timestep", "train.embedding_lr")
# Advanced fields that hold a list, shown joined by the first and read back split at the second: one item per line
# (sample prompts) or per comma (new words, resolutions: "512, 768" trains at both, "512" is one number).
_LIST_SEPARATORS = {"sample.prompts": ("\n", "\n"), "train.new_tokens": (", ", ","), "data.resolution": (", ", ",")}


def key_choices(key: str) -> list[str]:
    """The values a config key of a Literal type allows (the dropdowns offer exactly what the config accepts)."""
    import typing

    from sdlora.config import Config

    table, _, name = key.partition(".")
    hints = typing.get_type_hints(type(getattr(Config(), table)))
    return list(typing.get_args(hints[name]))


def preset_advanced(settings: AppSettings, preset: str | None) -> tuple:
    """The values of ADVANCED_KEYS in a preset, as the Train tab's advanced fields show them (lists joined by
    _LIST_SEPARATORS)."""
    from sdlora.config import load_config

    cfg = load_config(resolve_inside(settings.configs_dir, preset) if preset else None)
    values = []
    for key in ADVANCED_KEYS:
        table, _, name = key.partition(".")
        value = getattr(getattr(cfg, table), name)
        if key in _LIST_SEPARATORS:
            value = _LIST_SEPARATORS[key][0].join(map(str, value if isinstance(value, list) else [value]))
        values.append(value)
    return tuple(values)


def advanced_changes(values) -> dict:
    """The config changes of the advanced fields' values (in ADVANCED_KEYS order). Numbers come from the page as
    floats: whole ones become ints and the rest stay as typed, so `validate` reports them as the CLI would."""
    changes = {}
    for key, value in zip(ADVANCED_KEYS, values, strict=True):
        if key in _LIST_SEPARATORS:
            value = [item.strip() for item in str(value or "").split(_LIST_SEPARATORS[key][1]) if item.strip()]
            if key == "data.resolution":
                value = _typed_numbers(value)
                value = value[0] if len(value) == 1 else value
        elif key in _UNSET_WHEN_EMPTY and value in (None, "", 0):
            value = None  # empty: the learning rate, no clip skip, the schedule's end
        elif key in ("train.text_encoder_lr", "train.embedding_lr"):
            value = float(value)
        elif isinstance(value, float) and value.is_integer() and key not in ("train.loraplus_lr_ratio",
                                                                             "train.ema_decay"):
            value = int(value)
        changes[key] = value
    return changes


def _typed_numbers(texts: list[str]) -> list:
    """Typed numbers as the config reads them ("512" an int, "64.5" a float, which `validate` then refuses); a text
    that is no number stays as typed, for `validate` to name."""
    values: list = []
    for text in texts:
        try:
            number = float(text)
        except ValueError:
            values.append(text)
            continue
        values.append(int(number) if number.is_integer() else number)
    return values


def preset_start(settings: AppSettings, preset: str | None) -> tuple:
    try:
        return (*preset_values(settings, preset), *preset_advanced(settings, preset))
    except Exception:  # a broken preset shows its error when used; the page still opens
        return ("", "", 16, 1e-4, 1000, "lora", "", "", False, False, *preset_advanced(settings, None))


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # LoRA and preset names: a file name anywhere


def train_config(settings: AppSettings, preset, dataset, name, trigger, rank, learning_rate, steps, method="lora",
                 reg_folder="", class_word="", class_images=False, preservation=False, *, advanced=None):
    """The config the Train tab's fields make of a preset (the arguments of `run_train`), validated by
    `config.derive` as the CLI's are; training writes to lora_dir/<name>/.

    Raises:
        ConfigError, PathError, GenerationError: a bad value, in one line.
    """
    from sdlora.config import derive, load_config

    if not NAME.fullmatch(name or ""):
        raise GenerationError(f"LoRA name {name!r}: use letters, digits, '_', '-', '.' (at most 64)")
    data = dataset_folder(settings, dataset)
    out = resolve_inside(settings.lora_dir, name)
    return derive(load_config(resolve_inside(settings.configs_dir, preset) if preset else None), {
        "data.dirs": [data.as_posix()], "data.caption_prefix": trigger or "", "lora.rank": int(rank),
        "lora.alpha": float(int(rank)), "train.learning_rate": float(learning_rate),
        "train.max_train_steps": int(steps), "lora.method": method, "train.output_dir": out.as_posix(),
        "train.output_name": name,
        "data.reg_dirs": [dataset_folder(settings, reg_folder).as_posix()] if reg_folder else [],
        "data.class_word": class_word or "", "data.class_images_per_image": 1 if class_images else 0,
        "train.preservation_weight": 1.0 if preservation else 0.0,
        **(advanced_changes(advanced) if advanced is not None else {}),
    })


def run_train(engine: Engine, preset, dataset, name, trigger, rank, learning_rate, steps, method="lora",
              reg_folder="", class_word="", class_images=False, preservation=False, progress=None, advanced=None):
    """Train tab: train a LoRA from a preset into lora_dir/<name>/<name>.safetensors.

    The preset supplies everything but the fields of the tab (`advanced`: the values of ADVANCED_KEYS, None = the
    preset's); `alpha` follows the rank (scale 1). Keeping the base
    model: `reg_folder` (inside data_dir) holds regularization images, `class_images` has the base model draw them
    (one per training image, from the captions with the trigger replaced by `class_word`), `preservation` turns on
    base-prediction preservation at weight 1. `progress` is
    called after every step (a gr.Progress, or any callable taking (step, max_steps) and desc=); `stop_train`
    ends the run after the current step, which still saves the LoRA and a checkpoint. Returns (info line, loss
    curve as a PIL image or None, [(sample image, caption)] of the latest samples the preset rendered).
    """
    from sdlora.train.plan import fit, gpu_memory_gb

    with engine.lock, user_errors():
        cfg = train_config(engine.settings, preset, dataset, name, trigger, rank, learning_rate, steps, method,
                           reg_folder, class_word, class_images, preservation, advanced=advanced)
        out = Path(cfg.train.output_dir)
        if (out / f"{name}.safetensors").exists():
            raise PathError(f"{out / name}.safetensors exists; choose another name")
        changes: list[str] = []
        vram = gpu_memory_gb()
        if vram is not None:  # the preset is fitted to this card (the run's config.toml records how)
            cfg, changes, _ = fit(cfg, vram)
        info, plot, samples = _training(engine, cfg, progress)
    if changes:
        info += f"; fitted to the GPU's {vram:.1f} GB: " + "; ".join(changes)
    return f"{info} (press Refresh lists to use it)", plot, samples


def _training(engine: Engine, cfg, progress, resume: str | None = None) -> tuple[str, Image.Image | None, list]:
    """Train `cfg` (from its start, or from the checkpoint `resume`) with the Train tab's live progress and Stop;
    the caller holds the engine's lock. Returns (info line, loss curve, latest samples)."""
    from sdlora.train.recipe import train

    out = Path(cfg.train.output_dir)
    engine.release()
    started = time.perf_counter()
    if progress is not None:
        progress(0, desc="loading the model")
    losses: list[tuple[int, float]] = []
    last = {"step": 0, "max_steps": cfg.train.max_train_steps}

    def on_step(info: dict) -> bool:
        last.update(info)
        if info.get("loss") is not None:  # the mean since the last log step
            losses.append((info["step"], float(info["loss"])))
        if progress is not None:
            loss = f" · loss {losses[-1][1]:.4f}" if losses else ""
            progress((info["step"], info["max_steps"]), desc=f"step {info['step']}/{info['max_steps']}{loss}")
        return not engine.stop.is_set()

    engine.stop.clear()
    engine.training = True
    try:
        path = train(cfg, resume=resume, on_step=on_step)
    finally:
        engine.training = False
        stopped = engine.stop.is_set()
        engine.stop.clear()
    plot = loss_plot(losses, out / "loss.png") if losses else None
    samples = latest_samples(out / "samples")
    seconds = time.perf_counter() - started
    step, max_steps = last["step"], last["max_steps"]
    if stopped and step < max_steps:
        return (f"stopped at step {step} of {max_steps} after {seconds:.0f} s: {path}, checkpoint "
                f"{out / f'checkpoint-{step}'}", plot, samples)
    return f"trained in {seconds:.0f} s: {path}", plot, samples


def save_preset(settings: AppSettings, preset_name, *fields, advanced=None) -> tuple[str, list[str]]:
    """"Save as preset": the config the Train tab's fields make (`fields`: the arguments of `train_config` after
    `settings`) written to configs_dir/<preset_name>.toml, atomically; `sdlora train --config` runs it and the Train
    tab offers it. Returns (info line, the preset list)."""
    from sdlora.atomic import write_text
    from sdlora.config import dump_toml

    with user_errors():
        name = (preset_name or "").strip().removesuffix(".toml")
        if not NAME.fullmatch(name):
            raise GenerationError(f"preset name {preset_name!r}: use letters, digits, '_', '-', '.' (at most 64)")
        path = resolve_inside(settings.configs_dir, f"{name}.toml")
        if path.exists():
            raise PathError(f"{path} exists; choose another preset name")
        text = dump_toml(train_config(settings, *fields, advanced=advanced))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, text)
    return f"saved {path}; `sdlora train --config {path}` runs it", preset_choices(settings)


def resumable_runs(settings: AppSettings) -> list[tuple[str, str]]:
    """(label, run folder relative to lora_dir) of every run there with a config.toml and a complete checkpoint, the
    label saying where it would go on: "halted: step 20 of 1000"."""
    from sdlora.generate.grid import run_config
    from sdlora.train.checkpoint import list_checkpoints

    root = Path(settings.lora_dir)
    runs = []
    for config in sorted(root.rglob("config.toml")) if root.is_dir() else []:
        folder = config.parent
        parts = folder.relative_to(root).parts
        if any(p.startswith(".") or re.fullmatch(r"checkpoint-\d+", p) for p in parts):
            continue
        checkpoints = list_checkpoints(folder)
        if checkpoints and folder.resolve().is_relative_to(root.resolve()):
            name = folder.relative_to(root).as_posix()
            steps = run_config(folder).get("train", {}).get("max_train_steps", "?")
            runs.append((f"{name}: step {checkpoints[-1].name.removeprefix('checkpoint-')} of {steps}", name))
    return runs


def run_resume(engine: Engine, run, progress=None):
    """"Resume": continue a run in lora_dir from its newest checkpoint with its own config.toml (as `sdlora train
    --resume`), with the same live progress, Stop and results as `run_train`."""
    from sdlora.config import derive, load_config

    settings = engine.settings
    with engine.lock, user_errors():
        if run not in [value for _, value in resumable_runs(settings)]:
            raise PathError(f"{run!r} is not a run with a checkpoint in {settings.lora_dir} (press Refresh lists)")
        folder = resolve_inside(settings.lora_dir, run)
        # The run goes on in the folder it was found in, even if it was moved there after it stopped.
        cfg = derive(load_config(folder / "config.toml"), {"train.output_dir": folder.as_posix()})
        info, plot, samples = _training(engine, cfg, progress, resume=folder.as_posix())
    return f"resumed {run}, {info} (press Refresh lists to use it)", plot, samples


def stop_train(engine: Engine) -> str:
    """The Train tab's Stop button: the running training stops after its current step, saving the LoRA and a
    checkpoint. Does not wait for the job queue."""
    if not engine.training:
        return "No training is running."
    engine.stop.set()
    return "Stopping after the current step; the LoRA and a checkpoint are saved."


def loss_plot(losses: list[tuple[int, float]], path: Path) -> Image.Image:
    """The loss per step (and a moving average) as a PNG at `path`; returns the image."""
    import io

    from matplotlib.figure import Figure

    from sdlora.atomic import write_bytes

    steps, values = zip(*losses)
    fig = Figure(figsize=(6, 3), dpi=100)
    ax = fig.subplots()
    ax.plot(steps, values, lw=0.8, alpha=0.5, label="loss")
    window = max(1, len(values) // 20)
    if window > 1:
        smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                  for i in range(len(values))]
        ax.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_bytes(path, buffer.getvalue())
    image = Image.open(io.BytesIO(buffer.getvalue()))
    image.load()
    return image


def latest_samples(folder: Path) -> list[tuple[Image.Image, str]]:
    """The sample images of the latest step training rendered into `folder` (step<N>-<i>.png), with captions.

    Images, not paths: the run folder is not one the app serves files from."""
    samples = []
    for path in latest_sample_files(folder):
        with Image.open(path) as image:
            samples.append((image.convert("RGB"), f"{path.name.rsplit('-', 1)[0]} · {path.name}"))
    return samples
