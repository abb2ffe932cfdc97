"""The Gradio app (`sdlora app`, `python app.py`): generate with a base model and LoRAs, compare LoRA weights in
an X/Y grid, read the settings back from a PNG, train a LoRA from a preset (live progress, loss curve, samples, a
Stop button) and edit a dataset's captions.

Every image is rendered by `generate.generate_images`, the function `sdlora generate` calls, so the same
settings and seed give the same image in both. The app listens on 127.0.0.1 unless told otherwise, runs one
job at a time, and only opens models and LoRAs inside the folders it was started with.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import random
import re
import threading
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from PIL import Image

from sdlora.config import SAMPLERS
from sdlora.errors import USER_ERRORS, GenerationError, LoraFileError, PathError
from sdlora.generate.grid import grid_parameters, label_grid
from sdlora.generate.pipeline import (
    GenerationParams,
    LoraCache,
    LoraSpec,
    default_device,
    generate_images,
    list_lora_files,
    load_pipeline,
    model_label,
    parse_a1111_parameters,
    save_png,
)
from sdlora.models.arch import ARCH_NAMES
from sdlora.models.tiny import TINY_MODELS

logger = logging.getLogger(__name__)

SLOTS = 4  # LoRA rows in the Generate tab; more can be added with <lora:name:weight> tags in the prompt
MAX_GRID_CELLS = 64



@dataclass
class AppSettings:
    """What the app may read and where it writes; fixed when it starts (nothing in the UI changes them)."""

    models_dir: Path = Path("models")  # diffusers folders and single-file .safetensors checkpoints
    lora_dir: Path = Path("outputs")  # searched recursively for *.safetensors
    out_dir: Path = Path("outputs/app")  # every generated PNG, and grids/ for X/Y grids
    model: str = "toy-sd15"  # the base model selected at start
    data_dir: Path = Path(".")  # Train tab: dataset folders must be inside this one
    configs_dir: Path = Path("configs")  # Train tab: the presets (*.toml)
    strict: bool = False  # refuse LoRA files with modules that match nothing in the model (else: a warning)
    embedding_dir: Path = Path("models/embeddings")  # embeddings a prompt names by file name (A1111's folder)


# --------------------------------------------------------------------------------------------------------------
# Folders: what can be picked, and resolving a picked name safely
# --------------------------------------------------------------------------------------------------------------

def resolve_inside(root: str | Path, name: str) -> Path:
    """The path of `name` (a relative name as listed in the UI) inside `root`.

    Raises:
        PathError: empty, absolute, with `..`, or (through a symlink) resolving outside `root`.
    """
    if not name or "\x00" in name:
        raise PathError("no name given")
    rel = PurePosixPath(name.replace("\\", "/"))
    if rel.is_absolute() or PureWindowsPath(name).drive or ".." in rel.parts:
        raise PathError(f"{name!r}: only names inside {root} can be used (no absolute paths, no '..')")
    base = Path(root).resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base):
        raise PathError(f"{name!r} leads outside {root} (a symlink?); only files inside it can be used")
    return path


OWN_VAE = "model's own"


def _is_vae(path: Path) -> bool:
    """A diffusers VAE folder (config.json of an AutoencoderKL), or a .safetensors file with VAE weights only
    (an encoder/decoder and no UNet or text encoder)."""
    import json

    if path.is_dir():
        with contextlib.suppress(Exception):
            return json.loads((path / "config.json").read_text()).get("_class_name") == "AutoencoderKL"
        return False
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # unreadable: left to the model list, which reports the error when it is chosen
        return False
    decoder = any(k.startswith(("decoder.", "first_stage_model.decoder.", "vae.decoder.")) for k in keys)
    others = ("model.diffusion_model.", "cond_stage_model.", "conditioner.", "unet.", "text_encoder", "lora_")
    return decoder and not any(k.startswith(others) for k in keys)


def model_choices(settings: AppSettings) -> list[str]:
    """The tiny models, then diffusers folders and single-file .safetensors checkpoints in models_dir (VAE
    files are listed by `vae_choices` instead)."""
    choices = list(TINY_MODELS)
    folder = Path(settings.models_dir)
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue
            if (path / "model_index.json").is_file() or (path.is_file() and path.suffix == ".safetensors"
                                                         and not _is_vae(path)):
                choices.append(path.name)
    return choices


def vae_choices(settings: AppSettings) -> list[str]:
    """"model's own", then the VAE .safetensors files and diffusers VAE folders in models_dir."""
    folder = Path(settings.models_dir)
    found = [p.name for p in sorted(folder.iterdir()) if not p.name.startswith(".") and _is_vae(p)] \
        if folder.is_dir() else []
    return [OWN_VAE, *found]


def resolve_vae(settings: AppSettings, name: str | None) -> str:
    """"" for the model's own VAE, else the path of a VAE file or folder inside models_dir."""
    if not name or name == OWN_VAE:
        return ""
    if name not in vae_choices(settings):
        raise PathError(f"{name!r} is not a VAE in {settings.models_dir} (press Refresh after adding one)")
    return str(resolve_inside(settings.models_dir, name))


def lora_choices(settings: AppSettings) -> list[str]:
    """LoRA files in lora_dir as relative names (`run/name.safetensors`), sorted."""
    root = Path(settings.lora_dir)
    return [path.relative_to(root).as_posix() for path in list_lora_files(root)]


# --------------------------------------------------------------------------------------------------------------
# The LoRA browser: what each file is, and whether it fits the base model
# --------------------------------------------------------------------------------------------------------------

LORA_COLUMNS = ["LoRA", "family", "for this model", "method", "rank", "size", "trained", "trigger words"]


@dataclass
class LoraInfo:
    """What the LoRA browser shows of one file, read from its safetensors header (no tensor data is read, so a
    folder of large files lists quickly)."""

    name: str  # relative to lora_dir, as the LoRA lists name it
    path: Path
    size: int  # bytes
    arch: str = ""  # "sd1" | "sd2" | "sdxl"; "" when nothing in the file says
    method: str = ""  # LoRA, DoRA, LoHa or LoKr
    ranks: tuple[int, ...] = ()  # the distinct ranks of its modules (AdaLoRA's vary); () when unknown
    trained: str = ""  # "epoch 2, step 40", as far as its name and metadata say
    triggers: list[str] = field(default_factory=list)  # trigger phrase, most frequent caption tags, output name
    problem: str = ""  # why the file cannot be read; "" when it can

    @property
    def family(self) -> str:
        return ARCH_NAMES.get(self.arch, "?")

    @property
    def rank(self) -> str:
        return "-".join(str(r) for r in sorted({self.ranks[0], self.ranks[-1]})) if self.ranks else "?"


def describe_lora(settings: AppSettings, name: str) -> LoraInfo:
    """The browser's facts of one LoRA file (`name` relative to lora_dir), from the readers `sdlora inspect` and
    the X/Y grid use: `detect_arch` on the header's shapes, `describe_lora_file` for epoch and step,
    `tag_frequency` for the captions' tags."""
    from sdlora.adapters.files import detect_arch, group_lora_keys, tag_frequency
    from sdlora.generate.grid import describe_lora_file
    from sdlora.models.single_file import read_header

    path = resolve_inside(settings.lora_dir, name)
    info = LoraInfo(name, path, path.stat().st_size)
    try:
        shapes, metadata = read_header(path)
    except USER_ERRORS as e:
        info.problem = str(e)
        return info
    # Shapes without data: detect_arch and the ranks only look at shapes.
    tensors = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    with contextlib.suppress(LoraFileError):  # nothing says which family: shown as "?" and not refused
        info.arch = detect_arch(tensors, metadata)
    modules, _ = group_lora_keys(tensors)
    info.ranks = tuple(sorted({parts["down"].shape[0] for parts in modules.values() if "down" in parts}))
    if not info.ranks and str(metadata.get("ss_network_dim", "")).isdigit():  # LyCORIS: the rank it was trained at
        info.ranks = (int(metadata["ss_network_dim"]),)
    keys = list(shapes)
    info.method = next((method for method, mark in (("LoHa", ".hada_w1_"), ("LoKr", ".lokr_w"),
                                                    ("DoRA", "dora_scale"), ("DoRA", "lora_magnitude_vector"))
                        if any(mark in key for key in keys)), "LoRA")
    info.trained = describe_lora_file(path).when
    tags: list[str] = []
    with contextlib.suppress(ValueError):  # a broken ss_tag_frequency: `sdlora inspect` reports it
        tags = [tag for tag, _ in tag_frequency(metadata).most_common(8)]
    candidates = [metadata.get("modelspec.trigger_phrase", ""), *tags, metadata.get("ss_output_name", "")]
    info.triggers = list(dict.fromkeys(t.strip() for t in candidates if t and t.strip()))
    return info


def model_family(settings: AppSettings, model: str | None) -> str:
    """"sd1", "sd2" or "sdxl" of a base model, from its configs (no weights loaded); "" when it cannot be told
    (loading it reports why)."""
    from sdlora.models.loading import detect_model

    with contextlib.suppress(Exception):
        return detect_model(resolve_model(settings, model or ""))
    return ""


def lora_fits(info: LoraInfo, family: str) -> str:
    """"" when the LoRA can be switched on for a base model of `family`, else why not (one line)."""
    if info.problem:
        return info.problem
    if info.arch and family and info.arch != family:
        return (f"{info.name} is a LoRA for {ARCH_NAMES[info.arch]} and the base model is {ARCH_NAMES[family]}; "
                f"choose a {ARCH_NAMES[info.arch]} base model to use it")
    return ""


def lora_table(settings: AppSettings, model: str | None) -> list[list[str]]:
    """The browser's table: a row per LoRA file (columns LORA_COLUMNS), marked when it is for another model
    family than `model`."""
    family = model_family(settings, model)
    rows = []
    for name in lora_choices(settings):
        info = describe_lora(settings, name)
        fits = "yes" if not lora_fits(info, family) else ("unreadable" if info.problem else f"no ({info.family})")
        rows.append([name, info.family, fits, info.method or "?", info.rank, f"{info.size / 2**20:.1f} MB",
                     info.trained, ", ".join(info.triggers[:4])])
    return rows


def preview_path(lora: Path) -> Path:
    """A1111's preview beside a LoRA file: `<name>.preview.png`."""
    return lora.with_name(f"{lora.stem}.preview.png")


def lora_preview(lora: Path) -> Path | None:
    """The picture of a LoRA file: the training samples of its run when they sit beside it (in `samples/`: those
    of the step the file was saved at, or the latest for the run's final file), else `<name>.preview.png`."""
    from sdlora.generate.grid import describe_lora_file

    described = describe_lora_file(lora)
    folder = lora.parent / "samples"
    if described.final:
        samples = _latest_sample_files(folder)
    else:
        samples = sorted(folder.glob(f"step{described.step:08d}-*.png")) if described.step is not None else []
    if samples:
        return samples[0]
    preview = preview_path(lora)
    return preview if preview.is_file() else None


def keep_previews(settings: AppSettings, loras: list[LoraSpec], image: Path) -> list[Path]:
    """The first image generated with a LoRA becomes its `<name>.preview.png` (as A1111 caches it), when the file
    has no picture yet; LoRAs at weight 0 drew nothing of theirs. Returns the previews written."""
    from sdlora.atomic import write_bytes

    written = []
    for spec in loras:
        lora = Path(spec.path)
        if spec.unet_weight == 0 or lora_preview(lora) is not None:
            continue
        try:
            rel = preview_path(lora.resolve()).relative_to(Path(settings.lora_dir).resolve())
        except ValueError:  # not a file of the LoRA folder: nothing of ours is written beside it
            continue
        preview = resolve_inside(settings.lora_dir, rel.as_posix())
        try:
            write_bytes(preview, image.read_bytes())
        except OSError as e:  # a read-only LoRA folder: the image itself was saved, so say so and go on
            logger.warning(f"cannot write the preview {preview}: {e}")
            continue
        written.append(preview)
    return written


def resolve_model(settings: AppSettings, name: str) -> str:
    """A tiny model name as is, else the path of a folder or file inside models_dir."""
    if name in TINY_MODELS:
        return name
    if name not in model_choices(settings):
        raise PathError(f"{name!r} is not a model in {settings.models_dir} (press Refresh after adding one)")
    return str(resolve_inside(settings.models_dir, name))


def size_for_model(settings: AppSettings, name: str) -> int:
    """Default width/height: the size the model was trained at (`models.native_size`), 512 when unreadable."""
    from sdlora.models.loading import native_size

    with contextlib.suppress(Exception):
        return native_size(resolve_model(settings, name))
    return 512


# --------------------------------------------------------------------------------------------------------------
# The engine: one loaded pipeline and its LoRA cache
# --------------------------------------------------------------------------------------------------------------

class Engine:
    """The loaded base model and its LoRA cache. Switching models frees the old one; LoRAs stay loaded.

    The queue already runs one job at a time; the lock also serialises direct calls (tests, scripts).
    """

    def __init__(self, settings: AppSettings):
        self.settings = settings
        self.model: str | None = None
        self.vae = ""  # "" = the model's own, else the VAE's name in models_dir
        self.pipe = None
        self.loras: LoraCache | None = None
        self.model_seconds = 0.0
        self.lock = threading.Lock()
        self.stop = threading.Event()  # the Train tab's Stop button; checked after every training step
        self.training = False

    def loaded(self, model: str, vae: str | None = None) -> bool:
        """Whether `model` with `vae` is the pipeline now in memory."""
        return (model, "" if vae in (None, OWN_VAE) else vae) == (self.model, self.vae)

    def pipeline(self, model: str, vae: str | None = None):
        """(pipeline, LoraCache) for `model` with `vae` (None or "model's own": its own; else a VAE's name in
        models_dir), loading them if they are not the current pair."""
        vae = "" if vae in (None, OWN_VAE) else vae
        if not self.loaded(model, vae):
            path, vae_path = resolve_model(self.settings, model), resolve_vae(self.settings, vae)
            self.release()
            started = time.perf_counter()
            device, dtype = default_device()
            pipe = load_pipeline(path, device, dtype, vae=vae_path)
            pipe.set_progress_bar_config(disable=True)
            self.pipe, self.loras, self.model, self.vae = pipe, LoraCache(pipe, self.settings.strict), model, vae
            self.model_seconds = time.perf_counter() - started
            logger.info(f"loaded {model}{f' with VAE {vae}' if vae else ''} in {self.model_seconds:.1f} s")
        return self.pipe, self.loras

    def release(self) -> None:
        """Free the loaded model (training loads its own copy; two on one GPU may not fit)."""
        self.pipe = self.loras = self.model = None
        self.vae = ""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def slot_specs(self, slots: tuple) -> list[LoraSpec]:
        """LoraSpecs of the switched-on slots; `slots` is (on, name, weight) per slot, as the UI sends them."""
        specs = []
        for i in range(0, len(slots), 3):
            on, name, weight = slots[i:i + 3]
            if on and name:
                specs.append(LoraSpec(resolve_inside(self.settings.lora_dir, name), float(weight)))
        return specs


@contextlib.contextmanager
def _user_errors():
    """Every failure becomes a gr.Error message in the page; the app itself keeps running."""
    import gradio as gr

    try:
        yield
    except gr.Error:
        raise
    except USER_ERRORS as e:
        raise gr.Error(str(e), print_exception=False) from None
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise gr.Error("out of GPU memory: try a smaller size or batch count", print_exception=False) from None
    except Exception as e:
        logger.exception("job failed")  # a bug: say what it was and keep the traceback in the log
        raise gr.Error(f"unexpected {type(e).__name__}: {e}", print_exception=False) from None


def _params(prompt, negative, sampler, steps, cfg, width, height, seed) -> GenerationParams:
    return GenerationParams(
        prompt=prompt or "", negative_prompt=negative or "", steps=int(steps), cfg=float(cfg),
        width=int(width), height=int(height), seed=int(seed if seed is not None else -1), sampler=sampler,
    )


# --------------------------------------------------------------------------------------------------------------
# Event handlers (plain functions of the UI values, so tests can call them directly)
# --------------------------------------------------------------------------------------------------------------

def run_generate(engine: Engine, model, prompt, negative, sampler, steps, cfg, width, height, seed, count, *slots,
                 vae=None, batch_size=1):
    """Generate tab: returns (gallery [(path, caption)], the seed used, an info line). `vae`: None or
    "model's own", else a VAE's name in models_dir (see `vae_choices`), written as `VAE:` in the PNGs. `count`
    batches of `batch_size` images each (seeds seed, seed+1, ...)."""

    with engine.lock, _user_errors():
        specs = engine.slot_specs(slots)
        params = _params(prompt, negative, sampler, steps, cfg, width, height, seed)
        model_loaded = not engine.loaded(model, vae)
        pipe, loras = engine.pipeline(model, vae)
        result = generate_images(pipe, loras, params, specs, int(count), out_dir=engine.settings.out_dir,
                                 embedding_dir=engine.settings.embedding_dir,
                                 lora_dir=engine.settings.lora_dir, model_name=model_label(model),
                                 batch_size=int(batch_size), vae_name=engine.vae)
        if result.paths:
            keep_previews(engine.settings, result.loras, result.paths[0])
    _show_warnings(result.warnings)
    gallery = [(str(path), f"seed {seed}") for path, seed in zip(result.paths, result.seeds)]
    loading = f"LoRA loading {result.load_seconds:.1f} s"
    if model_loaded:
        loading = f"base model loading {engine.model_seconds:.1f} s, {loading}"
    info = (f"{len(result.paths)} image(s) in {result.generate_seconds:.1f} s ({loading})"
            f" · saved to {result.paths[0].parent}")
    return gallery, result.seeds[0], info


def lora_details(settings: AppSettings, model, name):
    """The browser's panel for one LoRA: (its picture as a PIL image or None, a Markdown summary, its trigger
    words as gr.Dataset samples, the words: what a click on one inserts)."""
    import gradio as gr

    if not name:
        return None, "", gr.Dataset(samples=[]), []
    with _user_errors():
        info = describe_lora(settings, name)
        why = lora_fits(info, model_family(settings, model))
        picture = lora_preview(info.path)
    image = None
    if picture is not None:
        with Image.open(picture) as opened:
            image = opened.convert("RGB")  # an image, not a path: the LoRA folder is not served
    lines = [f"**{name}** · {info.family} · {info.method or '?'} · rank {info.rank} · {info.size / 2**20:.1f} MB"
             + (f" · {info.trained}" if info.trained else "")]
    if why:
        lines.append(f"⚠ {why}")
    if picture is None:
        lines.append("No picture yet: the first image generated with it becomes its preview.")
    return image, "\n\n".join(lines), gr.Dataset(samples=[[t] for t in info.triggers]), info.triggers


def insert_trigger(prompt, index, words) -> str:
    """A click on a trigger word: the prompt with the word added at its start (trigger words lead kohya captions),
    unless the prompt has it already."""
    if index is None or not 0 <= index < len(words or []):
        return prompt
    word, prompt = words[index], (prompt or "").strip()
    if re.search(rf"(^|[\s,(]){re.escape(word)}($|[\s,):])", prompt):
        return prompt
    return f"{word}, {prompt}" if prompt else word


def switch_on(settings: AppSettings, model, name, *slots):
    """"Switch on": the browser's LoRA into the slot that has it, else the first slot that is off; returns the
    slots' (on, name) values. A LoRA for another model family is refused."""
    with _user_errors():
        if not name:
            raise GenerationError("choose a LoRA in the list first")
        why = lora_fits(describe_lora(settings, name), model_family(settings, model))
        if why:
            raise GenerationError(why)
        ons, names = list(slots[0::2]), list(slots[1::2])
        free = next((i for i, n in enumerate(names) if n == name), None)
        if free is None:
            free = next((i for i, on in enumerate(ons) if not on), None)
        if free is None:
            raise GenerationError(f"all {len(ons)} LoRA slots are on; switch one off, or add <lora:"
                                  f"{Path(name).stem}:1> to the prompt")
        ons[free], names[free] = True, name
    return [value for pair in zip(ons, names) for value in pair]


def slot_switch(settings: AppSettings, model, name):
    """A slot's "on" box for its LoRA: off and locked, labelled with the LoRA's family, when the LoRA is for another
    model family than the base model (it would fail on Generate)."""
    import gradio as gr

    if name and name in lora_choices(settings):
        info = describe_lora(settings, name)
        if lora_fits(info, model_family(settings, model)):
            return gr.Checkbox(value=False, interactive=False, label=f"{info.family}, no" if not info.problem
                               else "unreadable")
    return gr.Checkbox(interactive=True, label="on")


def _show_warnings(warnings) -> None:
    import gradio as gr

    for warning in warnings:
        gr.Warning(warning)


def read_png_parameters(settings: AppSettings, file):
    """'Read parameters from PNG': (model, prompt, negative, sampler, steps, cfg, width, height, seed, batch size,
    VAE, slot switches..., info). The prompt keeps its <lora:...> tags, which reproduce the LoRAs, so the slots go
    off. An image from a batch gives its batch's first seed and the batch size, which draw it again at its place."""
    import gradio as gr

    keep = [gr.skip()] * (11 + SLOTS)
    if not file:
        return *keep, ""
    path = file if isinstance(file, str) else getattr(file, "name", str(file))
    try:
        with Image.open(path) as image:
            text = image.info.get("parameters")
    except Exception as e:
        gr.Warning(f"cannot read this file as an image ({type(e).__name__})")
        return *keep, ""
    if not text:
        gr.Warning("this PNG has no A1111 'parameters' text")
        return *keep, ""
    params, fields = parse_a1111_parameters(text, GenerationParams(prompt=""))
    model = fields.get("Model")
    notes = []
    if "unknown sampler" in fields:
        notes.append(f"unknown sampler {fields['unknown sampler']!r}: kept {params.sampler}")
    if model and model not in model_choices(settings):
        notes.append(f"model {model!r} is not in {settings.models_dir}; kept the current one")
        model = None
    vae: str | None = fields.get("VAE", OWN_VAE)  # A1111 writes it only for a VAE other than the model's own
    if vae not in vae_choices(settings):
        notes.append(f"VAE {vae!r} is not in {settings.models_dir}; kept the current one")
        vae = None
    batch_size, seed = 1, params.seed
    with contextlib.suppress(KeyError, ValueError):
        batch_size = int(fields["Batch size"])
        seed -= int(fields["Batch pos"])
    info = "Read the parameters; LoRAs come from the prompt's <lora:…> tags, so the LoRA slots were switched off."
    return (model or gr.skip(), params.prompt, params.negative_prompt, params.sampler, params.steps, params.cfg,
            params.width, params.height, seed, batch_size, vae or gr.skip(), *[False] * SLOTS,
            " ".join([info, *notes]))


def run_grid(engine: Engine, model, prompt, negative, sampler, steps, cfg, width, height, seed, grid_lora,
             weights_text, y_axis, y_text, *slots, progress=None, vae=None):
    """X/Y grid tab: one LoRA's weights across; down, seeds, prompts, LoRA files (e.g. a run's epochs, each taking
    the X weights instead of the X LoRA) or a second LoRA's weights; saved as one labelled PNG.

    The other switched-on slots stay applied with their weights. Returns (grid path, info line).
    """
    with engine.lock, _user_errors():
        weights = _numbers(weights_text, float, "weights")
        params = _params(prompt, negative, sampler, steps, cfg, width, height, seed)
        if params.seed < 0:
            params = replace(params, seed=random.randrange(2**32))  # one seed for every cell, so columns compare
        lora_dir = engine.settings.lora_dir
        lora_path = resolve_inside(lora_dir, grid_lora)
        lines = [line.strip() for line in (y_text or "").splitlines() if line.strip()]
        # Each row: (label, params, the LoRA the X weights apply to, extra LoRAs of that row).
        rows: list[tuple[str, GenerationParams, Path, list[LoraSpec]]]
        if y_axis == "prompt":
            rows = [(line, replace(params, prompt=line), lora_path, []) for line in lines or [params.prompt]]
        elif y_axis == "LoRA file":
            files = [resolve_inside(lora_dir, line) for line in lines] or [lora_path]
            rows = [(f.stem, params, f, []) for f in files]
        elif y_axis == "second LoRA weight":
            name, _, values = (y_text or "").partition(":")
            if not name.strip() or not values.strip():
                raise GenerationError("Y values for a second LoRA: its name, a colon, its weights (other: 0, 0.5, 1)")
            second = resolve_inside(lora_dir, name.strip())
            rows = [(f"{second.stem}: {w:g}", params, lora_path, [LoraSpec(second, w)])
                    for w in _numbers(values, float, "second LoRA weights")]
        else:
            seeds = _numbers(y_text, int, "seeds") if lines else [params.seed]
            rows = [(f"seed {s}", replace(params, seed=s), lora_path, []) for s in seeds]
        if len(weights) * len(rows) > MAX_GRID_CELLS:
            raise GenerationError(f"{len(weights)} x {len(rows)} cells; the grid takes at most {MAX_GRID_CELLS}")
        pipe, loras = engine.pipeline(model, vae)
        cells, total, started, notes = [], len(weights) * len(rows), time.perf_counter(), {}
        for r, (_, p, x_lora, extra) in enumerate(rows):
            swept = {x_lora, *(Path(e.path) for e in extra)}
            others = [s for s in engine.slot_specs(slots) if Path(s.path) not in swept]
            row = []
            for c, weight in enumerate(weights):
                if progress is not None:
                    progress((r * len(weights) + c, total), desc="X/Y grid")
                result = generate_images(pipe, loras, p, [*others, *extra, LoraSpec(x_lora, weight)],
                                         lora_dir=lora_dir, model_name=model_label(model))
                notes.update(dict.fromkeys(result.warnings))
                row.append(result.images[0])
            cells.append(row)
        row_labels = [label for label, _, _, _ in rows]
        name = lora_path.stem if y_axis != "LoRA file" else "LoRA"
        grid = label_grid(cells, [f"{name}: {w:g}" for w in weights], row_labels)
        text = grid_parameters(params, model_label(model),
                               [(f"LoRA weight ({name})", [f"{w:g}" for w in weights]), (y_axis, None)])
        path = save_png(grid, _next_grid_path(Path(engine.settings.out_dir) / "grids"), text)
    _show_warnings(notes)
    return str(path), f"{total} cells in {time.perf_counter() - started:.1f} s · saved to {path}"


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


def _preset_start(settings: AppSettings, preset: str | None) -> tuple:
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
    data = _dataset_folder(settings, dataset)
    out = resolve_inside(settings.lora_dir, name)
    return derive(load_config(resolve_inside(settings.configs_dir, preset) if preset else None), {
        "data.dirs": [data.as_posix()], "data.caption_prefix": trigger or "", "lora.rank": int(rank),
        "lora.alpha": float(int(rank)), "train.learning_rate": float(learning_rate),
        "train.max_train_steps": int(steps), "lora.method": method, "train.output_dir": out.as_posix(),
        "train.output_name": name,
        "data.reg_dirs": [_dataset_folder(settings, reg_folder).as_posix()] if reg_folder else [],
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

    with engine.lock, _user_errors():
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

    with _user_errors():
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
    with engine.lock, _user_errors():
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
    for path in _latest_sample_files(folder):
        with Image.open(path) as image:
            samples.append((image.convert("RGB"), f"{path.name.rsplit('-', 1)[0]} · {path.name}"))
    return samples


def _latest_sample_files(folder: Path) -> list[Path]:
    """The sample images (step<N>-<i>.png) of the latest step that rendered into `folder`, by prompt."""
    files = sorted(folder.glob("step*-*.png")) if folder.is_dir() else []
    tag = files[-1].name.rsplit("-", 1)[0] if files else ""
    return [path for path in files if path.name.rsplit("-", 1)[0] == tag]


def _dataset_folder(settings: AppSettings, dataset: str | None) -> Path:
    data = resolve_inside(settings.data_dir, (dataset or "").strip())
    if not data.is_dir():
        raise PathError(f"{dataset!r} is not a folder inside {settings.data_dir}")
    return data


def _caption_images(folder: Path) -> dict[str, Path]:
    """{name relative to the dataset folder: image} of the images training reads there: the folder's own, or
    those of its kohya repeat subfolders (`10_name/`) when it has them (the dataset reader's rule)."""
    from sdlora.data.dataset import expand_folder, is_training_image

    images = {}
    for sub, _, _ in expand_folder(folder, 1):
        for path in sorted(p for p in sub.iterdir() if is_training_image(p)):
            images[path.relative_to(folder).as_posix()] = path
    return images


def _read_caption(path: Path) -> str:
    """A sidecar caption's text; "" when missing or not UTF-8 (shown empty, and left alone unless edited)."""
    try:
        return path.read_bytes().decode("utf-8-sig").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def load_captions(settings: AppSettings, dataset) -> list[list[str]]:
    """"Load captions": [image file, caption] for every image training reads in the dataset folder, those of
    kohya repeat subfolders as `10_name/image.png` (its .txt sidecar; missing or non-UTF-8 captions are empty)."""
    with _user_errors():
        folder = _dataset_folder(settings, dataset)
        rows = [[name, _read_caption(p.with_suffix(".txt"))] for name, p in _caption_images(folder).items()]
    if not rows:
        import gradio as gr

        gr.Warning(f"no images in {dataset}")
    return rows


def save_captions(settings: AppSettings, dataset, table) -> str:
    """"Save captions": write each changed caption to its image's .txt sidecar (atomically). Only the images "Load
    captions" lists get captions (a name that is none of them refuses the whole table). Returns an info line."""
    from sdlora.atomic import write_text

    with _user_errors():
        folder = _dataset_folder(settings, dataset)
        if hasattr(table, "values") and hasattr(table, "columns"):  # a pandas DataFrame
            table = table.values.tolist()
        images = _caption_images(folder)
        writes = []
        for row in table or []:
            if not row or not any(str(v or "").strip() for v in row):
                continue  # an empty row the table editor added
            file, caption = str(row[0] or ""), str(row[1] if len(row) > 1 and row[1] is not None else "")
            if file not in images:
                raise PathError(f"{file!r}: not an image in {dataset}; only the images listed by Load captions get "
                                "captions")
            sidecar = resolve_inside(folder, Path(file).with_suffix(".txt").as_posix())
            caption = caption.strip()
            if caption != _read_caption(sidecar):
                writes.append((sidecar, caption))
        for sidecar, caption in writes:
            write_text(sidecar, caption + "\n" if caption else "")
    return f"saved {len(writes)} changed caption(s) in {folder}"


MAX_UPLOAD_BYTES = 64 * 2**20  # per file: far above any training image, far below filling a disk by accident


def add_uploads(settings: AppSettings, dataset, files) -> tuple[list[list[str]], str]:
    """"Add to the folder": copy uploaded images and .txt captions into the dataset folder (created inside
    data_dir). Every file is checked first — a training image type that decodes, or UTF-8 text, at most
    MAX_UPLOAD_BYTES, no existing file of that name — so a bad upload writes nothing. Returns the caption table of
    the folder and an info line."""
    from PIL import Image

    from sdlora.atomic import write_bytes
    from sdlora.data.dataset import IMAGE_EXTENSIONS

    with _user_errors():
        folder = resolve_inside(settings.data_dir, (dataset or "").strip())
        uploads = [Path(f if isinstance(f, str) else f.name) for f in files or []]
        if not uploads:
            raise GenerationError("choose image files (and their .txt captions) to upload first")
        for src in uploads:
            kind = src.suffix.lower()
            if kind not in (*IMAGE_EXTENSIONS, ".txt"):
                raise PathError(f"{src.name}: not an image ({', '.join(IMAGE_EXTENSIONS)}) or a .txt caption")
            if src.stat().st_size > MAX_UPLOAD_BYTES:
                raise PathError(f"{src.name}: larger than {MAX_UPLOAD_BYTES // 2**20} MB")
            if resolve_inside(folder, src.name).exists():
                raise PathError(f"{src.name} is already in {dataset}; nothing was uploaded")
            try:
                if kind == ".txt":
                    src.read_bytes().decode("utf-8-sig")
                else:
                    with Image.open(src) as image:
                        image.verify()
            except Exception as e:  # PIL reports damage as OSError, SyntaxError, struct.error, ...
                raise PathError(f"{src.name}: unreadable ({type(e).__name__}); nothing was uploaded") from None
        folder.mkdir(parents=True, exist_ok=True)
        for src in uploads:
            write_bytes(folder / src.name, src.read_bytes())
    return load_captions(settings, dataset), f"added {len(uploads)} file(s) to {folder}"


def _numbers(text: str, kind, what: str) -> list:
    items = [x for x in re.split(r"[,\s]+", text or "") if x]
    try:
        values = [kind(x) for x in items]
    except ValueError:
        raise GenerationError(f"{what}: {text!r} is not a comma-separated list of numbers") from None
    if not values:
        raise GenerationError(f"{what}: give at least one value")
    return values


def _next_grid_path(folder: Path) -> Path:
    numbers = [int(m.group(1)) for p in folder.glob("xy-*.png") if (m := re.match(r"xy-(\d+)\.png$", p.name))]
    return folder / f"xy-{max(numbers, default=0) + 1:05d}.png"


# --------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------

def build_app(settings: AppSettings):
    """The gr.Blocks page (not launched). `launch` adds the queue and the server settings."""
    import gradio as gr

    engine = Engine(settings)
    loras = lora_choices(settings)
    size = size_for_model(settings, settings.model)
    with gr.Blocks(title="sdlora", analytics_enabled=False) as demo:
        demo.sdlora_engine = engine
        with gr.Row(equal_height=True):
            model = gr.Dropdown(model_choices(settings), value=settings.model, label="Base model", elem_id="model",
                                scale=3)
            vae = gr.Dropdown(vae_choices(settings), value=OWN_VAE, label="VAE", elem_id="vae", scale=2,
                              info=f"the model's own, or a VAE file / diffusers VAE folder in {settings.models_dir}")
            gr.Textbox(str(settings.lora_dir), label="LoRA folder", interactive=False, scale=2)
            refresh = gr.Button("Refresh lists", elem_id="refresh", scale=0, min_width=120)
        with gr.Tabs():
            with gr.Tab("Generate"):
                with gr.Row():
                    with gr.Column(scale=3):
                        prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                            placeholder="zkstyle, a boat   (tags like <lora:name:0.8> work too)")
                        negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="negative")
                        slots, names, switches = [], [], []
                        for i in range(SLOTS):
                            with gr.Row(equal_height=True):
                                on = gr.Checkbox(False, label="on", elem_id=f"lora-on-{i}", scale=0, min_width=70)
                                name = gr.Dropdown(loras, value=loras[i] if i < len(loras) else None,
                                                   label=f"LoRA {i + 1}", elem_id=f"lora-name-{i}", scale=3)
                                weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="weight",
                                                   elem_id=f"lora-weight-{i}", scale=2)
                            slots += [on, name, weight]
                            names.append(name)
                            switches.append(on)
                        with gr.Row():
                            sampler = gr.Dropdown(list(SAMPLERS), value="euler", label="Sampler", elem_id="sampler")
                            steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="steps")
                            cfg = gr.Slider(0, 30, value=7.0, step=0.5, label="CFG scale", elem_id="cfg")
                        with gr.Row():
                            width = gr.Slider(64, 2048, value=size, step=8, label="Width", elem_id="width")
                            height = gr.Slider(64, 2048, value=size, step=8, label="Height", elem_id="height")
                        with gr.Row():
                            seed = gr.Number(-1, precision=0, label="Seed (-1 = random)", elem_id="seed")
                            count = gr.Slider(1, 16, value=1, step=1, label="Batch count", elem_id="count")
                            batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size (images per call)",
                                                   elem_id="batch-size")
                        png = gr.File(label="Read parameters from PNG", file_types=[".png"], elem_id="png-file")
                    with gr.Column(scale=2):
                        go = gr.Button("Generate", variant="primary", elem_id="generate")
                        gallery = gr.Gallery(label="Images", columns=2, format="png", elem_id="gallery")
                        used_seed = gr.Number(label="Seed used", precision=0, interactive=False, elem_id="used-seed")
                        info = gr.Markdown(elem_id="info")
            with gr.Tab("LoRAs"):
                gr.Markdown(f"Every LoRA file in {settings.lora_dir}. A file for another model family than the base "
                            "model is marked and cannot be switched on. Pick one (or click its row) to see its "
                            "picture and trigger words.")
                lora_list = gr.Dataframe(lora_table(settings, settings.model), headers=LORA_COLUMNS, type="array",
                                         interactive=False, wrap=True, elem_id="lora-table")
                with gr.Row():
                    with gr.Column(scale=2):
                        with gr.Row(equal_height=True):
                            browse = gr.Dropdown(loras, value=None, label="LoRA", elem_id="browse-lora", scale=3)
                            browse_use = gr.Button("Switch on in a free slot", elem_id="browse-use", scale=1)
                        browse_info = gr.Markdown(elem_id="browse-info")
                        browse_words = gr.Dataset(components=["textbox"], samples=[], type="index",
                                                  label="Trigger words (click one to put it in the prompt)",
                                                  elem_id="browse-words")
                        words = gr.State([])
                    with gr.Column(scale=1):
                        browse_image = gr.Image(label="Picture", type="pil", format="png", interactive=False,
                                                elem_id="browse-preview")
            with gr.Tab("X/Y grid"):
                with gr.Row():
                    with gr.Column(scale=2):
                        gr.Markdown("Prompt, sampler, size and the switched-on LoRA slots come from the Generate "
                                    "tab; the LoRA below takes each weight across the grid.")
                        grid_lora = gr.Dropdown(loras, value=loras[0] if loras else None, label="LoRA (X axis)",
                                                elem_id="grid-lora")
                        grid_weights = gr.Textbox("0, 0.5, 1", label="Weights", elem_id="grid-weights")
                        y_axis = gr.Radio(["seed", "prompt", "LoRA file", "second LoRA weight"], value="seed",
                                          label="Y axis", elem_id="grid-y")
                        y_values = gr.Textbox("1, 2", lines=3, label="Y values",
                                              info="seeds separated by commas; one prompt per line; one LoRA "
                                                   "file per line (e.g. a run's epochs); or for a second LoRA "
                                                   "its name, a colon and its weights",
                                              elem_id="grid-values")
                        grid_go = gr.Button("Make grid", variant="primary", elem_id="grid-generate")
                    with gr.Column(scale=3):
                        grid_image = gr.Image(label="Grid", type="filepath", format="png", interactive=False,
                                              elem_id="grid-image")
                        grid_info = gr.Markdown(elem_id="grid-info")
            with gr.Tab("Train"):
                presets = preset_choices(settings)
                preset = "tiny.toml" if "tiny.toml" in presets else (presets[0] if presets else None)
                start = _preset_start(settings, preset)
                with gr.Row():
                    with gr.Column():
                        train_preset = gr.Dropdown(presets, value=preset, label=f"Preset ({settings.configs_dir}/)",
                                                   elem_id="train-preset")
                        train_data = gr.Textbox(start[0], label=f"Dataset folder (inside {settings.data_dir})",
                                                elem_id="train-data")
                        train_name = gr.Textbox("my_lora", label=f"LoRA name (written to {settings.lora_dir}/<name>/)",
                                                elem_id="train-name")
                        train_trigger = gr.Textbox(start[1], label="Trigger word (prepended to every caption)",
                                                   elem_id="train-trigger")
                        with gr.Row():
                            train_rank = gr.Slider(1, 128, value=start[2], step=1, label="Rank", elem_id="train-rank")
                            train_lr = gr.Number(start[3], label="Learning rate", elem_id="train-lr")
                            train_steps = gr.Number(start[4], precision=0, minimum=1, label="Steps",
                                                    elem_id="train-steps")
                            train_method = gr.Dropdown(["lora", "dora", "adalora", "loha", "lokr"], value=start[5],
                                                       label="Method (see the README's adapter methods)",
                                                       elem_id="train-method")
                        with gr.Accordion("Keep what the base model knows (prior preservation)", open=False):
                            train_reg = gr.Textbox(start[6], label=f"Regularization images folder (inside "
                                                   f"{settings.data_dir}; empty = none)", elem_id="train-reg")
                            with gr.Row():
                                train_class_images = gr.Checkbox(start[8], label="Auto class images (the base model "
                                                                 "draws one per training image)",
                                                                 elem_id="train-class-images")
                                train_class_word = gr.Textbox(start[7], label="Class word (replaces the trigger)",
                                                              elem_id="train-class-word")
                            train_preservation = gr.Checkbox(start[9], label="Base-prediction preservation (no "
                                                             "images; slower steps)", elem_id="train-preservation")
                        adv = dict(zip(ADVANCED_KEYS, start[10:]))
                        with gr.Accordion("Advanced (the rest comes from the preset)", open=False):
                            with gr.Row():
                                adv_targets = gr.Dropdown(key_choices("lora.targets"), value=adv["lora.targets"],
                                                          label="Targets (attn, + MLP, + ResNet convs)",
                                                          elem_id="adv-targets")
                                adv_init = gr.Dropdown(key_choices("lora.init"), value=adv["lora.init"],
                                                       label="Init", elem_id="adv-init")
                                adv_quantize = gr.Dropdown(key_choices("model.quantize_base"),
                                                           value=adv["model.quantize_base"],
                                                           label="Quantized base (GPU)", elem_id="adv-quantize")
                            with gr.Row(equal_height=True):
                                adv_te = gr.Checkbox(adv["lora.train_text_encoder"], label="Train the text encoder",
                                                     elem_id="adv-te")
                                adv_te_lr = gr.Number(adv["train.text_encoder_lr"], label="Text encoder LR (empty "
                                                      "or 0: the learning rate)", elem_id="adv-te-lr")
                                adv_loraplus = gr.Number(adv["train.loraplus_lr_ratio"], label="LoRA+ ratio (0: off)",
                                                         elem_id="adv-loraplus")
                            with gr.Row():
                                adv_resolution = gr.Textbox(adv["data.resolution"], label="Resolution (\"512, 768\": "
                                                            "both)", elem_id="adv-resolution")
                                adv_batch = gr.Number(adv["train.batch_size"], precision=0, label="Batch size",
                                                      elem_id="adv-batch")
                                adv_save_epochs = gr.Number(adv["train.save_every_n_epochs"], precision=0,
                                                            label="Save every N epochs (0: off)",
                                                            elem_id="adv-save-epochs")
                                adv_save_steps = gr.Number(adv["train.save_every_n_steps"], precision=0,
                                                           label="Save every N steps (0: off)",
                                                           elem_id="adv-save-steps")
                            adv_prompts = gr.Textbox(adv["sample.prompts"], lines=3, label="Sample prompts (one per "
                                                     "line; --w --h --d --s --l --n as kohya)", elem_id="adv-prompts")
                            adv_sample_every = gr.Number(adv["sample.every_n_steps"], precision=0,
                                                         label="Sample every N steps (0: at the end)",
                                                         elem_id="adv-sample-every")
                            with gr.Row():
                                adv_ema = gr.Number(adv["train.ema_decay"], label="EMA decay (0: off; ~0.999 for "
                                                    "long runs)", elem_id="adv-ema")
                                adv_clip_skip = gr.Number(adv["model.clip_skip"], precision=0, label="Clip skip "
                                                          "(SD1/SD2; empty or 0: none, 2: anime models)",
                                                          elem_id="adv-clip-skip")
                                adv_min_t = gr.Number(adv["train.min_timestep"], precision=0,
                                                      label="Min timestep", elem_id="adv-min-t")
                                adv_max_t = gr.Number(adv["train.max_timestep"], precision=0,
                                                      label="Max timestep (empty or 0: 1000)",
                                                      elem_id="adv-max-t")
                            with gr.Row():
                                adv_words = gr.Textbox(adv["train.new_tokens"], label="New words (pivotal tuning; "
                                                       "comma-separated, put them in the captions)",
                                                       elem_id="adv-new-words")
                                adv_embedding_lr = gr.Number(adv["train.embedding_lr"], label="New words' LR (empty "
                                                             "or 0: the learning rate)", elem_id="adv-embedding-lr")
                            with gr.Row(equal_height=True):
                                preset_name = gr.Textbox(label=f"Preset name (saved in {settings.configs_dir}/)",
                                                         elem_id="preset-name", scale=3)
                                preset_save = gr.Button("Save as preset", elem_id="preset-save", scale=1)
                        advanced = [adv_targets, adv_te, adv_te_lr, adv_resolution, adv_batch, adv_init,
                                    adv_quantize, adv_loraplus, adv_prompts, adv_sample_every, adv_save_epochs,
                                    adv_save_steps, adv_ema, adv_clip_skip, adv_min_t,
                                    adv_max_t, adv_words, adv_embedding_lr]  # in ADVANCED_KEYS order
                        with gr.Row():
                            train_go = gr.Button("Train", variant="primary", elem_id="train")
                            train_stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
                        with gr.Row(equal_height=True):
                            runs = gr.Dropdown(resumable_runs(settings), value=None, label="Stopped runs (with a "
                                               f"checkpoint, in {settings.lora_dir})", elem_id="train-runs", scale=3)
                            resume_go = gr.Button("Resume", elem_id="train-resume", scale=1)
                        with gr.Accordion("Captions of the dataset folder", open=False):
                            uploads = gr.File(file_count="multiple", type="filepath", label="Upload images and "
                                              ".txt captions into the dataset folder", elem_id="uploads")
                            upload_go = gr.Button("Add to the folder", elem_id="upload")
                            with gr.Row():
                                captions_load = gr.Button("Load captions", elem_id="captions-load")
                                captions_save = gr.Button("Save captions", elem_id="captions-save")
                            captions = gr.Dataframe(headers=["image file", "caption"], datatype=["str", "str"],
                                                    # gradio 6 still reads (count, "fixed") here; its column_limits
                                                    # is not implemented yet.
                                                    column_count=(2, "fixed"),  # type: ignore[arg-type]
                                                    type="array", interactive=True,
                                                    wrap=True, elem_id="captions")
                            captions_info = gr.Markdown(elem_id="captions-info")
                    with gr.Column():
                        train_info = gr.Markdown("Training runs here, one job at a time: generation waits until "
                                                 "it is done. The rest of each setting comes from the preset.",
                                                 elem_id="train-info")
                        train_stop_info = gr.Markdown(elem_id="train-stop-info")
                        train_loss = gr.Image(label="Loss", type="pil", format="png", interactive=False,
                                              elem_id="train-loss")
                        train_samples = gr.Gallery(label="Latest samples", columns=2, format="png",
                                                   elem_id="train-samples")

        common = [model, prompt, negative, sampler, steps, cfg, width, height, seed]
        # One queue for everything that runs the model: the queue's limit of 1 applies per concurrency_id.
        def generate(*values):
            *values, vae_name, images_per_call = values
            return run_generate(engine, *values, vae=vae_name, batch_size=images_per_call)

        go.click(generate, [*common, count, *slots, vae, batch_size], [gallery, used_seed, info],
                 api_name="generate", concurrency_id="model")

        def grid(*values, progress=gr.Progress()):
            *values, vae_name = values
            return run_grid(engine, *values, progress=progress, vae=vae_name)

        grid_go.click(grid, [*common, grid_lora, grid_weights, y_axis, y_values, *slots, vae],
                      [grid_image, grid_info], api_name="grid", concurrency_id="model")

        fields = [train_preset, train_data, train_name, train_trigger, train_rank, train_lr, train_steps, train_method,
                  train_reg, train_class_word, train_class_images, train_preservation]

        def train_job(*values, progress=gr.Progress()):
            return run_train(engine, *values[:len(fields)], progress=progress, advanced=values[len(fields):])

        def list_runs():
            return gr.Dropdown(choices=resumable_runs(settings))

        # A stopped run can be resumed: the list follows every run.
        train_go.click(train_job, [*fields, *advanced], [train_info, train_loss, train_samples],
                       api_name="train", concurrency_id="model").then(list_runs, None, runs, api_visibility="private")

        def resume_job(run, progress=gr.Progress()):
            return run_resume(engine, run, progress=progress)

        resume_go.click(resume_job, runs, [train_info, train_loss, train_samples], api_name="resume",
                        concurrency_id="model").then(list_runs, None, runs, api_visibility="private")

        def save_job(name, *values):
            info_line, presets = save_preset(settings, name, *values[:len(fields)], advanced=values[len(fields):])
            return info_line, gr.Dropdown(choices=presets)

        preset_save.click(save_job, [preset_name, *fields, *advanced], [train_info, train_preset],
                          api_name="save_preset", concurrency_id="captions")
        # Not queued: Stop must not wait behind the training it stops.
        train_stop.click(partial(stop_train, engine), None, train_stop_info, api_name="stop_train", queue=False)
        captions_load.click(partial(load_captions, settings), train_data, captions, api_name="load_captions",
                            concurrency_id="captions")
        captions_save.click(partial(save_captions, settings), [train_data, captions], captions_info,
                            api_name="save_captions", concurrency_id="captions")
        upload_go.click(partial(add_uploads, settings), [train_data, uploads], [captions, captions_info],
                        api_name="upload", concurrency_id="captions")
        train_preset.input(lambda p: (*preset_values(settings, p), *preset_advanced(settings, p)), train_preset,
                           [train_data, train_trigger, train_rank, train_lr, train_steps, train_method, train_reg,
                            train_class_word, train_class_images, train_preservation, *advanced],
                           api_visibility="private")
        png.upload(partial(read_png_parameters, settings), png,
                   [model, prompt, negative, sampler, steps, cfg, width, height, seed, batch_size, vae, *slots[0::3],
                    info],
                   api_name="read_parameters")
        model.input(lambda m: (size_for_model(settings, m),) * 2, model, [width, height], api_visibility="private")

        def check_slots(model_name, *slot_names):
            return [slot_switch(settings, model_name, n) for n in slot_names]

        # The base model and the slots' LoRAs decide which slots can be switched on (also when the page opens).
        for trigger in (model.change, demo.load, *(n.change for n in names)):
            trigger(check_slots, [model, *names], switches, api_visibility="private")
        model.change(partial(lora_table, settings), model, lora_list, api_visibility="private")
        def pick_row(evt: gr.SelectData):
            return evt.row_value[0]

        # gradio hands the selection to a parameter annotated gr.SelectData; this module's annotations are strings
        # (from __future__ import annotations) that gradio cannot resolve to the class imported in this function.
        pick_row.__annotations__["evt"] = gr.SelectData

        lora_list.select(pick_row, None, browse, api_visibility="private")
        browse.change(partial(lora_details, settings), [model, browse], [browse_image, browse_info, browse_words,
                                                                          words], api_name="lora_details")
        browse_words.click(insert_trigger, [prompt, browse_words, words], prompt, api_visibility="private")
        pairs = [c for i in range(SLOTS) for c in (switches[i], names[i])]
        browse_use.click(partial(switch_on, settings), [model, browse, *pairs], pairs, api_name="switch_on")

        def refresh_lists(*current):
            *current, model_name = current
            models, files = model_choices(settings), lora_choices(settings)
            updates = [gr.Dropdown(choices=models), gr.Dropdown(choices=vae_choices(settings)),
                       lora_table(settings, model_name), gr.Dropdown(choices=resumable_runs(settings))]
            for value in current:
                updates.append(gr.Dropdown(choices=files, value=value if value in files else None))
            return updates

        refresh.click(refresh_lists, [*names, grid_lora, browse, model],
                      [model, vae, lora_list, runs, *names, grid_lora, browse], api_name="refresh")
    return demo


THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def launch(settings: AppSettings, listen: bool = False, share: bool = False, port: int | None = None,
           block: bool = True):
    """Start the app. Local only (127.0.0.1) unless `listen` (0.0.0.0: your network) or `share` (a public
    gradio.live link); one job at a time. Returns the launched gr.Blocks (with `block=False` it keeps running
    in a background thread: call `.close()`)."""
    import gradio as gr
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one "Loading weights" bar per component otherwise
    demo = build_app(settings).queue(default_concurrency_limit=1)
    demo.launch(
        server_name="0.0.0.0" if listen else "127.0.0.1", server_port=port, share=share,
        allowed_paths=[str(Path(settings.out_dir).resolve())], prevent_thread_lock=not block, ssr_mode=False,
        # system fonts: nothing fetched from the internet
        theme=gr.themes.Default(font=THEME_FONTS["font"], font_mono=THEME_FONTS["font_mono"]),
        quiet=not block,
    )
    return demo
