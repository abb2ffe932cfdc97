"""Optional CLIP similarity of grid images: CLIP-T (how well an image matches its prompt) and CLIP-I (how close it is
to the training images), per saved LoRA file and weight, written as `<run>/similarity.csv`.

Nothing is downloaded: the user points at a local CLIP folder (e.g. a copy of openai/clip-vit-large-patch14) that
transformers' `CLIPModel.from_pretrained` reads. Scores are plain cosine similarities of the projected, normalised
embeddings, in [-1, 1] (CLIPScore papers often report 100 x or 2.5 x that).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from PIL import Image

from sdlora.atomic import write_text
from sdlora.errors import ClipError
from sdlora.generate.grid import GridResult, run_config

if TYPE_CHECKING:  # transformers is imported when a CLIP model is loaded, not with the report
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTokenizer

logger = logging.getLogger(__name__)

SIMILARITY_NAME = "similarity.csv"
_COLUMNS = ("file", "epoch", "step", "weight", "clip_t", "clip_i", "images")
_BATCH = 32  # images per forward pass: small enough for CPU memory with CLIP-L, large enough to keep a GPU busy



@dataclass
class Clip:
    """A loaded CLIP model with its tokenizer and image processor, on `device`."""

    model: CLIPModel  # in eval mode
    tokenizer: CLIPTokenizer
    processor: CLIPImageProcessor
    device: str
    path: Path


@dataclass
class ClipScore:
    """The scores of one image."""

    clip_t: float  # cosine(image, its prompt)
    clip_i: float  # mean of `reference`; nan without reference images
    reference: list[float]  # cosine(image, each reference image), in the order given


@dataclass
class SimilarityRow:
    """Mean scores of one (LoRA file, weight) over the grid's prompts."""

    file: str
    epoch: int | None
    step: int | None
    weight: float
    clip_t: float
    clip_i: float  # nan without training images
    images: int  # grid cells averaged


def load_clip(path: str | Path, device: str | None = None) -> Clip:
    """Load a local CLIP folder (config.json with model_type "clip", safetensors weights, tokenizer files and
    preprocessor_config.json), never from the network.

    Args:
        path: the folder.
        device: "cuda" / "cpu"; None picks CUDA when there is a GPU (fp16 there, fp32 on the CPU).

    Raises:
        ClipError: not a folder, not a CLIP model, only pickle weights (`pytorch_model.bin` can run code when
            loaded), or files transformers cannot read.
    """
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from sdlora.generate.pipeline import default_device

    path = Path(path)
    where = f"{path}: not a CLIP model folder"
    if not path.is_dir():
        raise ClipError(f"{where} (no such folder); pass a local copy of e.g. openai/clip-vit-large-patch14")
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type != "clip":
        raise ClipError(f"{where} (config.json with model_type 'clip' expected, found {model_type!r})")
    if not any(path.glob("*.safetensors")):
        raise ClipError(f"{where} (no .safetensors weights; pickle files such as pytorch_model.bin are refused "
                        "because loading them can run code)")
    if device is None:
        device, dtype = default_device()
    else:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:
        model = CLIPModel.from_pretrained(path, use_safetensors=True, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClipError(f"{where} ({first})") from None
    # typeshed's functools.wraps does not bind self, and transformers wraps PreTrainedModel.to in it.
    return Clip(model.to(device, dtype).eval(), tokenizer, processor, device, path)  # type: ignore[arg-type]


@torch.no_grad()
def embed_images(clip: Clip, images: Sequence[Image.Image | Path]) -> torch.Tensor:
    """Unit-length image embeddings, (len(images), projection_dim), float32 on the CPU. Paths are read a batch at
    a time as training reads them (EXIF rotation, alpha on white), so hundreds of training images never sit in
    memory together."""
    from sdlora.data.dataset import load_rgb

    out = []
    for start in range(0, len(images), _BATCH):
        batch = [load_rgb(Path(x)) if isinstance(x, (str, Path)) else x.convert("RGB")
                 for x in images[start:start + _BATCH]]
        pixels = clip.processor(images=batch, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(clip.device, clip.model.dtype)
        out.append(_features(clip.model.get_image_features(pixel_values=pixels)))
    return _unit(torch.cat(out)) if out else torch.empty(0, _projection_dim(clip))


@torch.no_grad()
def embed_texts(clip: Clip, texts: list[str]) -> torch.Tensor:
    """Unit-length text embeddings, (len(texts), projection_dim), float32 on the CPU. Prompts longer than CLIP's
    context (77 tokens) are cut, as CLIP itself cannot see further."""
    out = []
    # transformers types a sub-config as what CLIPConfig accepts (a dict, or None for the default); it holds the
    # CLIPTextConfig built from that.
    max_length = cast("CLIPTextConfig", clip.model.config.text_config).max_position_embeddings
    for start in range(0, len(texts), _BATCH):
        tokens = clip.tokenizer(texts[start:start + _BATCH], padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt").to(clip.device)
        out.append(_features(clip.model.get_text_features(**tokens)))
    return _unit(torch.cat(out)) if out else torch.empty(0, _projection_dim(clip))


def clip_scores(clip: Clip, images: list[Image.Image], prompts: list[str],
                reference_images: Sequence[Image.Image | Path] | torch.Tensor = ()) -> list[ClipScore]:
    """CLIP-T and CLIP-I of each image.

    Args:
        clip: from `load_clip`.
        images: the images to score.
        prompts: one per image (its CLIP-T text).
        reference_images: the training images (or their paths), or their embeddings from `embed_images` (to
            embed them once for many calls); empty gives CLIP-I nan.

    Returns:
        One ClipScore per image, in order.
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    image_emb, text_emb = embed_images(clip, list(images)), embed_texts(clip, list(prompts))
    refs = reference_images
    if not isinstance(refs, torch.Tensor):
        refs = embed_images(clip, list(refs))
    to_text = (image_emb * text_emb).sum(dim=1)
    to_refs = image_emb @ refs.T  # (images, references)
    return [ClipScore(clip_t=float(t), clip_i=float(r.mean()) if len(refs) else math.nan, reference=r.tolist())
            for t, r in zip(to_text, to_refs)]


def training_images(run_dir: str | Path) -> list[Path]:
    """The images of a run's `[data] dirs` (as `sdlora.data.dataset.scan_dataset` finds them, relative folders from the
    current folder, as training read them); [] when the run has no config.toml or its folders are gone."""
    from sdlora.config import DataConfig
    from sdlora.data.dataset import scan_dataset
    from sdlora.errors import DatasetError

    config = run_config(run_dir)
    if not config:
        return []
    table = config.get("data", {})
    data = DataConfig(**{f.name: table[f.name] for f in fields(DataConfig) if f.name in table})
    try:
        return [record.path for record in scan_dataset(data)]
    except DatasetError as e:  # moved or deleted: CLIP-T can still be measured
        logger.warning(f"no CLIP-I: {e}")
        return []


def grid_similarity(clip: Clip, result: GridResult,
                    reference_images: Sequence[Image.Image | Path] | torch.Tensor = ()) -> list[SimilarityRow]:
    """Mean CLIP-T and CLIP-I per (file, weight) of a rendered grid, over its prompts; rows in the grid's order
    (files, then weights). Weight-0 cells are the base model, so every file's weight-0 row is the same baseline."""
    from sdlora.generate.prompt import parse_lora_tags

    keys = sorted(result.cells)
    images = [result.image.crop(result.cells[key]) for key in keys]
    # CLIP reads the prompt without `<lora:...>` tags, as the text encoder did.
    prompts = [parse_lora_tags(result.prompts[p].prompt)[0] for _, _, p in keys]
    scores = dict(zip(keys, clip_scores(clip, images, prompts, reference_images)))
    rows = []
    for i, f in enumerate(result.files):
        for j, weight in enumerate(result.weights):
            cell = [scores[k] for k in keys if k[:2] == (i, j)]
            rows.append(SimilarityRow(file=f.path.name, epoch=f.epoch, step=f.step, weight=weight,
                                      clip_t=_mean([s.clip_t for s in cell]), clip_i=_mean([s.clip_i for s in cell]),
                                      images=len(cell)))
    return rows


def measure_grid(clip: Clip, result: GridResult, run_dir: str | Path | None = None
                 ) -> tuple[list[SimilarityRow], Path]:
    """`sdlora grid --clip`: score a grid against the run's training images and write `<run>/similarity.csv`.

    Args:
        run_dir: the run folder; None takes the folder of the grid's first LoRA file (its run when it holds a
            config.toml; without one CLIP-I stays empty).

    Returns:
        The rows and the CSV's path.
    """
    run = Path(run_dir) if run_dir is not None else result.files[0].path.parent
    references = training_images(run)
    logger.info(f"CLIP similarity of {len(result.cells)} grid cells, {len(references)} training images")
    rows = grid_similarity(clip, result, embed_images(clip, references))
    return rows, write_similarity(run, rows)


def write_similarity(run_dir: str | Path, rows: list[SimilarityRow]) -> Path:
    """Write `<run>/similarity.csv` atomically (file, epoch, step, weight, clip_t, clip_i, images)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_COLUMNS)
    for row in rows:
        writer.writerow([row.file, _cell(row.epoch), _cell(row.step), f"{row.weight:g}", _cell(row.clip_t),
                         _cell(row.clip_i), row.images])
    path = Path(run_dir) / SIMILARITY_NAME
    write_text(path, buffer.getvalue())
    return path


def read_similarity(run_dir: str | Path) -> list[dict[str, str]]:
    """The rows of `<run>/similarity.csv` as strings by column, [] without one."""
    path = Path(run_dir) / SIMILARITY_NAME
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def markdown_table(rows: list[dict[str, str]] | list[SimilarityRow]) -> str:
    """The table as Markdown: file, epoch, step, weight, CLIP-T, CLIP-I (rows from `read_similarity` or
    `grid_similarity`)."""
    lines = ["| file | epoch | step | weight | CLIP-T | CLIP-I |", "|---|---|---|---|---|---|"]
    for row in rows:
        r = row if isinstance(row, dict) else {k: _cell(getattr(row, k)) for k in _COLUMNS}
        lines.append(f"| `{r['file']}` | {r['epoch']} | {r['step']} | {float(r['weight']):g} | {r['clip_t']} | "
                     f"{r['clip_i']} |")
    return "\n".join(lines)


def _projection_dim(clip: Clip) -> int:
    # transformers types the field as what CLIPConfig accepts (None: the default); a loaded config holds the number.
    return cast(int, clip.model.config.projection_dim)


def _features(output) -> torch.Tensor:
    # transformers 4.x returns the projected embeddings; 5.x an output object holding them as pooler_output.
    tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return tensor.float().cpu()


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _cell(value) -> str:
    """A CSV/table cell: '' for unknown (None, nan), 4 decimals for scores."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)

