"""The LoRA browser: what each LoRA file is (read from its safetensors header), whether it fits the base model, and
its picture."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import USER_ERRORS, LoraFileError
from sdlora.generate.pipeline import LoraSpec
from sdlora.models.arch import ARCH_NAMES
from sdlora.ui.app.settings import AppSettings, lora_choices, resolve_inside, resolve_model

logger = logging.getLogger(__name__)


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
        samples = latest_sample_files(folder)
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


def latest_sample_files(folder: Path) -> list[Path]:
    """The sample images (step<N>-<i>.png) of the latest step that rendered into `folder`, by prompt."""
    files = sorted(folder.glob("step*-*.png")) if folder.is_dir() else []
    tag = files[-1].name.rsplit("-", 1)[0] if files else ""
    return [path for path in files if path.name.rsplit("-", 1)[0] == tag]
