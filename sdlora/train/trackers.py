"""The run's trackers (train.log_with) through accelerate: TensorBoard, Weights & Biases, or both; the config as
their hyperparameters, the samples as images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from accelerate.logging import get_logger
from PIL import Image

from sdlora.config import Config, TrainConfig, config_to_dict
from sdlora.errors import TrainingError

logger = get_logger(__name__)


def tracker_names(t: TrainConfig) -> list[str]:
    """accelerate's trackers for train.log_with. sdlora's "all" is TensorBoard and wandb: accelerate's own "all"
    would start any other tracker that happens to be installed."""
    trackers: list[str] = ["tensorboard", "wandb"] if t.log_with == "all" else [t.log_with]
    if "wandb" in trackers:
        try:  # accelerate leaves out a tracker it cannot import without a word
            import wandb  # noqa: F401
        except ModuleNotFoundError as e:
            if e.name != "wandb":
                raise  # installed but broken: its own error says more
            raise TrainingError(f"train.log_with = \"{t.log_with}\" needs wandb: pip install 'sdlora[wandb]'") from None
    return trackers


def start_trackers(accelerator: Accelerator, cfg: Config, out: Path) -> None:
    """accelerate's trackers, with the config as their hyperparameters. accelerate has one project name for all of
    them: wandb's project, and TensorBoard's folder under logs/ (kohya's log_tracker_name names both too)."""
    t = cfg.train
    if t.log_with == "tensorboard":
        accelerator.init_trackers("sdlora", config=_flat_hparams(cfg))
        return
    import wandb

    # wandb's lines (banner, links, sync notes, warnings) would mix into sdlora's output. Its terminal is set up once
    # per process, so a run's own settings leave the warnings on; sdlora names the run itself below.
    wandb.setup(wandb.Settings(silent=True))
    accelerator.init_trackers(t.wandb_project, config=_flat_hparams(cfg),
                              init_kwargs={"wandb": {"name": t.wandb_run_name or None, "dir": str(out)}})
    wandb_run = accelerator.get_tracker("wandb", unwrap=True)
    # An offline run (WANDB_MODE=offline) has no link, and asking it for one prints a warning.
    where = out / "wandb" if wandb_run.offline else wandb_run.url
    if where:  # none with WANDB_MODE=disabled
        logger.info(f"wandb run: {where}", main_process_only=True)


def log_samples(accelerator: Accelerator, paths: list[Path], step: int) -> None:
    """The samples beside the loss, one image per prompt, through each tracker's log_images (TensorBoard's takes
    an NHWC batch, wandb's a list of images: one array of one image is both)."""
    images = {}
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            images[f"samples/{i:02d}"] = np.asarray(image.convert("RGB"))[None]
    for tracker in accelerator.trackers:
        tracker.log_images(images, step=step, **({"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}))


def _flat_hparams(cfg: Config) -> dict:
    """TensorBoard hparams take scalars only: dotted keys, lists as JSON strings."""
    flat = {}
    for table, values in config_to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{table}.{key}"] = json.dumps(value) if isinstance(value, list) else value
    return flat
