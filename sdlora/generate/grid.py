"""Labelled image grids: the saved LoRA files of a run (one row per epoch/step file) against LoRA weights (columns),
one block per prompt, every cell rendered by `generate.generate_images`, so a cell is the image `sdlora generate`
gives for the same file, weight, prompt and seed.

The base model is loaded once; LoRA files are loaded once each into its `LoraCache` and switched by weight.
The drawing (`label_grid`, `grid_layout`) is shared with the app's X/Y grid tab.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from sdlora.errors import GenerationError, MissingFileError
from sdlora.generate.pipeline import (
    GenerationParams,
    LoraCache,
    LoraSpec,
    a1111_parameters,
    default_device,
    default_size,
    generate_images,
    load_pipeline,
    model_label,
    parse_sample_prompt,
    save_png,
)

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = (0.0, 0.5, 0.75, 1.0)
GRID_NAME = "grid.png"  # written into the run folder unless told otherwise
# kohya's names of intermediate files: `<name>-000002` (epoch 2), `<name>-step00000500` (step 500).
_INTERMEDIATE = re.compile(r"^(?P<name>.+)-(?:(?P<epoch>\d{6})|step(?P<step>\d{8}))$")


# --------------------------------------------------------------------------------------------------------------
# Drawing: a grid of equally sized images with a header row, a label column and an optional title band
# --------------------------------------------------------------------------------------------------------------

@dataclass
class GridLayout:
    """Where everything goes in a labelled grid (pixels): title band, header row, label column, then the cells."""

    cell_w: int
    cell_h: int
    rows: int
    cols: int
    label_w: int  # the row-label column on the left
    header_h: int  # the column-label row above the cells
    title_h: int  # the title band above the header (0 without a title)
    line_h: int
    font_size: int

    @property
    def width(self) -> int:
        return self.label_w + self.cell_w * self.cols

    @property
    def height(self) -> int:
        return self.title_h + self.header_h + self.cell_h * self.rows

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a cell, for `Image.crop`."""
        x, y = self.label_w + col * self.cell_w, self.title_h + self.header_h + row * self.cell_h
        return x, y, x + self.cell_w, y + self.cell_h


def grid_layout(cell_size: tuple[int, int], col_labels: list[str], row_labels: list[str],
                title: str | None = None) -> GridLayout:
    """The layout `label_grid` draws: the font scales with the cell width (12-24 px), the label column fits the
    longest row label (at least min(cell width, 160) px, at most the cell width), the header takes two lines and
    a title one or two (as it wraps)."""
    w, h = cell_size
    font_size = max(12, min(24, w // 12))
    font = _font(font_size)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(draw.textbbox((0, 0), "Ag", font=font)[3]) + 4
    longest = max((draw.textlength(line, font=font) for t in row_labels for line in t.split("\n")), default=0)
    label_w = int(min(max(w, 160), longest + 16))
    title_lines = min(2, len(_wrap(title, font, draw, label_w + w * len(col_labels) - 12))) if title else 0
    return GridLayout(cell_w=w, cell_h=h, rows=len(row_labels), cols=len(col_labels), label_w=label_w,
                      header_h=line_h * 2 + 8, title_h=line_h * title_lines + 8 if title else 0, line_h=line_h,
                      font_size=font_size)


def label_grid(cells: list[list[Image.Image]], col_labels: list[str], row_labels: list[str],
               title: str | None = None) -> Image.Image:
    """Images in rows and columns with a header row, a label column and an optional title band above, drawn with
    PIL's default font. Labels wrap at spaces; a newline in a label starts a new line."""
    layout = grid_layout(cells[0][0].size, col_labels, row_labels, title)
    font = _font(layout.font_size)
    grid = Image.new("RGB", (layout.width, layout.height), "white")
    draw = ImageDraw.Draw(grid)
    line_h, w = layout.line_h, layout.cell_w
    if title:
        draw.line([(0, 0), (layout.width, 0)], fill=(160, 160, 160))  # parts the blocks of a stacked grid
        for k, line in enumerate(_wrap(title, font, draw, layout.width - 12)[:2]):
            draw.text((6, 4 + k * line_h), line, fill="black", font=font)
    top = layout.title_h
    for c, text in enumerate(col_labels):
        for k, line in enumerate(_wrap(text, font, draw, w - 8)[:2]):
            draw.text((layout.label_w + c * w + 4, top + 4 + k * line_h), line, fill="black", font=font)
    for r, row in enumerate(cells):
        x0, y0, _, _ = layout.cell_box(r, 0)
        lines = _wrap(row_labels[r], font, draw, layout.label_w - 12)[: max(1, layout.cell_h // line_h)]
        for k, line in enumerate(lines):
            draw.text((6, y0 + 4 + k * line_h), line, fill="black", font=font)
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB"), layout.cell_box(r, c)[:2])
    return grid


def stack_vertically(images: list[Image.Image]) -> tuple[Image.Image, list[int]]:
    """One image of `images` top to bottom on white (narrower ones left-aligned); returns it and each one's top."""
    width = max(image.width for image in images)
    out = Image.new("RGB", (width, sum(image.height for image in images)), "white")
    tops, y = [], 0
    for image in images:
        out.paste(image, (0, y))
        tops.append(y)
        y += image.height
    return out, tops


def grid_parameters(params: GenerationParams, model_name: str, axes: list[tuple[str, list[str] | None]]) -> str:
    """A1111's `parameters` text for a grid: the first cell's settings, then `X Type: ..., X Values: "..."` per
    axis (X, Y, Z), as A1111's X/Y/Z plot writes them. Values None leaves out the `Values` field."""
    text = a1111_parameters(params, model_name)
    for letter, (kind, values) in zip("XYZ", axes):
        text += f", {letter} Type: {kind}"
        if values is not None:
            text += f', {letter} Values: "{", ".join(v.replace(chr(34), chr(39)) for v in values)}"'
    return text


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _wrap(text: str, font, draw, width: float) -> list[str]:
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if draw.textlength(candidate, font=font) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines or [""]


# --------------------------------------------------------------------------------------------------------------
# A run's files and sample settings
# --------------------------------------------------------------------------------------------------------------

@dataclass
class LoraFile:
    """A saved LoRA file of a run and when in training it was saved (from its name and `ss_*` metadata)."""

    path: Path
    epoch: int | None = None
    step: int | None = None
    final: bool = False  # `<name>.safetensors`: the end of training

    @property
    def when(self) -> str:
        """`epoch 2, step 40`, as far as known ("" when nothing is)."""
        return ", ".join(x for x in [f"epoch {self.epoch}" if self.epoch is not None else "",
                                     f"step {self.step}" if self.step is not None else ""] if x)

    @property
    def label(self) -> str:
        """The row label: the file name, and `epoch 2, step 40` on a second line."""
        return f"{self.path.stem}\n{self.when}" if self.when else self.path.stem


def describe_lora_file(path: str | Path) -> LoraFile:
    """Epoch and step of a saved LoRA file: `ss_epoch`/`ss_steps` metadata when the file has them, else what its
    kohya name says (`-000002` epoch, `-step00000500` step)."""
    path = Path(path)
    match = _INTERMEDIATE.match(path.stem)
    info = LoraFile(path, final=match is None)
    if match:
        info.epoch = int(match["epoch"]) if match["epoch"] else None
        info.step = int(match["step"]) if match["step"] else None
    metadata = _metadata(path)
    for key, attr in (("ss_epoch", "epoch"), ("ss_steps", "step")):
        if str(metadata.get(key, "")).isdigit():
            setattr(info, attr, int(metadata[key]))
    return info


def find_run_loras(run_dir: str | Path) -> list[LoraFile]:
    """A run folder's LoRA files, `<name>-000001`, `<name>-step00000500`, ... by training step, `<name>` last.

    `<name>` is `train.output_name` of the run's config.toml; without one, every top-level .safetensors file
    counts. Files without a step in their metadata are ordered by epoch, then step files by step.

    Raises:
        MissingFileError: no such folder, or no LoRA file in it.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingFileError(f"{run_dir}: no such run folder")
    name = run_config(run_dir).get("train", {}).get("output_name")
    found = []
    for path in sorted(run_dir.glob("*.safetensors")):
        match = _INTERMEDIATE.match(path.stem)
        if name is None or path.stem == name or (match and match["name"] == name):
            found.append(describe_lora_file(path))
    if not found:
        raise MissingFileError(f"{run_dir}: no LoRA files (<name>.safetensors, <name>-000001.safetensors, ...)")
    all_steps = all(f.step is not None for f in found if not f.final)

    def order(f: LoraFile):
        if f.final:
            return (1, 0, 0, f.path.name)
        if all_steps:
            return (0, 0, f.step, f.path.name)
        return (0, f.epoch is None, f.epoch if f.epoch is not None else f.step or 0, f.path.name)

    return sorted(found, key=order)


def run_config(run_dir: str | Path) -> dict:
    """The run's `config.toml` as plain tables ({} when there is none). Read as TOML, not validated, so a run
    written by another sdlora version still gives its settings."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        return {}
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        logger.warning(f"{path}: cannot be read ({e}); using defaults")
        return {}


def sample_prompts(config: dict, size: int = 512) -> list[GenerationParams]:
    """The `[sample]` prompts of a run config as GenerationParams, as training renders them (kohya flags in a
    line win over the table's defaults; size 0 means data.resolution, or `size`, the model's, without one)."""
    from sdlora.config import SampleConfig, as_resolutions

    sample = config.get("sample", {})
    s = SampleConfig(**{f.name: sample[f.name] for f in fields(SampleConfig) if f.name in sample})
    size = max(as_resolutions(config.get("data", {}).get("resolution") or size))  # of several, the largest
    defaults = GenerationParams(prompt="", steps=s.steps, cfg=s.cfg, seed=s.seed, sampler=s.sampler,
                                width=s.width or size, height=s.height or size,
                                clip_skip=config.get("model", {}).get("clip_skip") or 1)
    return [parse_sample_prompt(line, defaults) for line in s.prompts]


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception:  # not a safetensors file: it fails with a clear message when loaded
        return {}


# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------

@dataclass
class GridResult:
    image: Image.Image
    parameters: str  # the A1111 text saved in the PNG
    files: list[LoraFile]
    weights: list[float]
    prompts: list[GenerationParams]
    # (file index, weight index, prompt index) -> (left, top, right, bottom) of that cell in `image`
    cells: dict[tuple[int, int, int], tuple[int, int, int, int]] = field(default_factory=dict)
    path: Path | None = None
    renders: int = 0  # images rendered (weight-0 cells are the base image, rendered once per prompt)
    warnings: list[str] = field(default_factory=list)  # from the renders, each once (e.g. LoRA modules left out)


def render_grid(pipe, loras: LoraCache, files: Sequence[LoraFile | str | Path], prompts: list[GenerationParams],
                weights: Sequence[float] = DEFAULT_WEIGHTS, model_name: str = "", out: str | Path | None = None,
                progress: bool = True) -> GridResult:
    """Render every (file, weight, prompt) with `generate_images` and draw one labelled grid: per prompt a block
    titled with the prompt and seed, LoRA files down, weights across.

    Args:
        pipe, loras: a pipeline from `generate.load_pipeline` and its LoraCache (files are loaded once each).
        files: LoRA files in row order (`find_run_loras` for a run folder).
        prompts: one block per prompt, with its own seed, size, steps, sampler.
        weights: the columns. Weight 0 is the base model exactly: rendered once per prompt and shared by the rows.
        model_name: `Model:` in the PNG parameters.
        out: save the grid here (atomically, with A1111 `parameters`), or None.
        progress: a tqdm bar over the renders.

    Raises:
        GenerationError: impossible settings. LoraFileError: a file that cannot be used with this base model.
    """
    from tqdm.auto import tqdm

    lora_files = [f if isinstance(f, LoraFile) else describe_lora_file(f) for f in files]
    weights = [float(w) for w in weights]
    if not lora_files or not prompts or not weights:
        raise ValueError("a grid needs at least one LoRA file, one prompt and one weight")
    result = GridResult(image=Image.new("RGB", (1, 1)), parameters="", files=lora_files, weights=weights,
                        prompts=list(prompts))
    total = len(prompts) * (len(lora_files) * sum(w != 0 for w in weights) + any(w == 0 for w in weights))
    blocks, layouts = [], []
    with tqdm(total=total, desc="grid", unit="image", disable=not progress) as bar:
        for params in prompts:
            base = None
            rows = []
            for f in lora_files:
                row = []
                for w in weights:
                    if w == 0 and base is not None:
                        row.append(base)
                        continue
                    specs = [LoraSpec(f.path, w)] if w != 0 else []
                    rendered = generate_images(pipe, loras, params, specs, model_name=model_name)
                    image = rendered.images[0]
                    result.warnings += [w for w in rendered.warnings if w not in result.warnings]
                    result.renders += 1
                    bar.update(1)
                    if w == 0:
                        base = image
                    row.append(image)
                rows.append(row)
            col_labels = [f"weight {w:g}" for w in weights]
            row_labels = [f.label for f in lora_files]
            title = prompt_title(params)
            blocks.append(label_grid(rows, col_labels, row_labels, title))
            layouts.append(grid_layout((params.width, params.height), col_labels, row_labels, title))
    result.image, tops = stack_vertically(blocks)
    for p, (layout, top) in enumerate(zip(layouts, tops)):
        for i in range(len(lora_files)):
            for j in range(len(weights)):
                left, upper, right, lower = layout.cell_box(i, j)
                result.cells[(i, j, p)] = (left, upper + top, right, lower + top)
    result.parameters = grid_parameters(prompts[0], model_name, [
        ("LoRA weight", [f"{w:g}" for w in weights]),
        ("LoRA file", [f.path.stem for f in lora_files]),
        ("Prompt", [p.prompt for p in prompts]),
    ])
    if out is not None:
        result.path = save_png(result.image, out, result.parameters)
    return result


def prompt_title(params: GenerationParams) -> str:
    """The title of a prompt's block in the grid: the prompt and its seed."""
    return f"{params.prompt}  (seed {params.seed})"


def make_grid(sources: list[str | Path], model: str | None = None, weights: Sequence[float] = DEFAULT_WEIGHTS,
              prompts: list[str] | None = None, out: str | Path | None = None, *, negative: str | None = None,
              seed: int | None = None, steps: int | None = None, cfg: float | None = None, width: int | None = None,
              height: int | None = None, sampler: str | None = None, vae: str | None = None, progress: bool = True,
              loras: LoraCache | None = None) -> GridResult:
    """`sdlora grid`: a grid of a run's saved LoRA files (or of given files) against weights and prompts.

    Args:
        sources: run folders (their files, ordered by `find_run_loras`) and/or LoRA files (kept in order).
        model: the base model; None takes `model.base_model` of the (first) run's config.toml.
        weights: the columns.
        prompts: prompt lines (kohya flags `--n --w --h --d --l --s` allowed); None takes the run's
            `[sample] prompts`.
        out: the PNG; None writes `grid.png` into the (first) run folder, or the current folder for files.
        negative, seed, steps, cfg, width, height, sampler: when given, they replace what the run config and the
            prompt lines say, for every prompt. Size 0 means the model's size.
        vae: a separate VAE; None takes `model.vae` of the run's config when the model is the run's too.
        progress: a tqdm bar.
        loras: the LoraCache of an already loaded pipeline (`LoraCache(load_pipeline(...))`; one cache per
            pipeline), else `model` is loaded here, once.

    Raises:
        MissingFileError: a source that does not exist or a run folder without LoRA files.
        GenerationError: no prompt, no model, impossible settings.
    """
    files: list[LoraFile] = []
    run_dirs = []
    for source in map(Path, sources):
        if source.is_dir():
            run_dirs.append(source)
            files += find_run_loras(source)
        elif source.is_file():
            files.append(describe_lora_file(source))
        else:
            raise MissingFileError(f"{source}: no such run folder or LoRA file")
    if not files:
        raise GenerationError("give a run folder or LoRA files")
    config = run_config(run_dirs[0]) if run_dirs else {}
    lines = list(prompts or config.get("sample", {}).get("prompts", []))
    if not lines:
        raise GenerationError("no prompts: pass --prompt (or set [sample] prompts in the run's config)")
    if vae is None and not model:
        vae = config.get("model", {}).get("vae", "")
    model = model or config.get("model", {}).get("base_model") or ""
    if loras is None:
        if not model:
            raise GenerationError("no base model: pass --model (a run folder's config.toml names one otherwise)")
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        pipe = load_pipeline(model, *default_device(), vae=vae or "")
        pipe.set_progress_bar_config(disable=True)
        loras = LoraCache(pipe)
    pipe = loras.pipe
    size = default_size(pipe)
    defaults = sample_prompts({**config, "sample": {**config.get("sample", {}), "prompts": lines}}, size)
    given = dict(negative_prompt=negative, seed=seed, steps=steps, cfg=cfg, width=width, height=height, sampler=sampler)
    overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    for key in ("width", "height"):
        if overrides.get(key) == 0:
            overrides[key] = size
    params = [replace(p, **overrides) for p in defaults]
    if out is None:
        out = (run_dirs[0] if run_dirs else Path(".")) / GRID_NAME
    result = render_grid(pipe, loras, files, params, weights, model_label(model) if model else "", out, progress)
    if run_dirs:
        log_grid(result, run_dirs[0])
    return result


def log_grid(result: GridResult, run_dir: str | Path, max_side: int = 4096) -> Path | None:
    """Show the grid in TensorBoard beside the run's loss: an image `grid` at the last saved step, written into
    the folder training logs to (`<run>/logs/sdlora`, else `<run>/logs`). Nothing happens for a run without logs;
    a failure is logged, never raised (the PNG is already saved).

    Returns:
        The log folder written to, or None.
    """
    logs = Path(run_dir) / "logs"
    if not logs.is_dir():
        return None
    logs = logs / "sdlora" if (logs / "sdlora").is_dir() else logs  # accelerate's tracker folder in training
    image = result.image.convert("RGB")
    image.thumbnail((max_side, max_side))  # a many-epoch grid is tens of thousands of pixels tall
    step = max((f.step for f in result.files if f.step is not None), default=0)
    try:
        import numpy as np
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(logs)) as writer:
            writer.add_image("grid", np.asarray(image), step, dataformats="HWC")
    except Exception as e:  # noqa: BLE001 - TensorBoard is a convenience here
        logger.warning(f"grid not logged to TensorBoard: {type(e).__name__}: {e}")
        return None
    return logs
