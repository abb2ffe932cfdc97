"""Auto class images: the base model itself draws the regularization set from the training captions with the trigger
word replaced by the class word (data.class_images_per_image), so prior preservation needs no image hunt. No trainer
does this for the user (kohya's sd-scripts #314 has asked since 2023), hence by hand.

Each image is named by a hash of everything that made it (model, VAE, prompt, size, seed, steps, CFG, sampler) and
written beside its caption, so a rerun, a resumed run or a longer run draws only what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdlora.atomic import write_text
from sdlora.config import Config, DataConfig
from sdlora.data.dataset import ImageRecord, record_caption, trigger_of, without_trigger
from sdlora.generate.pipeline import GenerationParams, a1111_parameters, generate, load_pipeline, save_png

logger = logging.getLogger(__name__)

FOLDER_NAME = "class_images"  # under train.output_dir when data.class_images_dir is ""


@dataclass(frozen=True)
class ClassImage:
    """One image to draw: what it shows, its size (a training image's bucket), its seed, and where it goes."""

    params: GenerationParams
    path: Path
    options: DataConfig  # the training image's: the class image trains as its subset's images do

    def record(self) -> ImageRecord:
        size = (self.params.width, self.params.height)
        return ImageRecord(path=self.path, caption=self.params.prompt, repeats=1, size=size, bucket=size,
                           mask_path=None, dataset_dir=self.path.parent.name, is_reg=True, options=self.options,
                           subset="class images")


def plan_class_images(records: list[ImageRecord], cfg: Config) -> list[ClassImage]:
    """The class images of `records`: data.class_images_per_image per training image, from its caption without the
    trigger word, in its bucket, with seeds from train.seed."""
    d, s = cfg.data, cfg.sample
    folder = Path(d.class_images_dir or Path(cfg.train.output_dir) / FOLDER_NAME)
    planned = []
    for i, record in enumerate(records):
        prompt = without_trigger(record_caption(record, random.Random(0), as_written=True), trigger_of(d), d.class_word)
        for k in range(d.class_images_per_image):
            params = GenerationParams(prompt=prompt, steps=s.steps, cfg=s.cfg, width=record.bucket[0],
                                      height=record.bucket[1], seed=cfg.train.seed + i * d.class_images_per_image + k,
                                      sampler=s.sampler)
            made_by = json.dumps([cfg.model.base_model, cfg.model.vae, dataclasses.asdict(params)])
            planned.append(ClassImage(params, folder / f"{hashlib.sha256(made_by.encode()).hexdigest()[:16]}.png",
                                      record.options))
    return planned


def draw_class_images(planned: list[ClassImage], cfg: Config, device: torch.device,
                      dtype: torch.dtype) -> list[ImageRecord]:
    """Draw the planned images that are not on disk yet (a progress bar), each with its caption file beside it and
    A1111's parameters in the PNG; the records of all of them, for `dataset.pair_regularization`."""
    missing = [c for c in planned if not (c.path.is_file() and c.path.with_suffix(".txt").is_file())]
    if missing:
        logger.info("drawing %d class images with the base model (%d cached)", len(missing),
                    len(planned) - len(missing))
        m = cfg.model
        pipe = load_pipeline(m.base_model, str(device), dtype, m.vae, m.allow_unsafe_pickle)
        pipe.set_progress_bar_config(disable=True)
        missing[0].path.parent.mkdir(parents=True, exist_ok=True)
        for image in tqdm(missing, desc="class images", unit="img"):
            picture = generate(pipe, image.params)
            write_text(image.path.with_suffix(".txt"), image.params.prompt)
            save_png(picture, image.path, a1111_parameters(image.params, Path(m.base_model).name))
        del pipe
    return [c.record() for c in planned]
