"""`sdlora import-kohya`: kohya's training and dataset configs (shaped as sd-scripts' docs and the kohya_ss GUI write
them) translate to sdlora configs that load and train, and what does not map is listed."""

import json

import pytest
from safetensors import safe_open

from sdlora.cli import main
from sdlora.config import SubsetConfig, dump_toml, load_config
from sdlora.errors import ConfigError
from sdlora.train.recipe import train
from sdlora.ui.kohya_import import read_kohya_file, translate

# sd-scripts' --config_file: its arguments, grouped in tables of any name.
TRAINING_TOML = '''
[model_arguments]
pretrained_model_name_or_path = "tiny-sd15"
v2 = false

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 4
network_alpha = 2
network_train_unet_only = false

[optimizer_arguments]
optimizer_type = "AdamW"
learning_rate = 1e-3
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 2
lr_warmup_steps = 1

[training_arguments]
output_dir = "{out}"
output_name = "from_kohya"
save_precision = "fp16"
save_every_n_epochs = 0
max_train_steps = 3
train_batch_size = 2
mixed_precision = "no"
seed = 7
clip_skip = 2
max_token_length = 150
prior_loss_weight = 0.5
huber_schedule = "snr"
max_train_epochs = 10
xformers = true
'''

# sd-scripts' docs/config_README: [general], a DreamBooth dataset with two subsets and a reg subset.
DATASET_TOML = '''
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = 64
batch_size = 2
keep_tokens = 1
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128

  [[datasets.subsets]]
  image_dir = "{data}"
  num_repeats = 2

  [[datasets.subsets]]
  is_reg = true
  image_dir = "{reg}"
  num_repeats = 2
  class_tokens = "drawing"
'''

# What the kohya_ss GUI saves (numbers often as strings).
GUI_JSON = {
    "LoRA_type": "LyCORIS/LoHa", "pretrained_model_name_or_path": "tiny-sd15", "train_data_dir": "imgs",
    "reg_data_dir": "", "output_dir": "out", "output_name": "gui", "network_dim": 8, "network_alpha": 4,
    "optimizer": "AdamW8bit", "learning_rate": 0.0001, "max_resolution": "512,512", "train_batch_size": 1,
    "clip_skip": "1", "keep_tokens": "0", "cache_latents": True, "cache_latents_to_disk": True, "epoch": 20,
    "lr_scheduler": "constant", "mixed_precision": "bf16", "save_precision": "bf16", "flip_aug": False,
    "color_aug": True, "bucket_no_upscale": True, "max_train_steps": "", "stop_text_encoder_training": 0,
}


def test_training_and_dataset_configs_translate_and_train(dataset, tmp_path, capsys):
    reg = tmp_path / "reg"
    reg.mkdir()
    for src in sorted(dataset.glob("*.png"))[:2]:
        (reg / src.name).write_bytes(src.read_bytes())
        (reg / src.with_suffix(".txt").name).write_text("a plain picture", encoding="utf-8")
    training = tmp_path / "kohya.toml"
    training.write_text(TRAINING_TOML.format(out=(tmp_path / "run").as_posix()))
    data = tmp_path / "dataset.toml"
    data.write_text(DATASET_TOML.format(data=dataset.as_posix(), reg=reg.as_posix()))
    out = tmp_path / "sdlora.toml"
    assert main(["import-kohya", str(training), "--dataset-config", str(data), "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "network_dim = 4 -> lora.rank = 4" in report
    assert "max_train_epochs / epoch = 10: sdlora counts train.max_train_steps" in report
    assert "xformers = True: sdlora has no such setting" in report
    assert "class_tokens = 'drawing'" in report
    cfg = load_config(out)
    assert cfg.data.dirs == [dataset.as_posix()] and cfg.data.reg_dirs == [reg.as_posix()]
    assert (cfg.data.repeats, cfg.data.shuffle_caption, cfg.data.keep_tokens, cfg.data.resolution) == (2, True, 1, 64)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.method, cfg.lora.targets) == (4, 2.0, "lora", "attn_mlp")
    assert (cfg.train.lr_scheduler_num_cycles, cfg.train.prior_loss_weight, cfg.model.clip_skip) == (2, 0.5, 2)
    assert cfg.data.max_token_length == 150 and cfg.train.batch_size == 2 and cfg.export.dtype == "fp16"
    path = train(cfg)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_num_reg_images"] == "4" and meta["ss_seed"] == "7"


def test_the_kohya_ss_gui_json_translates():
    result = translate(GUI_JSON)
    cfg = result.config
    assert (cfg.lora.method, cfg.lora.rank, cfg.train.optimizer, cfg.data.cache_latents) == (
        "loha", 8, "adamw8bit", "disk")
    assert cfg.data.resolution == 512 and cfg.data.max_upscale == 1.0 and cfg.export.dtype == "bf16"
    assert cfg.model.clip_skip == 1 and cfg.data.dirs == ["imgs"] and cfg.data.reg_dirs == []
    assert any(line.startswith("color_aug = True: sdlora has no such setting") for line in result.unmapped)
    assert not any("stop_text_encoder_training" in line for line in result.unmapped)  # 0: nothing lost


def test_what_cannot_map_is_reported_or_refused():
    result = translate({"resolution": "512,768", "optimizer_type": "Lion", "network_module": "networks.oft"})
    assert any("not square" in line for line in result.unmapped)
    assert any("'Lion' has no sdlora counterpart" in line for line in result.unmapped)
    assert any("networks.oft" in line for line in result.unmapped)
    with pytest.raises(ConfigError, match="train.learning_rate"):
        translate({"learning_rate": -1})


def test_subsets_with_different_options_become_data_subsets():
    dataset = {"general": {"keep_tokens": 1},
               "datasets": [{"subsets": [{"image_dir": "a", "num_repeats": 1, "flip_aug": True},
                                         {"image_dir": "b", "num_repeats": 3, "flip_aug": False, "is_reg": True}]}]}
    result = translate({}, dataset)
    d = result.config.data
    assert (d.dirs, d.reg_dirs, d.keep_tokens) == ([], [], 1)
    assert d.subsets == [SubsetConfig(dir="a", repeats=1, flip_aug=True),
                         SubsetConfig(dir="b", is_reg=True, repeats=3, flip_aug=False)]
    assert not any("differs" in line for line in result.unmapped)
    assert "subset image_dir = 'b' (is_reg) -> data.subsets[1], flip_aug = False, repeats = 3" in result.mapped
    assert json.loads(json.dumps(result.mapped))  # plain strings


# sd-scripts' docs/config_README-en.md example, its folders and resolutions made small enough to train here.
DOCS_DATASET_TOML = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 64
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{hoge}'
  class_tokens = 'hoge girl'

  [[datasets.subsets]]
  image_dir = '{fuga}'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{reg}'
  class_tokens = 'human'
  keep_tokens = 1

[[datasets]]
resolution = [128, 128]
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{hoge}'
  metadata_file = 'piyo_md.json'
"""


def test_kohyas_documented_dataset_config_translates_and_trains(dataset, tmp_path):
    folders = {}
    for name, chosen in (("hoge", slice(0, 3)), ("fuga", slice(3, 6)), ("reg", slice(0, 2))):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        for src in sorted(dataset.glob("*.png"))[chosen]:
            (folders[name] / src.name).write_bytes(src.read_bytes())
            (folders[name] / src.with_suffix(".txt").name).write_text("a, plain, picture", encoding="utf-8")
    docs = tmp_path / "dataset.toml"
    docs.write_text(DOCS_DATASET_TOML.format(**{k: v.as_posix() for k, v in folders.items()}), encoding="utf-8")
    training = {"output_dir": (tmp_path / "run").as_posix(), "max_train_steps": 2, "network_dim": 4,
                "network_alpha": 4, "min_bucket_reso": 64, "max_bucket_reso": 128, "mixed_precision": "no"}
    result = translate(training, read_kohya_file(docs))
    d = result.config.data
    assert [(s.dir, s.is_reg, s.keep_tokens, s.resolution) for s in d.subsets] == [
        (folders["hoge"].as_posix(), False, 2, 64), (folders["fuga"].as_posix(), False, 3, 64),
        (folders["reg"].as_posix(), True, 1, 64), (folders["hoge"].as_posix(), False, 1, 128)]
    assert d.shuffle_caption and d.caption_extensions == [".txt"] and d.dirs == []
    assert any(line.startswith("batch_size: differs between datasets (2, 4)") for line in result.unmapped)
    assert not any(line.startswith(("keep_tokens", "resolution")) for line in result.unmapped)
    assert any(line.startswith("metadata_file = 'piyo_md.json': kohya's fine-tuning") for line in result.unmapped)
    out = tmp_path / "sdlora.toml"
    out.write_text(dump_toml(result.config), encoding="utf-8")
    path = train(load_config(out))
    with safe_open(str(path), "pt") as f:
        datasets = json.loads(f.metadata()["ss_datasets"])
    assert [(d["resolution"], len(d["subsets"]), d["num_reg_images"]) for d in datasets] == [
        ([64, 64], 3, 6), ([128, 128], 1, 0)]


def test_network_args_map_per_block_settings_and_lycoris_options():
    """sd-scripts' network_args strings become typed lora.* keys; what peft's LoRA lacks is reported, not lost."""
    dims = ",".join(["4"] * 12 + ["8"] + ["2"] * 12)
    translation = translate({"pretrained_model_name_or_path": "tiny-sd15", "network_module": "networks.lora",
                             "network_dim": 4, "network_args": [f"block_dims={dims}", "down_lr_weight=sine+0.5",
                                                                "mid_lr_weight=2", "block_lr_zero_threshold=0.1",
                                                                "rank_dropout=0.1", "conv_dim=4", "unknown_arg=1"]})
    lora = translation.config.lora
    assert lora.block_dims == [4] * 12 + [8] + [2] * 12 and lora.down_lr_weight == "sine+0.5"
    assert (lora.mid_lr_weight, lora.block_lr_zero_threshold, lora.targets) == ([2.0], 0.1, "all")
    assert lora.rank_dropout == 0.0 and any("rank_dropout" in u and "no rank or module dropout" in u
                                            for u in translation.unmapped)
    assert any(u.startswith("network_args unknown_arg=1") for u in translation.unmapped)
    loha = translate({"network_module": "lycoris.kohya", "network_dim": 4,
                      "network_args": ["algo=loha", "rank_dropout=0.2", "use_tucker=True"]}).config.lora
    assert (loha.method, loha.rank_dropout, loha.effective_conv) == ("loha", 0.2, True)
