"""[[data.subsets]]: folders with their own caption, flip, repeat and resolution options, and multi-resolution
training (each image at every listed resolution); they load typed, apply to their own images only, cache apart,
train, export kohya's ss_datasets and resume exactly."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from test_train import adapter, assert_same, make_cfg

from sdlora.config import DataConfig, SubsetConfig, dump_toml, load_config
from sdlora.data.cache import build_latent_cache
from sdlora.data.dataset import epoch_batches, record_caption, sample_rng, scan, scan_dataset
from sdlora.data.doctor import diagnose
from sdlora.data.loader import load_batch
from sdlora.errors import ConfigError
from sdlora.models.clip_tokenizer import load_clip_tokenizer
from sdlora.models.loading import load_base_model
from sdlora.train.recipe import train

SMALL = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128}


@pytest.fixture(scope="module")
def two_folders(dataset, tmp_path_factory):
    """Two folders of three captioned images each, copied from the shared dataset."""
    root = tmp_path_factory.mktemp("subsets")
    images = sorted(dataset.glob("*.png"))
    for name, chosen in (("a", images[:3]), ("b", images[3:])):
        (root / name).mkdir()
        for src in chosen:
            shutil.copy(src, root / name / src.name)
            (root / name / src.with_suffix(".txt").name).write_text("red, circle, hatched", encoding="utf-8")
    return root


def _toml(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_subsets_load_typed_without_the_default_folder_and_round_trip(tmp_path):
    cfg = load_config(_toml(tmp_path, '[data]\nresolution = [512, 768]\n[[data.subsets]]\ndir = "a"\nrepeats = 3\n'
                                      'flip_aug = true\n[[data.subsets]]\ndir = "reg"\nis_reg = true\n'
                                      'resolution = 1024\n'))
    assert cfg.data.dirs == []  # subsets and no dirs: the default folder does not join
    assert cfg.data.subsets == [SubsetConfig(dir="a", repeats=3, flip_aug=True),
                                SubsetConfig(dir="reg", is_reg=True, resolution=1024)]
    assert cfg.data.resolutions() == [512, 768, 1024]
    assert load_config(_toml(tmp_path, dump_toml(cfg))) == cfg


@pytest.mark.parametrize("text, message", [
    ('[[data.subsets]]\ndir = "a"\nkeep_tokens = -1\n', r"data.subsets\[0\].keep_tokens: must be >= 0"),
    ('[[data.subsets]]\ndir = "a"\n[[data.subsets]]\ndir = "b"\nflip = true\n',
     r"unknown key data.subsets\[1\].flip \(allowed: dir, "),
    ('[[data.subsets]]\nrepeats = 2\n', r"data.subsets\[0\].dir: give the subset's image folder"),
    ('[[data.subsets]]\ndir = "a"\nresolution = [512, 500]\n', r"data.subsets\[0\].resolution: must be a multiple"),
    ('[[data.subsets]]\ndir = "a"\ncaption_dropout = 2\n', r"data.subsets\[0\].caption_dropout/tag_dropout"),
    ('[[data.subsets]]\ndir = "a"\nis_reg = true\ncaption_prefix = "sks"\n',
     r"data.subsets\[0\].caption_prefix: regularization images get no prefix"),
    ('[[data.subsets]]\ndir = "a"\nrandom_crop = true\n',
     r"data.subsets\[0\].random_crop: cannot be combined with data.cache_latents"),
    ('[[data.subsets]]\ndir = "a"\ncaption_extensions = ["txt"]\n', r"caption_extensions: each must start with a dot"),
    ('[[data.subsets]]\ndir = "a"\nrepeats = "3"\n', r"data.subsets\[0\].repeats: expected int, got str"),
    ('[data]\nsubsets = "a"\n', r"data.subsets: expected \[\[data.subsets\]\] tables"),
    ('[data]\nresolution = []\n', r"data.resolution: give one side length or a list"),
])
def test_bad_subset_keys_give_one_line_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(_toml(tmp_path, text))
    assert "\n" not in str(e.value)


def _cfg(*overrides, subsets=(), **data):
    """A config of data.* values (JSON is TOML for these) and [[data.subsets]] tables, as overrides give them."""
    tables = ", ".join("{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in t.items()) + "}" for t in subsets)
    return load_config(None, [f"data.{k}={json.dumps(v)}" for k, v in {**SMALL, **data}.items()]
                       + [f"data.subsets=[{tables}]", *overrides])


class _Spy(dict):
    """A latent cache that records which (record, flipped) entries a batch reads."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = []

    def __getitem__(self, key):
        self.read.append(key)
        return super().__getitem__(key)


def test_each_subsets_options_apply_to_its_images_only(two_folders):
    cfg = _cfg(dirs=[], subsets=[
        {"dir": str(two_folders / "a"), "caption_prefix": "zk", "caption_suffix": "sfx", "keep_tokens": 2,
         "repeats": 3, "flip_aug": True, "shuffle_caption": True},
        {"dir": str(two_folders / "b"), "caption_dropout": 1.0},
    ])
    records = scan_dataset(cfg.data)
    a, b = records[:3], records[3:]
    assert [r.repeats for r in records] == [3, 3, 3, 1, 1, 1]
    assert [r.subset for r in records] == ["data.subsets[0]"] * 3 + ["data.subsets[1]"] * 3
    for position in range(20):
        caption = record_caption(a[0], sample_rng(1, 0, position))
        assert caption.startswith("zk, red, ") and set(caption.split(", ")) == {"zk", "red", "circle", "hatched",
                                                                                 "sfx"}
        assert record_caption(b[0], sample_rng(1, 0, position)) == ""  # its own dropout; a's prefix never
    assert record_caption(b[0], sample_rng(1, 0, 0), as_written=True) == "red, circle, hatched"
    entry = {"latents": torch.zeros(4, 8, 8), "mask": None, "original_size": (64, 64), "crop_top_left": (0, 0),
             "target_size": (64, 64)}
    cache = _Spy({(i, flip): entry for i in range(len(records)) for flip in (False, True)})
    for position in range(8):
        load_batch(records, [0, 3], cfg, 0, position, cache, [load_clip_tokenizer()])
    assert {flip for i, flip in cache.read if i == 3} == {False}  # b has no flip_aug
    assert {flip for i, flip in cache.read if i == 0} == {False, True}


def test_a_reg_subset_is_weighted_and_captioned_as_reg_images(two_folders):
    cfg = _cfg("train.prior_loss_weight=0.25", dirs=[str(two_folders / "a")], caption_prefix="zk",
               subsets=[{"dir": str(two_folders / "b"), "is_reg": True, "repeats": 2}])
    report = diagnose(cfg.data, load_clip_tokenizer())
    assert len(report.records) == 3 and len(report.reg_records) == 3
    assert all(r.is_reg and r.repeats == 2 for r in report.reg_records)
    assert not scan(cfg.data, reg=True).findings
    records = report.records + report.reg_records
    batch = load_batch(records, [0, 3], cfg, 0, 0, None, [load_clip_tokenizer()])
    assert batch["captions"][0].startswith("zk, ") and not batch["captions"][1].startswith("zk")
    assert batch["loss_weights"].tolist() == [1.0, 0.25]


def test_two_resolutions_give_records_in_both_bucket_sets_and_separate_cache_entries(two_folders, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(two_folders / "a", folder)
    cfg = _cfg(dirs=[str(folder)], resolution=[64, 128], cache_latents="disk")
    records = scan_dataset(cfg.data)
    assert [r.options.resolution for r in records] == [64, 128] * 3
    assert {r.bucket for r in records[::2]} == {(64, 64)} and {r.bucket for r in records[1::2]} == {(128, 128)}
    for batch in epoch_batches(records, 2, seed=1, epoch=0):
        assert len({records[i].bucket for i in batch}) == 1  # one batch, one bucket
    vae = load_base_model("tiny-sd15").vae
    memory = build_latent_cache(records, vae, "memory")
    disk = build_latent_cache(records, vae, "disk")
    assert [memory[(i, False)]["latents"].shape[-1] for i in range(2)] == [8, 16]
    assert len(list(folder.glob(".sdlora_cache/*.safetensors"))) == 6  # an entry per image and resolution
    for key, entry in memory.items():
        assert torch.equal(entry["latents"], disk[key]["latents"])
    assert diagnose(cfg.data, load_clip_tokenizer()).resolution == [64, 128]


def test_two_subsets_at_two_resolutions_train_export_and_resume_exactly(two_folders, tmp_path):
    subsets = (f'data.subsets=[{{dir = "{(two_folders / "a").as_posix()}", resolution = [64, 128], '
               f'caption_prefix = "zk", flip_aug = true}}, {{dir = "{(two_folders / "b").as_posix()}", '
               f'repeats = 2, shuffle_caption = true, keep_tokens = 1}}]')

    def cfg(out, *more):
        return make_cfg(two_folders, out, "data.dirs=[]", subsets, "train.max_train_steps=4", *more)

    straight = train(cfg(tmp_path / "a", "train.checkpoint_every_n_steps=2", "train.save_last_k=0"))
    with safe_open(str(straight), "pt") as f:
        meta = f.metadata()
    datasets = json.loads(meta["ss_datasets"])
    assert [d["resolution"] for d in datasets] == [[64, 64], [128, 128]]
    assert [(s["image_dir"], s["num_repeats"], s["flip_aug"], s["caption_prefix"]) for s in datasets[0]["subsets"]] \
        == [("a", 1, True, "zk"), ("b", 2, False, "")]
    assert datasets[1]["num_train_images"] == 3 and meta["ss_resolution"] == "(128, 128)"
    # "a" trains at two resolutions: its three images still count once each
    assert json.loads(meta["ss_dataset_dirs"]) == {"a": {"n_repeats": 1, "img_count": 3},
                                                   "b": {"n_repeats": 2, "img_count": 3}}
    resumed = train(cfg(tmp_path / "b"), resume=str(tmp_path / "a" / "checkpoint-2"))
    assert_same(adapter(straight), adapter(resumed))


def test_data_dirs_keep_the_global_options_beside_subsets(two_folders):
    d = DataConfig(dirs=[str(two_folders / "a")], caption_prefix="zk",
                   subsets=[SubsetConfig(dir=str(two_folders / "b"), caption_prefix="other")], **SMALL)
    records = scan_dataset(d)
    assert [record_caption(r, sample_rng(0, 0, 0)).split(", ")[0] for r in records] == ["zk"] * 3 + ["other"] * 3
