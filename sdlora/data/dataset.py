"""Training images: finding images and captions, caption augmentation, aspect-ratio buckets, loading pixels, and the
order of each epoch's batches.

Everything random here is seeded from (seed, epoch[, position]) alone, so a resumed run sees exactly the batches and
augmentations the interrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import ExifTags, Image, ImageOps

from sdlora.config import DataConfig, SubsetConfig, as_resolutions
from sdlora.errors import DatasetError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# kohya repeat folders: "10_mystyle" trains its images 10 times per epoch, "mystyle" is the fallback caption.
_REPEAT_FOLDER = re.compile(r"(\d+)_(.+)")
_MASK_SUFFIX = "_mask"
_WHITE = (255, 255, 255, 255)
# Image formats people put in training folders that training does not read, with a hint.
_UNSUPPORTED = {
    ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF", ".heic": "HEIC", ".heif": "HEIF", ".avif": "AVIF",
    ".jxl": "JPEG XL", ".jp2": "JPEG 2000", ".j2k": "JPEG 2000", ".psd": "Photoshop", ".svg": "SVG",
    ".ico": "ICO", ".tga": "TGA", ".exr": "EXR", ".dng": "camera raw", ".cr2": "camera raw",
    ".nef": "camera raw", ".arw": "camera raw", ".jfif": "JPEG", ".jpe": "JPEG",
}



@dataclass
class ImageRecord:
    """One training image as found on disk (pixels are read later by `load_image`)."""

    path: Path
    caption: str  # raw caption, before prefix/shuffle/dropout
    repeats: int
    size: tuple[int, int]  # (width, height) after EXIF rotation
    bucket: tuple[int, int]  # (width, height) the image is resized and cropped to
    mask_path: Path | None  # "<stem>_mask.png" beside the image (white = train), if present
    dataset_dir: str  # name of the folder it came from, for ss_tag_frequency
    is_reg: bool = False  # a regularization image (data.reg_dirs, auto class images): its loss is weighted
    # The [data] table as it applies to this image: its subset's options over data.*, at this record's resolution
    # (an image trained at two resolutions has a record for each).
    options: DataConfig = field(default_factory=DataConfig)
    subset: str = ""  # the config key of its folder ("data.dirs[0]", "data.subsets[2]"), for ss_datasets


# --- subsets ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One folder as the config lists it: a data.dirs or data.reg_dirs entry, or a [[data.subsets]] table."""

    key: str  # "data.dirs[0]", "data.reg_dirs[1]", "data.subsets[2]"
    dir: str
    is_reg: bool
    options: tuple[DataConfig, ...]  # what its images train with, one per resolution


def sources(cfg: DataConfig) -> list[Source]:
    """Every folder of the config with its options: data.dirs, data.reg_dirs, then [[data.subsets]]."""
    listed = ([(f"data.dirs[{i}]", SubsetConfig(dir=d)) for i, d in enumerate(cfg.dirs)]
              + [(f"data.reg_dirs[{i}]", SubsetConfig(dir=d, is_reg=True)) for i, d in enumerate(cfg.reg_dirs)]
              + [(f"data.subsets[{i}]", s) for i, s in enumerate(cfg.subsets)])
    return [Source(key, subset.dir, subset.is_reg, subset_options(cfg, subset)) for key, subset in listed]


def subset_options(cfg: DataConfig, subset: SubsetConfig) -> tuple[DataConfig, ...]:
    """The [data] table as it applies to a subset's images: its own options over data.*, one table per resolution."""
    own = {f.name: getattr(subset, f.name) for f in dataclasses.fields(subset)
           if f.name not in ("dir", "is_reg", "resolution") and getattr(subset, f.name) is not None}
    options = dataclasses.replace(cfg, dirs=[], reg_dirs=[], subsets=[], **own)
    resolution = cfg.resolution if subset.resolution is None else subset.resolution
    return tuple(dataclasses.replace(options, resolution=r) for r in as_resolutions(resolution))


# --- discovery -------------------------------------------------------------------------------------------------


Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Finding:
    """One problem or notable fact about a dataset. `path` is the file (or folder) it is about; None for the whole
    dataset, whose message then names what it is about."""

    severity: Severity
    check: str  # short id: "unreadable", "duplicate", "caption-long", ... (see `doctor.diagnose`)
    path: Path | None
    message: str  # one line, without the path; says what happens in training and what to do

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path is not None else self.message


@dataclass
class Scan:
    """What one walk over `data.dirs` found: the records training reads, and findings about everything else."""

    records: list[ImageRecord]
    findings: list[Finding]
    folders: dict[Path, list[Path]]  # each folder read -> its training images, usable or not


def scan(cfg: DataConfig, base_dir: Path | None = None, reg: bool = False) -> Scan:
    """Read every training folder (`cfg.dirs` and the subsets; with `reg`, the regularization folders:
    `cfg.reg_dirs` and the is_reg subsets) as training reads it, once: a record for each usable image and
    resolution with its caption, repeats, size, bucket, mask and options, and a finding for what stops training,
    is skipped or is left out.

    Each folder is read non-recursively, except that a folder holding kohya repeat folders (`10_mystyle/`) is read
    through those. Captions come from the first sidecar in `cfg.caption_extensions`, else `metadata.jsonl`, else a
    repeat folder's class text, else "". Only the first non-empty line of a caption file is used (as kohya does).

    Findings (check, severity): dataset (error): a missing folder, a malformed metadata.jsonl, no usable image at
    all; unreadable, caption-encoding (error; warning with `cfg.skip_bad_images`, the image is then skipped): an
    image that cannot be read, a caption that is not UTF-8; unsupported (warning): .gif/.tiff/.heic/... files,
    which training does not read; ignored (warning): images beside repeat folders; empty-folder (warning): a folder
    with no usable image.

    Args:
        cfg: the `[data]` table.
        base_dir: folder that relative folders are resolved against; the current directory if None.
        reg: read the regularization folders instead of the training ones; their records have is_reg set.

    Returns:
        The records ordered by folder (in `sources` order, repeat folders by name), then by file name, then by
        resolution; the findings in the order the walk met them.
    """
    result = Scan([], [], {})
    bad = [ext for ext in cfg.caption_extensions if not ext.startswith(".")]
    if bad:
        message = f"data.caption_extensions: {bad[0]!r} must start with a dot, e.g. '.{bad[0]}'"
        return Scan([], [Finding("error", "dataset", None, message)], {})
    base = Path.cwd() if base_dir is None else Path(base_dir)
    chosen = [source for source in sources(cfg) if source.is_reg == reg]
    roots = [(base / source.dir).resolve() for source in chosen]
    for root, source in zip(roots, chosen):
        try:
            folders = expand_folder(root, source.options[0].repeats, source.key)
        except DatasetError as e:
            result.findings.append(Finding("error", "dataset", None, str(e)))
            continue
        if [folder for folder, _, _ in folders] != [root]:
            result.findings += [
                Finding("warning", "ignored", p, "not trained: this folder has <N>_<name> repeat subfolders and "
                                                 "only their images are read; move it into one")
                for p in sorted(root.iterdir()) if is_training_image(p)
            ]
        for folder, repeats, class_text in folders:
            _scan_folder(folder, repeats, class_text, source, result)
    if not result.records:
        names = ", ".join(str(f) for f in roots)
        result.findings.append(Finding("error", "dataset", None, f"no training images found in {names}; supported "
                                                                 f"extensions: {', '.join(IMAGE_EXTENSIONS)}"))
    else:
        read = {r.path for r in result.records}
        result.findings += [Finding("warning", "empty-folder", folder, "no usable image in this folder")
                            for folder, images in result.folders.items() if not read.intersection(images)]
    return result


def scan_dataset(cfg: DataConfig, base_dir: Path | None = None) -> list[ImageRecord]:
    """The records of `scan`; its warnings are logged.

    Raises:
        DatasetError: the first error `scan` found (unless `cfg.skip_bad_images`, a bad image or caption is a
            warning and the image is skipped), naming the file or folder and the fix.
    """
    result = scan(cfg, base_dir)
    errors = [f for f in result.findings if f.severity == "error"]
    if errors:
        raise DatasetError(str(errors[0]))
    for finding in result.findings:
        logger.warning("%s", finding)
    return result.records


def expand_folder(folder: Path, default_repeats: int, key: str = "data.dirs") -> list[tuple[Path, int, str | None]]:
    """The folders to read for one `data.dirs` entry (or the folder of config key `key`), each with its repeats and
    class text (None if none)."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: image folder not found; fix {key}")
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and _REPEAT_FOLDER.fullmatch(p.name))
    if subfolders:
        return [(p, *_parse_repeat_folder(p)) for p in subfolders]
    if _REPEAT_FOLDER.fullmatch(folder.name):
        return [(folder, *_parse_repeat_folder(folder))]
    return [(folder, default_repeats, None)]


def _parse_repeat_folder(folder: Path) -> tuple[int, str]:
    match = _REPEAT_FOLDER.fullmatch(folder.name)
    assert match is not None, "callers pass repeat folders only"
    repeats, class_text = int(match[1]), match[2]
    if repeats < 1:
        raise DatasetError(f"{folder}: a repeat folder needs at least 1 repeat; rename it to 1_{class_text}")
    return repeats, class_text


def is_training_image(path: Path) -> bool:
    """Whether training reads `path` as an image (masks and dot files are not; see IMAGE_EXTENSIONS)."""
    # Dot files include macOS "._img.png" resource forks, which look like images but are not.
    return (
        path.suffix.lower() in IMAGE_EXTENSIONS
        and not path.name.startswith(".")
        and not path.stem.endswith(_MASK_SUFFIX)
        and path.is_file()
    )


def _scan_folder(folder: Path, repeats: int, class_text: str | None, source: Source, result: Scan) -> None:
    cfg = source.options[0]  # all but the resolution are the same for each of them
    try:
        metadata = _read_metadata(folder / "metadata.jsonl")
    except DatasetError as e:
        result.findings.append(Finding("error", "dataset", None, str(e)))
        return
    files = sorted(folder.iterdir())
    images = [p for p in files if is_training_image(p)]
    result.folders[folder] = images
    result.findings += [_unsupported(p) for p in files
                        if p.suffix.lower() in _UNSUPPORTED and not p.name.startswith(".") and p.is_file()]
    severity: Severity = "warning" if cfg.skip_bad_images else "error"
    # What the user can do about a bad file: skip it, or (when skipping) nothing more.
    fix = " (training skips it: data.skip_bad_images = true)" if cfg.skip_bad_images else (
        ", or set data.skip_bad_images = true")
    count = len(result.records)
    for path in images:
        sidecar = caption_file(path, cfg.caption_extensions)
        caption, problem = _read_caption(sidecar) if sidecar else (None, None)
        if problem:
            result.findings.append(Finding(severity, "caption-encoding", sidecar, problem + fix))
        try:
            size = _probe(path)
        except Exception as e:  # PIL reports damage as OSError, SyntaxError, EOFError, struct.error, ...
            result.findings.append(Finding(severity, "unreadable", path, _cannot_read(e) + fix))
            continue
        if problem:
            continue
        mask = path.with_name(path.stem + _MASK_SUFFIX + ".png")
        result.records += [ImageRecord(
            path=path,
            caption=caption if caption is not None else metadata.get(path.name, class_text or ""),
            repeats=repeats,
            size=size,
            bucket=assign_bucket(size, options),
            mask_path=mask if mask.is_file() else None,
            dataset_dir=folder.name,
            is_reg=source.is_reg,
            options=options,
            subset=source.key,
        ) for options in source.options]
    if len(result.records) > count:
        logger.info("%s: %d images, %d repeats", folder, (len(result.records) - count) // len(source.options),
                    repeats)


def caption_file(image: Path, extensions: list[str]) -> Path | None:
    """The caption file training reads for `image`: the first of its sidecars with `extensions` that exists."""
    return next((image.with_suffix(ext) for ext in extensions if image.with_suffix(ext).is_file()), None)


def _read_caption(path: Path) -> tuple[str | None, str | None]:
    """(the first non-empty line of a caption file, None), or (None, why it cannot be read and the command that
    fixes it)."""
    raw = path.read_bytes()
    try:
        # utf-8-sig: Windows Notepad writes a BOM that would otherwise stick to the first tag.
        return _first_line(raw.decode("utf-8-sig")), None
    except UnicodeDecodeError as e:
        quoted, converted = shlex.quote(display_path(path)), shlex.quote(f"{display_path(path)}.utf8")
        return None, (f"caption is not UTF-8 (byte {e.start} is 0x{raw[e.start]:02X}, probably Latin-1); convert it: "
                      f"iconv -f latin1 -t utf8 {quoted} > {converted} && mv {converted} {quoted}")


def display_path(path: Path) -> str:
    """A path relative to the current directory when it is inside it, else as given."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _read_metadata(path: Path) -> dict[str, str]:
    """Captions by file name from a Hugging Face imagefolder `metadata.jsonl` ("text" or "caption" key)."""
    if not path.is_file():
        return {}
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8; re-save it as UTF-8") from None
    captions = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{number}: not valid JSON ({e.msg}); fix or remove the line") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            raise DatasetError(f'{path}:{number}: expected {{"file_name": "...", "text": "..."}}; fix the line')
        text = entry.get("text", entry.get("caption"))
        if isinstance(text, str):
            captions[Path(entry["file_name"]).as_posix()] = _first_line(text)
    return captions


def probe_image(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF rotation, checking the file is complete without decoding it at full size.

    Raises:
        DatasetError: the image cannot be read; the message names it.
    """
    try:
        return _probe(path)
    except Exception as e:  # PIL reports damage as OSError, SyntaxError, EOFError, struct.error, ...
        raise DatasetError(_unreadable(path, e)) from None


def _probe(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        width, height = img.size
        # The base-class getexif reads only the header; PngImageFile.getexif decodes every pixel looking for
        # an eXIf chunk after the image data.
        orientation = Image.Image.getexif(img).get(ExifTags.Base.Orientation, 1)
        _check_complete(img)
    # Orientations 5-8 include a 90 degree turn.
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _check_complete(img: Image.Image) -> None:
    if img.format == "PNG":
        img.verify()  # checks every chunk's CRC without inflating the pixels
    else:
        # verify() does nothing for JPEG; a 1/8-scale draft decode still reads the whole stream, so it catches
        # truncation at a fraction of a full decode (draft is a no-op for other formats).
        img.draft(None, (1, 1))
        img.load()


def _cannot_read(error: Exception) -> str:
    return (f"cannot read image ({type(error).__name__}: {error}); remove or re-save it, "
            "or set data.skip_bad_images = true")


def _unreadable(path: Path, error: Exception) -> str:
    return f"{path}: {_cannot_read(error)}"


def _unsupported(path: Path) -> Finding:
    kind = _UNSUPPORTED[path.suffix.lower()]
    if kind == "JPEG":
        return Finding("warning", "unsupported", path, f"{path.suffix} is not read by training; rename it to .jpg")
    return Finding("warning", "unsupported", path, f"{kind} images are not read by training (it reads "
                                                   f"{', '.join(IMAGE_EXTENSIONS)}); convert it to PNG or JPEG")


# --- buckets ---------------------------------------------------------------------------------------------------


def make_buckets(resolution: int, min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """kohya-style bucket sizes: for each width, the largest height keeping about `resolution**2` pixels.

    Args:
        resolution: training side length; no bucket has more than resolution**2 pixels.
        min_reso: smallest allowed side.
        max_reso: largest allowed side.
        step: every side is a multiple of this.

    Returns:
        Sorted (width, height) pairs: the tallest bucket for each width and its mirror (so portrait and landscape
        images get the same choice of shapes), plus the square bucket (resolution rounded down to a multiple of step).
    """
    area = resolution * resolution
    square = max(step, resolution // step * step)
    buckets = {(square, square)}
    width = -(-min_reso // step) * step  # first multiple of step >= min_reso
    while width <= max_reso:
        height = min(max_reso, area // width // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def assign_bucket(size: tuple[int, int], cfg: DataConfig) -> tuple[int, int]:
    """The bucket for an image: closest aspect ratio, shrunk if covering it would upscale more than allowed.

    Args:
        size: (width, height) of the image after EXIF rotation.
        cfg: the `[data]` table as it applies to the image (`ImageRecord.options`: one resolution, bucket settings,
            max_upscale).

    Returns:
        (width, height) of the bucket; (resolution, resolution) when bucketing is off.
    """
    (resolution,) = as_resolutions(cfg.resolution)
    if not cfg.enable_bucket:
        return resolution, resolution
    width, height = size
    aspect = math.log(width / height)
    buckets = make_buckets(resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_step)
    # Ties (same shape at two sizes) go to the larger bucket, then the smaller width, so the choice is stable.
    _, _, bucket = min((abs(math.log(w / h) - aspect), -w * h, (w, h)) for w, h in buckets)
    return _limit_upscale(bucket, size, cfg.max_upscale, cfg.bucket_step)


def _limit_upscale(
    bucket: tuple[int, int], size: tuple[int, int], max_upscale: float, step: int
) -> tuple[int, int]:
    """Shrink `bucket`, keeping its shape, until `size` covers it with at most `max_upscale` scaling (min: step)."""
    max_width, max_height = size[0] * max_upscale, size[1] * max_upscale
    candidate = bucket
    long_side = max(bucket)
    while (candidate[0] > max_width or candidate[1] > max_height) and long_side > step:
        long_side -= step
        short_side = max(step, round(min(bucket) * long_side / max(bucket) / step) * step)
        candidate = (long_side, short_side) if bucket[0] >= bucket[1] else (short_side, long_side)
    return candidate


def bucket_summary(records: list[ImageRecord]) -> dict[tuple[int, int], int]:
    """Number of images (not counting repeats) per bucket, sorted by bucket, for the training log."""
    return dict(sorted(Counter(r.bucket for r in records).items()))


# --- captions --------------------------------------------------------------------------------------------------


def process_caption(caption: str, cfg: DataConfig, rng: random.Random) -> str:
    """The caption trained on this time: prefix, suffix, caption dropout, tag dropout and shuffling.

    Tags are the comma-separated parts. The prefix (`cfg.caption_prefix`, e.g. a trigger word) is added as its own
    leading tag(s) unless the caption already starts with it, the suffix (`cfg.caption_suffix`) as trailing tag(s)
    unless it already ends with it. The first `cfg.keep_tokens` tags are never dropped or moved; the prefix counts
    among them, and is always kept even when keep_tokens is smaller than its tag count. The suffix is shuffled and
    dropped as the other tags are, as kohya does.

    Args:
        caption: the raw caption of an image.
        cfg: the `[data]` table as it applies to the image (`ImageRecord.options`): caption_prefix, caption_suffix,
            caption_dropout, keep_tokens, tag_dropout, shuffle_caption.
        rng: this sample's generator (see `sample_rng`).

    Returns:
        The tags joined with ", ", or "" when the whole caption is dropped.
    """
    tags = _split_tags(caption)
    prefix = _split_tags(cfg.caption_prefix)
    if prefix and tags[: len(prefix)] != prefix:
        tags = prefix + tags
    suffix = _split_tags(cfg.caption_suffix)
    if suffix and tags[len(tags) - len(suffix):] != suffix:
        tags = tags + suffix
    if cfg.caption_dropout and rng.random() < cfg.caption_dropout:
        return ""
    keep = max(cfg.keep_tokens, len(prefix))
    fixed, rest = tags[:keep], tags[keep:]
    if cfg.tag_dropout:
        rest = [tag for tag in rest if rng.random() >= cfg.tag_dropout]
    if cfg.shuffle_caption:
        rng.shuffle(rest)
    return ", ".join(fixed + rest)


def record_caption(record: ImageRecord, rng: random.Random, as_written: bool = False) -> str:
    """`process_caption` of a record with its own options; a regularization image's caption gets no prefix, which is
    the trigger word. `as_written`: without the random parts (dropout, shuffling), as validation and checks read it."""
    changes: dict = {"caption_prefix": ""} if record.is_reg else {}
    if as_written:
        changes.update(caption_dropout=0.0, tag_dropout=0.0, shuffle_caption=False)
    return process_caption(record.caption, dataclasses.replace(record.options, **changes), rng)


def _split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def without_trigger(caption: str, trigger: str, class_word: str = "") -> str:
    """`caption` with the trigger word replaced by `class_word`: a whole tag, or a whole word inside a tag
    ("a photo of sks dog"); an emptied tag drops. What class images and preservation prompts are drawn from."""
    tags = [" ".join(_trigger_pattern(trigger).sub(class_word, tag).split()) for tag in _split_tags(caption)]
    return ", ".join(tag for tag in tags if tag)


def has_trigger(caption: str, trigger: str) -> bool:
    """Whether `caption` holds the trigger word as `without_trigger` finds it."""
    return bool(_trigger_pattern(trigger).search(caption))


def _trigger_pattern(trigger: str) -> re.Pattern:
    return re.compile(rf"(?<![\w-]){re.escape(trigger.strip())}(?![\w-])", re.I)


def trigger_of(cfg: DataConfig) -> str:
    """The trigger word: data.trigger_word, else data.caption_prefix."""
    return cfg.trigger_word or cfg.caption_prefix


def pair_regularization(train: list[ImageRecord], reg: list[ImageRecord]) -> list[ImageRecord]:
    """`reg` with repeats that make one epoch hold as many regularization images as training images, as kohya's
    DreamBoothDataset does: each reg image once with its folder's repeats, then one more repeat each, in order,
    until the count (with repeats) reaches the training images' (with repeats). Extra reg images stay unused.
    Each resolution's reg images pair with the training images at that resolution, as each kohya dataset's do."""
    return [paired for resolution in sorted({r.options.resolution for r in reg}, key=str)
            for paired in _pair_regularization([r for r in train if r.options.resolution == resolution],
                                               [r for r in reg if r.options.resolution == resolution])]


def _pair_regularization(train: list[ImageRecord], reg: list[ImageRecord]) -> list[ImageRecord]:
    target = sum(r.repeats for r in train)
    repeats: dict[int, int] = {}
    n, first_loop = 0, True
    while reg and n < target:
        for i, record in enumerate(reg):
            repeats[i] = repeats.get(i, 0) + (record.repeats if first_loop else 1)
            n += record.repeats if first_loop else 1
            if n >= target:
                break
        first_loop = False
    return [dataclasses.replace(reg[i], repeats=k, is_reg=True) for i, k in sorted(repeats.items())]


def tag_frequency(records: list[ImageRecord]) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: {dataset folder: {tag: number of images whose caption has it}}.

    Tags are lowercased as kohya does; repeats, resolutions and duplicate tags within one caption count once.
    """
    frequency: dict[str, dict[str, int]] = {}
    for record in {(r.dataset_dir, r.path): r for r in records}.values():
        counts = frequency.setdefault(record.dataset_dir, {})
        for tag in dict.fromkeys(tag.lower() for tag in _split_tags(record.caption)):
            counts[tag] = counts.get(tag, 0) + 1
    return frequency


def kohya_datasets(records: list[ImageRecord], batch_size: int) -> list[dict]:
    """kohya's `ss_datasets` (what sd-scripts writes for a --dataset_config): a dataset per resolution, each with a
    subset per folder and that folder's options; counts with repeats, as kohya's are."""
    datasets = []
    for resolution in sorted({r.options.resolution for r in records}):
        chosen = [r for r in records if r.options.resolution == resolution]
        folders: dict[tuple[str, str], list[ImageRecord]] = {}
        for r in chosen:
            folders.setdefault((r.subset, r.dataset_dir), []).append(r)
        o = chosen[0].options
        buckets = Counter(bucket for r in chosen for bucket in [r.bucket] * r.repeats)
        datasets.append({
            "is_dreambooth": True,
            "batch_size_per_device": batch_size,
            "num_train_images": sum(r.repeats for r in chosen if not r.is_reg),
            "num_reg_images": sum(r.repeats for r in chosen if r.is_reg),
            "resolution": [resolution, resolution],
            "enable_bucket": o.enable_bucket,
            "min_bucket_reso": o.min_bucket_reso,
            "max_bucket_reso": o.max_bucket_reso,
            "tag_frequency": tag_frequency(chosen),
            "bucket_info": {"buckets": {str(i): {"resolution": list(b), "count": n}
                                        for i, (b, n) in enumerate(sorted(buckets.items()))}},
            "subsets": [{
                "img_count": len(group),
                "num_repeats": group[0].repeats,
                "color_aug": False,
                "flip_aug": group[0].options.flip_aug,
                "random_crop": group[0].options.random_crop,
                "shuffle_caption": group[0].options.shuffle_caption,
                "keep_tokens": group[0].options.keep_tokens,
                "caption_prefix": group[0].options.caption_prefix,
                "caption_suffix": group[0].options.caption_suffix,
                "image_dir": folder,
                "is_reg": group[0].is_reg,
            } for (_, folder), group in folders.items()],
        })
    return datasets


# --- epoch order -----------------------------------------------------------------------------------------------


def epoch_batches(records: list[ImageRecord], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches of record indices, each batch from a single bucket.

    Each record appears `repeats` times. The result depends only on the arguments, so a resumed run can skip the
    batches it already trained.

    Args:
        records: the dataset, as returned by `scan_dataset`.
        batch_size: most indices per batch; each bucket's last batch may be smaller.
        seed: the training seed.
        epoch: the epoch number.

    Returns:
        Batches in training order.

    Raises:
        ValueError: batch_size is less than 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(f"batches-{seed}-{epoch}")
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, record in enumerate(records):
        by_bucket.setdefault(record.bucket, []).extend([index] * record.repeats)
    batches = []
    for bucket in sorted(by_bucket):  # sorted, so the order does not depend on which bucket was seen first
        indices = by_bucket[bucket]
        rng.shuffle(indices)
        batches += [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    return batches


def sample_rng(seed: int, epoch: int, position: int) -> random.Random:
    """The generator for one sample's augmentations (caption, flip, crop).

    Seeded from (seed, epoch, position in the epoch) only, so an item's augmentation does not depend on what was
    drawn before it, which keeps a resumed run identical to an uninterrupted one.
    """
    return random.Random(f"sample-{seed}-{epoch}-{position}")


# --- pixels ----------------------------------------------------------------------------------------------------


def load_image(record: ImageRecord, flip: bool, rng: random.Random, random_crop: bool) -> dict:
    """Read an image (and its mask) at its bucket size: upright, RGB, resized to cover, cropped, maybe flipped.

    Args:
        record: the image, from `scan_dataset`.
        flip: mirror left-right (the mask too).
        rng: this sample's generator; used for the crop position when `random_crop`.
        random_crop: crop at a random position instead of the center.

    Returns:
        {"pixels": float [3, H, W] in [-1, 1], "mask": float [1, H, W] in [0, 1] or None,
        "original_size": (h, w) of the upright source, "crop_top_left": (top, left) pixels cut from the resized
        image as the model sees it (mirrored with the flip), "target_size": (h, w) of the bucket}.
        These are SDXL's size conditionings.

    Raises:
        DatasetError: the image or mask cannot be read, or the mask size differs from the image size.
    """
    import torch  # here, not at the top: `sdlora doctor` reads datasets without torch, to start in a second

    image = load_rgb(record.path)
    resized = _cover_size(image.size, record.bucket)
    top, left = _crop_offset(resized, record.bucket, rng, random_crop)
    pixels = _resize_crop(image, resized, (top, left), record.bucket, flip)
    mask = None
    if record.mask_path is not None:
        mask_image = _load_mask(record.mask_path)
        if mask_image.size != image.size:
            raise DatasetError(f"{record.mask_path}: mask is {mask_image.size[0]}x{mask_image.size[1]} but the "
                               f"image is {image.size[0]}x{image.size[1]}; resize the mask to match")
        mask_pixels = np.asarray(_resize_crop(mask_image, resized, (top, left), record.bucket, flip), np.float32)
        mask = torch.from_numpy(mask_pixels / 255.0)[None]  # [1, H, W]
    if flip:
        left = resized[0] - record.bucket[0] - left
    rgb = np.asarray(pixels, dtype=np.float32) / 127.5 - 1.0  # [H, W, 3]
    return {
        "pixels": torch.from_numpy(rgb).permute(2, 0, 1).contiguous(),
        "mask": mask,
        "original_size": (image.size[1], image.size[0]),
        "crop_top_left": (top, left),
        "target_size": (record.bucket[1], record.bucket[0]),
    }


def load_rgb(path: Path) -> Image.Image:
    """An image file as training reads it: upright (EXIF), 8-bit RGB, see `to_rgb`.

    Raises:
        DatasetError: the file cannot be read; the message names it.
    """
    try:
        with Image.open(path) as img:
            return to_rgb(ImageOps.exif_transpose(img))
    except Exception as e:  # PIL reports damage as OSError, SyntaxError, EOFError, struct.error, ...
        raise DatasetError(_unreadable(path, e)) from None


def _load_mask(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return ImageOps.exif_transpose(img).convert("L")
    except Exception as e:
        raise DatasetError(_unreadable(path, e)) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparency is composited on white, 16-bit gray is scaled (PIL's convert would clip it)."""
    if image.mode.startswith("I"):
        gray = np.clip(np.asarray(image, dtype=np.float32) / 257.0, 0, 255)
        image = Image.fromarray(gray.round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image.convert("RGB")


def _cover_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the image scaled, aspect kept, to the smallest size that covers the bucket."""
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    return max(bucket[0], round(size[0] * scale)), max(bucket[1], round(size[1] * scale))


def _crop_offset(
    resized: tuple[int, int], bucket: tuple[int, int], rng: random.Random, random_crop: bool
) -> tuple[int, int]:
    spare_x, spare_y = resized[0] - bucket[0], resized[1] - bucket[1]
    if random_crop:
        return rng.randint(0, spare_y), rng.randint(0, spare_x)
    return spare_y // 2, spare_x // 2


def _resize_crop(
    image: Image.Image, resized: tuple[int, int], top_left: tuple[int, int], bucket: tuple[int, int], flip: bool
) -> Image.Image:
    top, left = top_left
    if image.size != resized:
        image = image.resize(resized, Image.Resampling.LANCZOS)
    image = image.crop((left, top, left + bucket[0], top + bucket[1]))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image
