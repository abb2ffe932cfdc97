"""The Generate and X/Y grid tabs' handlers (plain functions of the UI values, so tests can call them directly):
images, the LoRA browser's panel and slot switches, parameters read back from a PNG, the grid."""

from __future__ import annotations

import contextlib
import random
import re
import time
from dataclasses import replace
from pathlib import Path

from PIL import Image

from sdlora.errors import GenerationError
from sdlora.generate.grid import grid_parameters, label_grid
from sdlora.generate.pipeline import (
    GenerationParams,
    LoraSpec,
    generate_images,
    model_label,
    parse_a1111_parameters,
    save_png,
)
from sdlora.ui.app.engine import Engine, user_errors
from sdlora.ui.app.loras import describe_lora, keep_previews, lora_fits, lora_preview, model_family
from sdlora.ui.app.settings import (
    OWN_VAE,
    AppSettings,
    lora_choices,
    model_choices,
    resolve_inside,
    vae_choices,
)

SLOTS = 4  # LoRA rows in the Generate tab; more can be added with <lora:name:weight> tags in the prompt
MAX_GRID_CELLS = 64


def _params(prompt, negative, sampler, steps, cfg, width, height, seed) -> GenerationParams:
    return GenerationParams(
        prompt=prompt or "", negative_prompt=negative or "", steps=int(steps), cfg=float(cfg),
        width=int(width), height=int(height), seed=int(seed if seed is not None else -1), sampler=sampler,
    )


def run_generate(engine: Engine, model, prompt, negative, sampler, steps, cfg, width, height, seed, count, *slots,
                 vae=None, batch_size=1):
    """Generate tab: returns (gallery [(path, caption)], the seed used, an info line). `vae`: None or
    "model's own", else a VAE's name in models_dir (see `vae_choices`), written as `VAE:` in the PNGs. `count`
    batches of `batch_size` images each (seeds seed, seed+1, ...)."""

    with engine.lock, user_errors():
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
    with user_errors():
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
    with user_errors():
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
    with engine.lock, user_errors():
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
                                         lora_dir=lora_dir, model_name=model_label(model),
                                         embedding_dir=engine.settings.embedding_dir)
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
