"""Dataset doctor tests: one folder of every known problem, built in a temporary folder with PIL."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora.config import DataConfig
from sdlora.data.doctor import Report, diagnose, format_report

REPO = Path(__file__).resolve().parents[1]
# One 64x64 bucket only, so that small test images are not all reported as upscaled.
SMALL = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=256, bucket_step=64)


@pytest.fixture(scope="session")
def tokenizer():
    from sdlora.models.clip_tokenizer import load_clip_tokenizer

    return load_clip_tokenizer()


def _texture(seed: int, size=(64, 64)) -> Image.Image:
    """A smooth random picture: distinct seeds give images that look nothing alike."""
    coarse = np.random.default_rng(seed).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def _save(image: Image.Image, path: Path, caption: str | None = "a picture", **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _make_messy_dataset(folder: Path) -> None:
    _save(_texture(1), folder / "good.png")

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
        buffer, format="JPEG", quality=95)
    (folder / "corrupt.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "corrupt.txt").write_text("a picture", encoding="utf-8")

    _save(_texture(3).convert("CMYK"), folder / "cmyk.jpg", quality=95)
    gradient = (np.add.outer(np.arange(64), np.arange(64)) * 500).astype(np.uint16)
    _save(Image.fromarray(gradient), folder / "deep.png")  # 16-bit gray: mode I;16
    rgba = _texture(4).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))))
    _save(rgba, folder / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown rotated 90 degrees clockwise
    _save(_texture(5, (96, 64)), folder / "rotated.jpg", exif=exif, quality=95)
    _save(Image.new("RGB", (1, 1), (200, 30, 30)), folder / "tiny.png")
    _save(_texture(6), folder / "empty.png", caption="  \n")
    _save(_texture(7), folder / "latin1.png", caption=None)
    (folder / "latin1.txt").write_bytes("café, crème brûlée".encode("latin-1"))
    _save(_texture(8), folder / "dup_a.png")
    shutil.copy(folder / "dup_a.png", folder / "dup_b.png")
    shutil.copy(folder / "dup_a.txt", folder / "dup_b.txt")
    _save(_texture(9, (128, 128)), folder / "photo.png")
    _save(_texture(9, (128, 128)), folder / "photo_again.jpg", quality=40)  # re-compressed copy
    _texture(10).save(folder / "anim.gif")
    _save(_texture(11), folder / "long.png", caption="a very detailed painting of a lighthouse, " * 12)
    _save(_texture(12), folder / "missing.png", caption=None)
    _save(_texture(13, (1000, 200)), folder / "wide.png")
    _save(_texture(14), folder / "masked.png")
    Image.new("L", (32, 32), 255).save(folder / "masked_mask.png")


# (file the finding names, check, severity, text the message must contain)
EXPECTED = [
    ("corrupt.jpg", "unreadable", "error", "cannot read image"),
    ("latin1.txt", "caption-encoding", "error", "iconv -f latin1 -t utf8"),
    ("masked_mask.png", "mask", "error", "32x32"),
    ("anim.gif", "unsupported", "warning", "GIF"),
    ("tiny.png", "small", "warning", "upscaled 64.00x"),
    ("wide.png", "aspect", "warning", "5.0:1"),
    ("empty.txt", "caption-empty", "warning", "empty"),
    ("missing.png", "caption-missing", "warning", "missing.txt"),
    ("long.txt", "caption-long", "warning", "first 75"),
    ("dup_b.png", "duplicate", "warning", "dup_a.png"),
    ("photo_again.jpg", "near-duplicate", "warning", "photo.png"),
    ("cmyk.jpg", "converted", "info", "CMYK to RGB"),
    ("deep.png", "converted", "info", "16-bit to 8-bit"),
    ("rgba.png", "converted", "info", "converted: alpha composited on white"),
    ("rotated.jpg", "exif-rotated", "info", "orientation 6"),
]


@pytest.fixture(scope="module")
def messy(tmp_path_factory, tokenizer) -> tuple[Path, Report]:
    folder = tmp_path_factory.mktemp("messy")
    _make_messy_dataset(folder)
    return folder, diagnose(DataConfig(dirs=[str(folder)], **SMALL), tokenizer)


@pytest.mark.parametrize("name, check, severity, text", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_each_problem_is_reported_with_severity_and_file(messy, name, check, severity, text):
    folder, report = messy
    (finding,) = [f for f in report.findings if f.path == folder / name and f.check == check]
    assert finding.severity == severity
    assert text in finding.message


def test_nothing_else_is_reported(messy):
    folder, report = messy
    problems = {(f.path.name, f.check) for f in report.findings if f.severity != "info"}
    assert problems == {(name, check) for name, check, severity, _ in EXPECTED if severity != "info"}
    assert not [f for f in report.findings if f.path == folder / "good.png"]
    assert not report.ok
    assert report.images == 15  # corrupt.jpg and latin1.png are not usable


def test_skip_bad_images_makes_bad_files_warnings(tmp_path, tokenizer):
    _save(_texture(1), tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _save(_texture(2), tmp_path / "latin1.png", caption=None)
    (tmp_path / "latin1.txt").write_bytes("naïve".encode("latin-1"))

    strict = diagnose(DataConfig(dirs=[str(tmp_path)], **SMALL), tokenizer)
    lenient = diagnose(DataConfig(dirs=[str(tmp_path)], skip_bad_images=True, **SMALL), tokenizer)
    assert {(f.path.name, f.severity) for f in strict.findings} == {("bad.png", "error"), ("latin1.txt", "error")}
    assert {(f.path.name, f.severity) for f in lenient.findings} == {("bad.png", "warning"), ("latin1.txt", "warning")}
    assert not strict.ok and lenient.ok
    assert lenient.images == 1


def test_clean_dataset_is_ok_and_previews_buckets(tmp_path, tokenizer):
    for i, size in enumerate([(512, 512), (512, 512), (768, 512)]):
        _save(_texture(i, size), tmp_path / f"{i}.png")
    report = diagnose(DataConfig(dirs=[str(tmp_path)], repeats=3), tokenizer)
    assert report.ok and report.findings == []
    assert report.buckets == {(512, 512): 2, (640, 384): 1}
    assert (report.images, report.images_with_repeats) == (3, 9)


def test_flat_colour_fields_are_not_near_duplicates(tmp_path, tokenizer):
    for name, color in [("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255)), ("gray.png", (128, 128, 128))]:
        _save(Image.new("RGB", (64, 64), color), tmp_path / name)
    _save(Image.new("RGB", (64, 64), (0, 0, 250)), tmp_path / "blue_again.png")
    report = diagnose(DataConfig(dirs=[str(tmp_path)], **SMALL), tokenizer)
    # pHash alone calls all flat fields alike; the colour check keeps only the two blues together.
    assert [(f.path.name, f.check) for f in report.findings] == [("blue_again.png", "near-duplicate")]


def test_missing_folder_is_an_error_and_other_folders_are_still_checked(tmp_path, tokenizer):
    _save(_texture(1), tmp_path / "ok" / "a.png")
    _save(_texture(1), tmp_path / "ok" / "b.png")
    report = diagnose(DataConfig(dirs=["nope", "ok"], **SMALL), tokenizer, base_dir=tmp_path)
    assert [(f.check, f.severity) for f in report.findings] == [("dataset", "error"), ("duplicate", "warning")]
    assert "nope" in report.findings[0].message and not report.ok


def test_repeat_folders_ignored_images_and_empty_folders(tmp_path, tokenizer):
    _save(_texture(1), tmp_path / "train" / "2_style" / "a.png")
    _save(_texture(2), tmp_path / "train" / "stray.png")  # beside repeat folders: never read
    (tmp_path / "gifs").mkdir()
    _texture(3).save(tmp_path / "gifs" / "b.gif")  # a folder with nothing training reads
    report = diagnose(DataConfig(dirs=["train", "gifs"], **SMALL), tokenizer, base_dir=tmp_path)
    assert sorted((f.path.name, f.check, f.severity) for f in report.findings) == [
        ("b.gif", "unsupported", "warning"), ("gifs", "empty-folder", "warning"), ("stray.png", "ignored", "warning")
    ]
    assert report.ok and report.images_with_repeats == 2


def test_caption_prefix_counts_towards_the_token_limit(tmp_path, tokenizer):
    _save(_texture(1), tmp_path / "a.png", caption="word, " * 70)  # 70 words + 70 commas = 140 tokens
    _save(_texture(2), tmp_path / "b.png", caption="word " * 74)
    assert [f.path.name for f in diagnose(DataConfig(dirs=[str(tmp_path)], **SMALL), tokenizer).findings] == ["a.txt"]
    prefixed = diagnose(DataConfig(dirs=[str(tmp_path)], caption_prefix="zkstyle", **SMALL), tokenizer)
    assert sorted(f.path.name for f in prefixed.findings) == ["a.txt", "b.txt"]
    longer = diagnose(DataConfig(dirs=[str(tmp_path)], max_token_length=150, **SMALL), tokenizer)  # 2 chunks read
    assert longer.findings == []
    assert "or raise data.max_token_length" in str(prefixed.findings[0])


def test_format_report_is_one_line_per_finding(messy):
    _, report = messy
    lines = format_report(report).splitlines()
    assert len(lines) == len(report.findings) + 3  # header, buckets, summary
    assert lines[1].startswith("error [")
    assert lines[-1].startswith("summary: 3 errors (") and lines[-1].endswith("training would stop: fix the errors")


def _doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdlora.cli", "doctor", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_cli_exit_codes_and_output(messy, tmp_path):
    folder, report = messy
    config = tmp_path / "small.toml"
    config.write_text("[data]\n" + "".join(f"{key} = {value}\n" for key, value in SMALL.items()), encoding="utf-8")
    result = _doctor(str(folder), "--config", str(config))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(report.findings) + 3  # one line per finding, plus header, buckets and summary
    for name, check, severity, _ in EXPECTED:
        assert any(line.startswith(f"{severity} [{check}] ") and name in line for line in lines)

    _save(_texture(1, (512, 512)), tmp_path / "clean" / "a.png")
    config = tmp_path / "doctor.toml"
    config.write_text(f'[data]\ndirs = ["{(tmp_path / "clean").as_posix()}"]\n', encoding="utf-8")
    clean = _doctor("--config", str(config))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "ready to train" in clean.stdout


@pytest.mark.parametrize("args, message", [
    ((), "give one or more dataset folders"),
    (("sample_images", "--resolution", "100"), "data.resolution"),
    (("sample_images", "--config", "no_such.toml"), "no_such.toml"),
    (("sample_images", "--resolution", "big"), "invalid int value"),
])
def test_cli_usage_errors_exit_2(args, message):
    result = _doctor(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
