"""Dataset doctor: what in a training folder would stop, weaken or silently change training, one finding per file.

Files are judged as training reads them: the findings of `dataset.scan`, the walk that also gives training its
records, and then what only a look at every image tells: decoding, duplicates, tiny or extreme images, masks,
missing or over-long captions. Training runs the same checks before it loads the model.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from sdlora.config import DataConfig
from sdlora.data.dataset import (
    Finding,
    ImageRecord,
    Scan,
    Severity,
    assign_bucket,
    bucket_summary,
    caption_file,
    display_path,
    has_trigger,
    probe_image,
    record_caption,
    scan,
    sources,
    to_rgb,
    trigger_of,
)
from sdlora.errors import DatasetError
from sdlora.models.clip_tokenizer import load_clip_tokenizer

SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")

MAX_ASPECT = 4.0  # beyond 4:1 even the most extreme bucket crops away much of the image
NOTABLE_UPSCALE = 1.25  # upscaling below this is reported as info, from this on as a warning
NEAR_DUPLICATE_BITS = 4  # pHash Hamming distance at or below which two images count as near-duplicates
# pHash ignores brightness and colour (every flat colour field hashes alike), so near-duplicates must also agree
# on an 8x8 colour thumbnail: mean absolute difference in 0-255 units. JPEG re-compression stays far below it.
NEAR_DUPLICATE_COLOR = 12.0

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")  # as dataset.to_rgb composites them
_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")
_ORIENTATIONS = {
    2: "mirrored left-right", 3: "rotated 180°", 4: "mirrored top-bottom", 5: "mirrored and rotated 90°",
    6: "rotated 90° clockwise", 7: "mirrored and rotated 90°", 8: "rotated 90° counter-clockwise",
}


@dataclass
class Report:
    """Everything `diagnose` found, and the dataset as training will see it."""

    findings: list[Finding] = field(default_factory=list)
    records: list[ImageRecord] = field(default_factory=list)  # what training reads (dataset.scan's records)
    # data.reg_dirs' images, with their folders' repeats (training pairs them: dataset.pair_regularization)
    reg_records: list[ImageRecord] = field(default_factory=list)
    images: int = 0  # usable images
    images_with_repeats: int = 0
    buckets: dict[tuple[int, int], int] = field(default_factory=dict)  # images per (width, height) bucket
    resolution: int | list[int] = 0  # every resolution trained (a list when there are several)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """False only when something would stop training (an error); warnings and info never do."""
        return not self.count("error")

    def count(self, severity: Severity) -> int:
        return sum(f.severity == severity for f in self.findings)


@dataclass
class _Facts:
    """What one decoded image tells beyond its record: file hash, source format, perceptual hash."""

    sha256: str
    mode: str = ""
    orientation: int = 1
    sixteen_bit: bool = False
    alpha: bool = False
    phash: int = 0
    thumb: np.ndarray | None = None  # [8, 8, 3] float32 colour thumbnail
    error: str = ""  # decoding failed although the scan's check passed


def diagnose(cfg: DataConfig, tokenizer=None, base_dir: Path | None = None) -> Report:
    """Check a dataset before training: every file, as training will read it, plus duplicates and captions.

    Findings (check id, severity): those of `dataset.scan` (dataset, unreadable, caption-encoding, unsupported,
    ignored, empty-folder), and
        unreadable (error): an image that passes the scan's check but does not decode.
        mask (error): a `_mask.png` that cannot be read or differs in size from its image.
        small (warning; info under 1.25x): upscaled to its bucket by how much, or shrunk to a smaller bucket.
        aspect (warning): more than 4:1, with the share its bucket crops away.
        caption-missing, caption-empty (warning): the image trains on an empty caption (or only the prefix).
        caption-long (warning): over `cfg.max_token_length` CLIP tokens after the prefix; the rest is truncated.
        duplicate, near-duplicate (warning): same bytes (sha256), or 8x8 DCT pHash within 4 bits and close colours.
        converted (info): CMYK, 16-bit, palette, grayscale or alpha (composited on white) become 8-bit RGB.
        exif-rotated (info): EXIF orientation is applied, so the image trains as viewers show it.
    The regularization images (`cfg.reg_dirs`, is_reg subsets) get the same checks, and
        reg-count (info; warning when some go unused): how many pair with the training images each epoch.
        reg-trigger (warning): a regularization caption holds the trigger word, so it would teach the trigger the
            base model's look.
        reg-bucket (warning): a bucket that no training image uses: its regularization images never share a batch
            with training images.

    Args:
        cfg: the `[data]` table; `skip_bad_images` decides whether bad files are errors or skipped warnings.
        tokenizer: a CLIP tokenizer for caption lengths; None loads the real one (`clip_tokenizer.load_clip_tokenizer`).
        base_dir: folder that relative `cfg.dirs` are resolved against, as in `dataset.scan`; cwd if None.

    Returns:
        The report, with the records training reads; dataset problems become findings, they are never raised.
    """
    start = time.perf_counter()
    with _quiet(logging.getLogger(scan.__module__)):  # the report says all the scan would log
        scanned = scan(cfg, base_dir)
        has_reg = any(source.is_reg for source in sources(cfg))
        reg = scan(cfg, base_dir, reg=True) if has_reg else Scan([], [], {})
    reg_records = reg.records
    # A folder listed twice in data.dirs is read twice (an image at two resolutions has two records): trained twice,
    # but each file is judged once, by its first record.
    findings = list(dict.fromkeys(scanned.findings + [_as_reg(f) for f in reg.findings]))
    records = list(reversed({r.path: r for r in reversed(scanned.records + reg_records)}.values()))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        facts = list(pool.map(_examine, [r.path for r in records]))
    for record, fact in zip(records, facts):
        findings += _image_findings(record, fact)
    if tokenizer is None:
        tokenizer = load_clip_tokenizer()
    findings += _caption_findings(records, tokenizer)
    findings += _duplicate_findings(records, facts)
    if reg_records:
        findings += _reg_findings(scanned.records, reg_records, cfg)
    broken = {r.path for r, f in zip(records, facts) if f.error}
    usable = [r for r in scanned.records if r.path not in broken]
    resolutions = cfg.resolutions()
    return Report(
        findings=findings,
        records=scanned.records,
        reg_records=reg_records,
        images=len({r.path for r in usable}),
        images_with_repeats=sum(r.repeats for r in usable),
        buckets=bucket_summary(usable),
        resolution=resolutions[0] if len(resolutions) == 1 else resolutions,
        seconds=time.perf_counter() - start,
    )


def format_report(report: Report) -> str:
    """The report as text: a header, one line per finding (errors first), the buckets and a summary."""
    reg = f" + {len(report.reg_records)} regularization images" if report.reg_records else ""
    lines = [f"{report.images} images ({report.images_with_repeats} with repeats){reg} at resolution "
             f"{report.resolution}"]
    rank = {severity: i for i, severity in enumerate(SEVERITIES)}
    for f in sorted(report.findings, key=lambda f: (rank[f.severity], str(f.path or ""), f.check)):
        where = f" {display_path(f.path)}" if f.path is not None else ""
        lines.append(f"{f.severity} [{f.check}]{where}: {f.message}")
    buckets = ", ".join(f"{w}x{h}: {n}" for (w, h), n in report.buckets.items())
    lines.append(f"buckets (width x height: images): {buckets or 'none'}")
    counts = []
    for severity in SEVERITIES:
        checks = Counter(f.check for f in report.findings if f.severity == severity)
        detail = f" ({', '.join(f'{n} {check}' for check, n in sorted(checks.items()))})" if checks else ""
        n = sum(checks.values())
        counts.append(f"{n} {severity}{'s' if n != 1 and severity != 'info' else ''}{detail}")
    verdict = "ready to train" if report.ok else "training would stop: fix the errors"
    lines.append(f"summary: {', '.join(counts)} in {report.seconds:.1f} s; {verdict}")
    return "\n".join(lines)


# --- helpers -----------------------------------------------------------------------------------------


@contextmanager
def _quiet(log: logging.Logger) -> Iterator[None]:
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# --- per image -------------------------------------------------------------------------------------------------


def _examine(path: Path) -> _Facts:
    """Hash the file, read its format from the header, and decode it small for the perceptual hash."""
    data = path.read_bytes()
    facts = _Facts(sha256=hashlib.sha256(data).hexdigest())
    try:
        with Image.open(io.BytesIO(data)) as img:
            facts.mode = img.mode
            # Header-only EXIF, as dataset.probe_image reads it (PngImageFile.getexif would decode the pixels).
            facts.orientation = Image.Image.getexif(img).get(ExifTags.Base.Orientation, 1)
            # 16-bit PNGs open as I;16 (gray) or as RGB(A) read from a ";16B" raw mode, losing the low byte.
            facts.sixteen_bit = img.mode.startswith("I") or any(";16" in str(tile.args) for tile in img.tile)
            facts.alpha = img.mode in _ALPHA_MODES or "transparency" in img.info
            img.draft(None, (64, 64))  # JPEG: decode at 1/2-1/8 scale, plenty for a 32x32 hash; no-op otherwise
            rgb = to_rgb(ImageOps.exif_transpose(img))
    except Exception as e:  # PIL reports damage as OSError, SyntaxError, EOFError, struct.error, ...
        facts.error = f"{type(e).__name__}: {e}"
        return facts
    facts.phash = _phash(rgb.convert("L"))
    facts.thumb = np.asarray(rgb.resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
    return facts


# Rows 0-7 of the 32-point DCT-II basis: low @ X @ low.T gives the 8x8 lowest frequencies of a 32x32 image.
_DCT_LOW = np.cos(np.pi * np.outer(np.arange(8), 2 * np.arange(32) + 1) / 64)


def _phash(gray: Image.Image) -> int:
    """64-bit perceptual hash: which of the 8x8 lowest DCT frequencies lie above their median (the DC term is
    left out of the median, as it only holds the mean brightness)."""
    pixels = np.asarray(gray.resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    # Rounded so that a flat image's AC terms are exactly 0, not float noise that would give it random bits.
    low = np.round(_DCT_LOW @ pixels @ _DCT_LOW.T, 3).ravel()  # [64]
    bits = low > np.median(low[1:])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _image_findings(record: ImageRecord, facts: _Facts) -> list[Finding]:
    path = record.path
    if facts.error:
        return [Finding("error", "unreadable", path, f"cannot decode the image ({facts.error}); re-save it")]
    findings = []
    conversions = [
        text for condition, text in [
            (facts.mode == "CMYK", "CMYK to RGB (colours may shift)"),
            (facts.sixteen_bit, "16-bit to 8-bit"),
            (facts.mode in ("P", "PA"), "palette to RGB"),
            (facts.mode in _GRAY_MODES, "grayscale to RGB"),
            (facts.alpha, "alpha composited on white"),
        ] if condition
    ]
    if conversions:
        findings.append(Finding("info", "converted", path, f"converted: {', '.join(conversions)}"))
    if facts.orientation in _ORIENTATIONS:
        findings.append(Finding("info", "exif-rotated", path, f"EXIF orientation {facts.orientation}: trained "
                                f"{_ORIENTATIONS[facts.orientation]}, upright as viewers show it "
                                f"({record.size[0]}x{record.size[1]})"))
    findings += _size_findings(record)
    if record.mask_path is not None:
        try:
            mask_size = probe_image(record.mask_path)
        except DatasetError as e:
            message = str(e).removeprefix(f"{record.mask_path}: ")  # the finding names the file itself
            findings.append(Finding("error", "mask", record.mask_path, message))
        else:
            if mask_size != record.size:
                findings.append(Finding("error", "mask", record.mask_path,
                                        f"mask is {mask_size[0]}x{mask_size[1]} but {path.name} is "
                                        f"{record.size[0]}x{record.size[1]}; resize the mask to match"))
    return findings


def _size_findings(record: ImageRecord) -> list[Finding]:
    cfg = record.options
    (width, height), (bucket_w, bucket_h) = record.size, record.bucket
    scale = max(bucket_w / width, bucket_h / height)  # the image is resized to cover its bucket, then cropped
    full_w, full_h = assign_bucket(record.size, replace(cfg, max_upscale=math.inf))
    shrunk = (full_w, full_h) != record.bucket
    findings = []
    note = (f" (data.max_upscale = {cfg.max_upscale:g} shrank it from {full_w}x{full_h}, so it trains at a lower "
            f"resolution)" if shrunk else "")
    if scale > 1:
        severity: Severity = "warning" if scale >= NOTABLE_UPSCALE or shrunk else "info"
        findings.append(Finding(severity, "small", record.path, f"{width}x{height} is upscaled {scale:.2f}x to "
                                f"its {bucket_w}x{bucket_h} bucket{note}; use a larger original"))
    elif shrunk:
        findings.append(Finding("warning", "small", record.path, f"{width}x{height} is smaller than the training "
                                f"resolution: it gets the {bucket_w}x{bucket_h} bucket{note}"))
    aspect = max(width, height) / min(width, height)
    if aspect > MAX_ASPECT:
        kept = bucket_w * bucket_h / (width * height * scale * scale)
        findings.append(Finding("warning", "aspect", record.path, f"aspect ratio {aspect:.1f}:1 is beyond "
                                f"{MAX_ASPECT:g}:1; its {bucket_w}x{bucket_h} bucket crops away {1 - kept:.0%} of "
                                "it; crop or split the image"))
    return findings


# --- captions --------------------------------------------------------------------------------------------------


def _caption_findings(records: list[ImageRecord], tokenizer) -> list[Finding]:
    # The caption as trained, before any random dropout or shuffling: with the prefix.
    texts = [record_caption(r, random.Random(0), as_written=True) for r in records]
    findings = []
    ids = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids if texts else []
    for record, text, tokens in zip(records, texts, ids):
        cfg = record.options
        prefix = f" (only the prefix {cfg.caption_prefix!r})" if cfg.caption_prefix and not record.is_reg else ""
        sidecar = caption_file(record.path, cfg.caption_extensions)
        if not record.caption.strip():
            if sidecar is not None:
                findings.append(Finding("warning", "caption-empty", sidecar, f"caption file is empty; "
                                        f"{record.path.name} trains on an empty caption{prefix}"))
            else:
                names = "/".join(record.path.stem + ext for ext in cfg.caption_extensions)
                findings.append(Finding("warning", "caption-missing", record.path,
                                        f"no caption ({names} or a metadata.jsonl entry); it trains on an empty "
                                        f"caption{prefix}"))
        limit = cfg.max_token_length
        if len(tokens) > limit:
            cut = tokenizer.decode(tokens[limit:limit + 8])
            longer = " or raise data.max_token_length (150, 225)" if limit < 225 else ""
            findings.append(Finding("warning", "caption-long", sidecar or record.path,
                                    f"caption is {len(tokens)} CLIP tokens; training keeps the first {limit} and cuts "
                                    f"the rest, from {cut!r}; shorten it{longer}"))
    return findings


# --- regularization images -------------------------------------------------------------------------------------


def _as_reg(finding: Finding) -> Finding:
    """A finding of the scan of the regularization folders, saying so where it names no file."""
    return finding if finding.path is not None else replace(finding, message=f"regularization images: "
                                                                              f"{finding.message}")


def _reg_findings(train: list[ImageRecord], reg: list[ImageRecord], cfg: DataConfig) -> list[Finding]:
    n_train, n_reg = sum(r.repeats for r in train), sum(r.repeats for r in reg)
    if n_reg > n_train:
        count = Finding("warning", "reg-count", None, f"{n_reg} regularization images (with repeats) for {n_train} "
                        "training images (with repeats): each epoch uses as many as there are training images, so "
                        "some are never trained on; lower their folder's repeats or add training images")
    else:
        count = Finding("info", "reg-count", None, f"{n_reg} regularization images (with repeats) pair with "
                        f"{n_train} training images (with repeats): they are repeated to match, as kohya does")
    findings = [count]
    trigger = trigger_of(cfg)
    if trigger:
        findings += [Finding("warning", "reg-trigger", caption_file(r.path, r.options.caption_extensions) or r.path,
                             f"the caption has the trigger word {trigger!r}: this image would teach the trigger the "
                             "base model's look; remove the word from the caption")
                     for r in reg if has_trigger(r.caption, trigger)]
    trained = {r.bucket for r in train}
    for bucket, n in sorted(Counter(r.bucket for r in reg if r.bucket not in trained).items()):
        findings.append(Finding("warning", "reg-bucket", None, f"{n} regularization image(s) fall in the "
                                f"{bucket[0]}x{bucket[1]} bucket, which no training image uses: they never share a "
                                "batch with a training image; crop them to the training images' shapes"))
    return findings


# --- duplicates ------------------------------------------------------------------------------------------------


def _duplicate_findings(records: list[ImageRecord], facts: list[_Facts]) -> list[Finding]:
    """Each image that repeats an earlier one: same bytes, else near-identical pixels."""
    findings = []
    first_copy: dict[str, Path] = {}
    seen: list[tuple[Path, int, np.ndarray]] = []  # (path, pHash, thumbnail) of the distinct decodable images so far
    for record, fact in zip(records, facts):
        if fact.error or fact.thumb is None:  # _examine leaves the thumbnail out exactly when decoding failed
            continue
        if fact.sha256 in first_copy:
            findings.append(Finding("warning", "duplicate", record.path, f"exact copy of "
                                    f"{display_path(first_copy[fact.sha256])}; delete one (it trains twice as often)"))
            continue
        first_copy[fact.sha256] = record.path
        for other, other_phash, other_thumb in seen:
            distance = (fact.phash ^ other_phash).bit_count()
            if distance > NEAR_DUPLICATE_BITS:
                continue
            if np.abs(fact.thumb - other_thumb).mean() <= NEAR_DUPLICATE_COLOR:
                message = f"near-duplicate of {display_path(other)} (pHash distance {distance}); keep the better one"
                findings.append(Finding("warning", "near-duplicate", record.path, message))
                break
        seen.append((record.path, fact.phash, fact.thumb))
    return findings
