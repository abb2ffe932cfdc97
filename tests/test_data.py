"""Dataset tests: every file is built in tmp_path with PIL, so these run offline in a few seconds."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sdlora.config import DataConfig
from sdlora.data.dataset import (
    ImageRecord,
    assign_bucket,
    bucket_summary,
    epoch_batches,
    load_image,
    make_buckets,
    process_caption,
    sample_rng,
    scan_dataset,
    tag_frequency,
)
from sdlora.errors import DatasetError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _image(path: Path, size=(64, 48), color=RED, mode="RGB", **save_kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save_kwargs)
    return path


def _two_halves(size, left, right, mode="RGB") -> Image.Image:
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def _scan(folder: Path, **kwargs) -> list[ImageRecord]:
    return scan_dataset(DataConfig(dirs=[str(folder)], **kwargs))


def _record(path: Path, bucket, size=(64, 64), mask_path=None) -> ImageRecord:
    return ImageRecord(path, "", 1, size, bucket, mask_path, path.parent.name)


def _rgb_at(pixels: torch.Tensor, y: int, x: int) -> tuple[int, ...]:
    return tuple(round((float(v) + 1) * 127.5) for v in pixels[:, y, x])


# --- discovery -------------------------------------------------------------------------------------------------


def test_sidecar_txt_beats_caption_and_order_is_configurable(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("\n  from txt  \nsecond line\n", encoding="utf-8")
    (tmp_path / "a.caption").write_text("from caption", encoding="utf-8")
    _image(tmp_path / "b.PNG")
    (tmp_path / "b.caption").write_text("\ufeffonly caption", encoding="utf-8")  # BOM is dropped
    _image(tmp_path / "c.jpg")

    records = _scan(tmp_path)
    assert [(r.path.name, r.caption) for r in records] == [
        ("a.png", "from txt"), ("b.PNG", "only caption"), ("c.jpg", "")
    ]
    assert _scan(tmp_path, caption_extensions=[".caption", ".txt"])[0].caption == "from caption"


def test_metadata_jsonl_captions_and_sidecar_precedence(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _image(tmp_path / name)
    lines = [{"file_name": "a.png", "text": "meta a"}, {"file_name": "b.png", "caption": "meta b"},
             {"file_name": "c.png", "text": "meta c"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("sidecar c", encoding="utf-8")
    assert [r.caption for r in _scan(tmp_path)] == ["meta a", "meta b", "sidecar c"]


def test_bad_metadata_line_names_file_and_line(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"metadata\.jsonl:2"):
        _scan(tmp_path)


def test_kohya_repeat_folders(tmp_path):
    train = tmp_path / "train"
    _image(train / "10_mystyle" / "a.png")
    _image(train / "10_mystyle" / "b.png")
    (train / "10_mystyle" / "b.txt").write_text("own caption", encoding="utf-8")
    _image(train / "2_other" / "c.png")
    _image(tmp_path / "3_direct" / "d.png")
    _image(tmp_path / "plain" / "e.png")

    records = scan_dataset(DataConfig(dirs=["train", "3_direct", "plain"], repeats=4), base_dir=tmp_path)
    assert [(r.path.name, r.repeats, r.caption, r.dataset_dir) for r in records] == [
        ("a.png", 10, "mystyle", "10_mystyle"),
        ("b.png", 10, "own caption", "10_mystyle"),
        ("c.png", 2, "other", "2_other"),
        ("d.png", 3, "direct", "3_direct"),
        ("e.png", 4, "", "plain"),
    ]


def test_masks_and_dot_files_are_not_training_images(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "a_mask.png", mode="L", color=255)
    _image(tmp_path / "b.jpg")
    (tmp_path / "._b.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    records = _scan(tmp_path)
    assert [r.path.name for r in records] == ["a.png", "b.jpg"]
    assert records[0].mask_path == tmp_path / "a_mask.png"
    assert records[1].mask_path is None


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(DatasetError, match="nope.*not found"):
        _scan(tmp_path / "nope")


def test_empty_folder_names_it_and_the_extensions(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"empty.*\.png"):
        _scan(tmp_path / "empty")


def test_truncated_jpeg_raises_or_is_skipped(tmp_path, caplog):
    _image(tmp_path / "good.png")
    bad = tmp_path / "bad.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(bad, quality=95)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])

    with pytest.raises(DatasetError, match=r"bad\.jpg: cannot read image.*skip_bad_images"):
        _scan(tmp_path)
    with caplog.at_level(logging.WARNING):
        records = _scan(tmp_path, skip_bad_images=True)
    assert [r.path.name for r in records] == ["good.png"]
    assert "bad.jpg" in caplog.text


def test_latin1_caption_asks_for_utf8(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("café, crème".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"a\.txt.*UTF-8"):
        _scan(tmp_path)
    _image(tmp_path / "b.png")
    assert [r.path.name for r in _scan(tmp_path, skip_bad_images=True)] == ["b.png"]


def test_exif_rotated_jpeg_is_scanned_and_loaded_upright(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotates 90 degrees clockwise, so the left half ends up on top
    _two_halves((80, 40), RED, BLUE).save(path, exif=exif, quality=95)

    (record,) = _scan(tmp_path)
    assert record.size == (40, 80)
    assert record.bucket[0] < record.bucket[1]

    out = load_image(_record(path, (24, 48)), flip=False, rng=random.Random(0), random_crop=False)
    assert out["original_size"] == (80, 40)
    top, bottom = _rgb_at(out["pixels"], 3, 12), _rgb_at(out["pixels"], 44, 12)
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


# --- conversion to RGB -----------------------------------------------------------------------------------------


def _save_16bit_gray(path: Path) -> None:
    # Mid-gray: PIL's own convert would clip 32896 to 255 instead of scaling it to 128.
    Image.fromarray(np.full((16, 16), 128 * 257, dtype=np.uint16)).save(path)


@pytest.mark.parametrize(
    "name, make, expected",
    [
        ("rgba.png", lambda p: _image(p, size=(16, 16), mode="RGBA", color=(255, 0, 0, 0)), WHITE),
        ("la.png", lambda p: _image(p, size=(16, 16), mode="LA", color=(0, 0)), WHITE),
        ("opaque_rgba.png", lambda p: _image(p, size=(16, 16), mode="RGBA", color=(0, 0, 255, 255)), BLUE),
        ("cmyk.jpg", lambda p: _image(p, size=(16, 16), mode="CMYK", color=(0, 0, 0, 0), quality=100), WHITE),
        ("gray16.png", _save_16bit_gray, (128, 128, 128)),
        ("palette.png", lambda p: Image.new("RGB", (16, 16), RED).convert("P").save(p), RED),
        ("gray.bmp", lambda p: _image(p, size=(16, 16), mode="L", color=0), (0, 0, 0)),
    ],
)
def test_modes_load_as_rgb_in_range(tmp_path, name, make, expected):
    path = tmp_path / name
    make(path)
    out = load_image(_record(path, (16, 16), size=(16, 16)), flip=False, rng=random.Random(0), random_crop=False)
    pixels = out["pixels"]
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert all(abs(a - b) <= 3 for a, b in zip(_rgb_at(pixels, 8, 8), expected))


def test_transparent_palette_composites_on_white(tmp_path):
    path = tmp_path / "p.png"
    image = Image.new("P", (16, 16), 0)
    image.putpalette([255, 0, 0] * 256)
    image.save(path, transparency=0)
    out = load_image(_record(path, (16, 16), size=(16, 16)), flip=False, rng=random.Random(0), random_crop=False)
    assert _rgb_at(out["pixels"], 8, 8) == WHITE


# --- buckets ---------------------------------------------------------------------------------------------------


def test_make_buckets_kohya_512():
    buckets = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    assert (768, 320) in buckets and (320, 768) in buckets
    assert buckets == sorted(set(buckets))


@settings(max_examples=60, deadline=None)
@given(resolution=st.sampled_from([256, 512, 768, 1024]), step=st.sampled_from([8, 32, 64]))
def test_buckets_are_on_grid_within_limits_and_maximal(resolution, step):
    min_reso, max_reso = resolution // 2, resolution * 2
    buckets = make_buckets(resolution, min_reso, max_reso, step)
    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert min_reso <= w <= max_reso and min_reso <= h <= max_reso
        assert w * h <= resolution**2
        assert (h, w) in buckets
        # kohya's set: the tallest bucket for its width, or the mirror of one (the widest for its height).
        tallest = h == max_reso or w * (h + step) > resolution**2
        widest = w == max_reso or (w + step) * h > resolution**2
        assert tallest or widest


@pytest.mark.parametrize("size, shape", [((1200, 700), "landscape"), ((700, 1200), "portrait"), ((900, 900), "square")])
def test_assign_bucket_keeps_orientation(size, shape):
    w, h = assign_bucket(size, DataConfig())
    assert {"landscape": w > h, "portrait": w < h, "square": (w, h) == (512, 512)}[shape]


def test_tiny_image_gets_a_small_bucket():
    cfg = DataConfig(resolution=512, max_upscale=2.0)
    assert max(assign_bucket((64, 64), cfg)) <= 128
    w, h = assign_bucket((60, 120), cfg)
    assert w <= 120 and h <= 240 and w < h


def test_bucketing_off_gives_square_resolution():
    assert assign_bucket((1200, 300), DataConfig(enable_bucket=False, resolution=640)) == (640, 640)


@settings(max_examples=200, deadline=None)
@given(width=st.integers(16, 4000), height=st.integers(16, 4000), max_upscale=st.sampled_from([1.0, 1.5, 2.0, 4.0]))
def test_assigned_bucket_is_on_grid_and_covered_within_upscale_limit(width, height, max_upscale):
    cfg = DataConfig(max_upscale=max_upscale)
    bw, bh = assign_bucket((width, height), cfg)
    assert bw % cfg.bucket_step == 0 and bh % cfg.bucket_step == 0
    assert bw * bh <= cfg.resolution**2
    upscale = max(bw / width, bh / height)
    assert upscale <= max_upscale or min(bw, bh) == cfg.bucket_step  # the smallest bucket is the floor


def test_bucket_summary_counts_images_not_repeats():
    records = [
        ImageRecord(Path("a.png"), "", 5, (512, 512), (512, 512), None, "d"),
        ImageRecord(Path("b.png"), "", 1, (512, 512), (512, 512), None, "d"),
        ImageRecord(Path("c.png"), "", 1, (300, 900), (320, 768), None, "d"),
    ]
    assert bucket_summary(records) == {(320, 768): 1, (512, 512): 2}


# --- captions --------------------------------------------------------------------------------------------------


def test_process_caption_plain_and_prefix_added_once():
    rng = random.Random(0)
    assert process_caption("a cat,  sitting ", DataConfig(), rng) == "a cat, sitting"
    cfg = DataConfig(caption_prefix="zkstyle")
    assert process_caption("a cat, sitting", cfg, rng) == "zkstyle, a cat, sitting"
    assert process_caption("zkstyle, a cat", cfg, rng) == "zkstyle, a cat"
    assert process_caption("", cfg, rng) == "zkstyle"


def test_caption_dropout_one_gives_empty():
    cfg = DataConfig(caption_dropout=1.0, caption_prefix="zk")
    assert all(process_caption("a, b, c", cfg, random.Random(s)) == "" for s in range(20))


def test_tag_dropout_one_keeps_only_kept_tags():
    cfg = DataConfig(tag_dropout=1.0, keep_tokens=1, caption_prefix="zk")
    assert process_caption("a, b, c", cfg, random.Random(0)) == "zk"


def test_prefix_is_kept_even_with_keep_tokens_zero():
    cfg = DataConfig(caption_prefix="zk", shuffle_caption=True, tag_dropout=0.5)
    assert all(process_caption("a, b, c, d", cfg, random.Random(s)).startswith("zk") for s in range(50))


@settings(max_examples=150, deadline=None)
@given(
    tags=st.lists(st.text("abcdefgh xyz", min_size=1, max_size=6).map(str.strip).filter(bool), min_size=0, max_size=8),
    keep=st.integers(0, 4),
    tag_dropout=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 10_000),
)
def test_kept_tags_survive_shuffle_and_dropout(tags, keep, tag_dropout, seed):
    cfg = DataConfig(shuffle_caption=True, keep_tokens=keep, tag_dropout=tag_dropout)
    out = process_caption(", ".join(tags), cfg, random.Random(seed)).split(", ")
    out = [t for t in out if t]
    assert out[: min(keep, len(tags))] == tags[:keep]
    assert not Counter(out) - Counter(tags)  # nothing invented or duplicated
    if tag_dropout == 0:
        assert sorted(out) == sorted(tags)


def test_tag_frequency_counts_each_image_once():
    records = [
        ImageRecord(Path("a.png"), "Cat, dog, cat", 10, (64, 64), (64, 64), None, "10_pets"),
        ImageRecord(Path("b.png"), "cat", 10, (64, 64), (64, 64), None, "10_pets"),
        ImageRecord(Path("c.png"), "tree", 1, (64, 64), (64, 64), None, "plants"),
    ]
    assert tag_frequency(records) == {"10_pets": {"cat": 2, "dog": 1}, "plants": {"tree": 1}}


# --- epoch order -----------------------------------------------------------------------------------------------


def _records_for_batches() -> list[ImageRecord]:
    buckets = [(512, 512), (384, 640), (640, 384)]
    return [
        ImageRecord(Path(f"{i}.png"), "", 1 + i % 3, (512, 512), buckets[i % 3], None, "d") for i in range(11)
    ]


def test_epoch_batches_deterministic_single_bucket_and_complete():
    records = _records_for_batches()
    batches = epoch_batches(records, batch_size=3, seed=7, epoch=0)
    assert batches == epoch_batches(records, batch_size=3, seed=7, epoch=0)
    assert all(1 <= len(b) <= 3 for b in batches)
    assert all(len({records[i].bucket for i in b}) == 1 for b in batches)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == sorted(i for i, r in enumerate(records) for _ in range(r.repeats))
    assert batches != epoch_batches(records, batch_size=3, seed=7, epoch=1)
    assert batches != epoch_batches(records, batch_size=3, seed=8, epoch=0)


def test_epoch_batches_rejects_zero_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        epoch_batches(_records_for_batches(), batch_size=0, seed=0, epoch=0)


def test_sample_rng_depends_only_on_its_arguments():
    assert sample_rng(1, 2, 3).random() == sample_rng(1, 2, 3).random()
    assert sample_rng(1, 2, 3).random() != sample_rng(1, 2, 4).random()


# --- load_image ------------------------------------------------------------------------------------------------


def test_load_image_covers_bucket_center_crop(tmp_path):
    path = tmp_path / "wide.png"
    _two_halves((200, 100), RED, BLUE).save(path)
    out = load_image(_record(path, (64, 64), size=(200, 100)), flip=False, rng=random.Random(0), random_crop=False)
    assert out["pixels"].shape == (3, 64, 64)
    assert out["mask"] is None
    assert out["original_size"] == (100, 200) and out["target_size"] == (64, 64)
    assert out["crop_top_left"] == (0, 32)  # resized to 128x64, 64 spare columns split evenly


def test_random_crop_stays_inside(tmp_path):
    path = _image(tmp_path / "wide.png", size=(300, 100))
    for seed in range(10):
        out = load_image(_record(path, (64, 64), size=(300, 100)), False, random.Random(seed), random_crop=True)
        top, left = out["crop_top_left"]
        assert top == 0 and 0 <= left <= 192 - 64


def test_flip_mirrors_pixels_and_mask(tmp_path):
    path = tmp_path / "img.png"
    _two_halves((96, 64), RED, BLUE).save(path)
    mask_path = tmp_path / "img_mask.png"
    _two_halves((96, 64), 255, 0, mode="L").save(mask_path)
    record = _record(path, (64, 64), size=(96, 64), mask_path=mask_path)

    plain = load_image(record, flip=False, rng=random.Random(0), random_crop=False)
    flipped = load_image(record, flip=True, rng=random.Random(0), random_crop=False)
    assert plain["mask"].shape == (1, 64, 64)
    assert 0 <= float(plain["mask"].min()) and float(plain["mask"].max()) <= 1
    assert torch.equal(flipped["pixels"], plain["pixels"].flip(-1))
    assert torch.equal(flipped["mask"], plain["mask"].flip(-1))
    assert float(plain["mask"][0, 32, 2]) == 1.0 and float(flipped["mask"][0, 32, 2]) == 0.0
    assert _rgb_at(plain["pixels"], 32, 2) == RED and _rgb_at(flipped["pixels"], 32, 2) == BLUE
    assert plain["crop_top_left"] == (0, 16) and flipped["crop_top_left"] == (0, 16)


def test_mask_of_wrong_size_is_rejected(tmp_path):
    path = _image(tmp_path / "img.png", size=(64, 64))
    mask_path = _image(tmp_path / "img_mask.png", size=(32, 32), mode="L", color=255)
    with pytest.raises(DatasetError, match="img_mask.png.*resize the mask"):
        load_image(_record(path, (64, 64), mask_path=mask_path), False, random.Random(0), False)


def test_scan_then_load_every_record(tmp_path):
    for i, size in enumerate([(640, 480), (480, 640), (500, 500), (1000, 250)]):
        _image(tmp_path / f"{i}.png", size=size)
    for record in _scan(tmp_path, resolution=256, min_bucket_reso=128, max_bucket_reso=512):
        pixels = load_image(record, False, random.Random(0), False)["pixels"]
        assert pixels.shape[1:] == (record.bucket[1], record.bucket[0])
