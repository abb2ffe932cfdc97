"""The training report: `<run>/report.md` with the config, the dataset as `sdlora doctor` sees it, the training and
validation loss curves, the epoch grid, its CLIP similarity (when `similarity.csv` is there) and the best checkpoint;
PNGs next to it, referenced by relative paths.

`finish_run(cfg, out_dir)` is what training calls at its end: the epoch grid (when the config has sample prompts)
and the report.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Literal

from sdlora.atomic import atomic_path, write_text
from sdlora.errors import MissingFileError
from sdlora.generate.grid import GRID_NAME, LoraFile, find_run_loras, make_grid, run_config

logger = logging.getLogger(__name__)

REPORT_NAME = "report.md"
LOSS_PNG = "report_loss.png"
VAL_LOSS_PNG = "report_val_loss.png"


# --------------------------------------------------------------------------------------------------------------
# Reading a run: TensorBoard scalars, validation.csv, the best checkpoint
# --------------------------------------------------------------------------------------------------------------

def read_scalars(logs_dir: str | Path, tag: str = "loss") -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard scalar over every event file under `logs_dir`, by step.

    A resumed run logs the steps after its checkpoint again: the value written last wins.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    logs_dir = Path(logs_dir)
    if not logs_dir.is_dir():
        return []
    events = []
    tb_logger = logging.getLogger("tensorboard")  # says "No path found after ..." at the end of every file
    level = tb_logger.level
    tb_logger.setLevel(logging.WARNING)
    try:
        for folder in sorted({p.parent for p in logs_dir.rglob("events.out.tfevents.*")}):
            accumulator = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0: keep every value
            accumulator.Reload()
            if tag in accumulator.Tags().get(SCALARS, []):
                events += accumulator.Scalars(tag)
    finally:
        tb_logger.setLevel(level)
    by_step = {}
    for event in sorted(events, key=lambda e: e.wall_time):
        by_step[event.step] = event.value
    return sorted(by_step.items())


def read_validation(run_dir: str | Path) -> list[dict]:
    """The rows of `<run>/validation.csv` ({"step", "epoch", "val_loss"}), [] without one."""
    from sdlora.train.validation import read_history

    return read_history(Path(run_dir), sys.maxsize)


def closest_file(files: list[LoraFile], step: int) -> LoraFile | None:
    """The saved LoRA file whose step is nearest `step` (the later one on ties); None when no file has a step."""
    known = [(f.step, f) for f in files if f.step is not None]
    return min(known, key=lambda known_file: (abs(known_file[0] - step), -known_file[0]))[1] if known else None


# --------------------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg, no pyplot state)
# --------------------------------------------------------------------------------------------------------------

def plot_curve(path: str | Path, series: list[tuple[str, list[tuple[int, float]], str]], title: str,
               ylabel: str = "loss", mark: tuple[int, float, str] | None = None) -> Path:
    """A line plot over steps saved atomically as PNG. `series` is [(label, [(step, value)], style)];
    `mark` = (step, value, label) draws a highlighted point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, points, style in series:
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], style, label=label)
    if mark is not None:
        ax.plot([mark[0]], [mark[1]], "o", color="tab:red", markersize=9, label=mark[2], zorder=5)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(series) > 1 or mark is not None:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def smooth(points: list[tuple[int, float]], weight: float = 0.6) -> list[tuple[int, float]]:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start."""
    out, avg = [], 0.0
    for i, (step, value) in enumerate(points):
        avg = weight * avg + (1 - weight) * value
        out.append((step, avg / (1 - weight ** (i + 1))))
    return out


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------

def _train_stats(run: Path) -> dict:
    """The run's train_stats.json ({} without one)."""
    path = run / "train_stats.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_report(run_dir: str | Path, grid: str | Path | Literal[False] | None = None, data=None,
                 dataset: bool = True) -> Path:
    """Write `<run>/report.md` and its PNGs (`report_loss.png`, `report_val_loss.png`) into the run folder.

    Args:
        run_dir: a training output folder (config.toml, logs/, validation.csv, LoRA files).
        grid: a grid PNG to show (`sdlora grid`); None shows `<run>/grid.png` when it exists, False none.
        data: the `[data]` config (DataConfig) for the dataset section; None reads the run's config.toml.
        dataset: False leaves out the dataset check (`sdlora doctor`), which reads every image.

    Returns:
        The path of report.md.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise MissingFileError(f"{run}: no such run folder")
    config = run_config(run)
    try:
        files = find_run_loras(run)
    except MissingFileError:
        files = []
    name = config.get("train", {}).get("output_name") or (files[-1].path.stem if files else run.name)
    if grid is None and (run / GRID_NAME).is_file():
        grid = run / GRID_NAME
    final = next((f for f in files if f.final), None)

    lines = [f"# Training report: {name}", ""]
    facts = [f"Run folder: `{run}`", f"written {datetime.datetime.now().isoformat(timespec='seconds')}"]
    if config.get("model", {}).get("base_model"):
        facts.append(f"base model: `{config['model']['base_model']}`")
    lines += [" · ".join(facts), ""]
    if final is not None:
        lines += [f"Final LoRA: `{final.path.name}` ({_when(final)})", ""]

    # --- loss ------------------------------------------------------------------------------------------------
    losses = read_scalars(run / "logs", "loss")
    rows = read_validation(run)
    from sdlora.train.validation import best as best_row

    lowest = best_row(rows)
    lines += ["## Best checkpoint", ""]
    if lowest is None:
        lines += ["No validation loss was measured in this run, so the best epoch cannot be told from the numbers "
                  "(the training loss jumps with every random timestep). To measure it, hold out some images: "
                  "`data.validation_split = 0.1` (or `data.validation_dirs = [\"my_val_images\"]`); training then "
                  "writes `validation.csv` and this section names the best file.", ""]
    else:
        lines.append(f"Lowest validation loss **{lowest['val_loss']:.5f}** at step {lowest['step']} "
                     f"(epoch {lowest['epoch']}).")
        stopping = _train_stats(run).get("early_stopping")
        if stopping:
            lines.append(f"Early stopping (`train.early_stopping_patience = {stopping['patience']}`): training "
                         f"ended at step {stopping['last_step']}, and the final LoRA is the one of step "
                         f"{stopping['final_lora_step']}, the lowest validation loss.")
        pick = closest_file(files, lowest["step"])
        if pick is not None:
            exact = ("saved at that step" if pick.step == lowest["step"]
                     else f"the saved file closest to it ({_when(pick)})")
            lines.append(f"Use **`{pick.path.name}`**: {exact}.")
        else:
            lines.append("No saved LoRA file with a known step is left in the run folder.")
        lines.append("")

    lines += ["## Loss", ""]
    if losses:
        plot_curve(run / LOSS_PNG, [("training loss", losses, "-"), ("smoothed", smooth(losses), "-")],
                   f"{name}: training loss (mean per logging interval)")
        lines += [f"![training loss]({LOSS_PNG})", ""]
    else:
        lines += [f"No training loss in `{run / 'logs'}` (TensorBoard events, tag `loss`).", ""]
    if rows:
        mark = (lowest["step"], lowest["val_loss"], f"lowest: step {lowest['step']}") if lowest else None
        plot_curve(run / VAL_LOSS_PNG, [("validation loss", [(r["step"], r["val_loss"]) for r in rows], "o-")],
                   f"{name}: validation loss (fixed timesteps and noise)", mark=mark)
        lines += [f"![validation loss]({VAL_LOSS_PNG})", ""]

    # --- grid and files --------------------------------------------------------------------------------------
    if grid is not None and grid is not False and Path(grid).is_file():
        rel = Path(os.path.relpath(Path(grid).resolve(), run.resolve())).as_posix()
        lines += ["## Grid", "", "Saved LoRA files (rows) at several weights (columns), one block per prompt, fixed "
                  "seeds; weight 0 is the base model.", "", f"![grid](<{rel}>)", ""]
    lines += _similarity_section(run) + [""]
    lines += _quality_section(run)
    if files:
        by_step = {r["step"]: r["val_loss"] for r in rows}
        lines += ["## Saved LoRA files", "", "| file | epoch | step | validation loss |", "|---|---|---|---|"]
        for f in files:
            value = by_step.get(f.step)
            lines.append(f"| `{f.path.name}` | {_opt(f.epoch)} | {_opt(f.step)} | "
                         f"{'' if value is None else f'{value:.5f}'} |")
        lines.append("")
    samples = sorted((run / "samples").glob("*.png")) if (run / "samples").is_dir() else []
    if samples:
        lines += [f"Samples rendered during training: {len(samples)} PNGs in `samples/`.", ""]

    # --- dataset and config ----------------------------------------------------------------------------------
    if dataset:
        lines += ["## Dataset", ""] + _dataset_section(config, data) + [""]
    config_path = run / "config.toml"
    if config_path.is_file():
        lines += ["## Config", "", "```toml", config_path.read_text(encoding="utf-8").rstrip(), "```", ""]
    path = run / REPORT_NAME
    write_text(path, "\n".join(lines))
    return path


def finish_run(cfg, out_dir: str | Path, weights: list[float] | None = None, progress: bool = True,
               loras=None) -> Path | None:
    """The end of a training run: the epoch grid (when `cfg.sample.prompts` is set) with `cfg.model.base_model`,
    its CLIP similarity scores (when `sample.clip_model` is set), then the report. A failure is logged, never raised:
    the LoRA files are already saved.

    Args:
        cfg: the run's config.
        out_dir: its output folder.
        weights: the grid's columns; None: `sample.grid_weights`.
        progress: a tqdm bar over the grid's images.
        loras: a `generate.LoraCache` of an already loaded base model to render with; None loads the base.

    Returns:
        The report's path, or None when it could not be written.
    """
    out = Path(out_dir)
    grid = None
    weights = list(weights if weights is not None else cfg.sample.grid_weights)
    if cfg.sample.prompts and weights:
        try:
            result = make_grid([out], cfg.model.base_model, weights, out=out / GRID_NAME, vae=cfg.model.vae,
                               progress=progress, loras=loras)
            grid = result.path
            logger.info(f"grid of the saved LoRA files: {grid}")
            if cfg.sample.clip_model:
                from sdlora.ui.similarity import load_clip, measure_grid

                logger.info(f"CLIP similarity: {measure_grid(load_clip(cfg.sample.clip_model), result, out)[1]}")
        except Exception as e:  # noqa: BLE001 - the run's files are saved; say why the grid is missing
            logger.warning(f"no grid: {type(e).__name__}: {e}")
        finally:
            if loras is None:
                _free_memory()  # the base model loaded for the grid
    try:
        path = write_report(out, grid=grid, data=cfg.data)
    except Exception as e:  # noqa: BLE001
        logger.warning(f"no report: {type(e).__name__}: {e}")
        return None
    logger.info(f"training report: {path}")
    return path


def _dataset_section(config: dict, data) -> list[str]:
    from sdlora.config import DataConfig
    from sdlora.data.doctor import diagnose, format_report

    if data is None:
        table = config.get("data", {})
        data = DataConfig(**{f.name: table[f.name] for f in dataclasses.fields(DataConfig) if f.name in table})
    report = diagnose(data)
    buckets = ", ".join(f"{w}x{h}: {n}" for (w, h), n in report.buckets.items()) or "none"
    split = ""
    if data.validation_dirs:
        split = f" Validation images come from {', '.join(f'`{d}`' for d in data.validation_dirs)}."
    elif data.validation_split:
        held = max(1, round(report.images * data.validation_split)) if report.images else 0
        split = (f" About {held} of them are held out for validation "
                 f"(`data.validation_split = {data.validation_split}`).")
    counts = ", ".join(f"{report.count(s)} {s}" for s in ("error", "warning", "info"))
    return [f"{report.images} images ({report.images_with_repeats} with repeats) in "
            f"{', '.join(f'`{d}`' for d in data.dirs)} at resolution {report.resolution}; buckets {buckets}.{split} "
            f"`sdlora doctor` findings now: {counts}.", "", "```text", format_report(report), "```"]


def _similarity_section(run: Path) -> list[str]:
    from sdlora.ui.similarity import SIMILARITY_NAME, markdown_table, read_similarity

    rows = read_similarity(run)
    if not rows:
        return [f"No CLIP similarity measured: `sdlora grid {run} --clip /path/to/clip-model` (a local CLIP folder, "
                f"e.g. a copy of openai/clip-vit-large-patch14) writes `{SIMILARITY_NAME}` for this section."]
    return ["## Similarity (CLIP)", "", "Mean over the grid's prompts: CLIP-T is the cosine similarity of each image "
            "to its prompt, CLIP-I its mean cosine similarity to the training images (higher is closer); weight 0 "
            f"is the base model. From `{SIMILARITY_NAME}`.", "", markdown_table(rows)]


def _quality_section(run: Path) -> list[str]:
    """What `sdlora demo` measured on the toy world (quality.json), when it did."""
    from sdlora.toyworld.quality import QUALITY_NAME, load, summary

    if not (run / QUALITY_NAME).is_file():
        return []
    return ["## Measured on the toy world", "", "The final LoRA on 12 held-out prompts, read by the toy world's "
            "evaluator (`sdlora.toyworld.evaluate`), fixed seeds:", "",
            *(f"- {line}" for line in summary(load(run / QUALITY_NAME))), ""]


def _when(f: LoraFile) -> str:
    return f.when or "step unknown"


def _opt(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
