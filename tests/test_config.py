from pathlib import Path

import pytest

from sdlora.config import Config, dump_toml, load_config
from sdlora.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    assert isinstance(load_config(path), Config)


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg.lora.rank == 16 and cfg.train.optimizer == "adamw"


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[train]\nlearnig_rate = 1e-4\n", "unknown key train.learnig_rate"),
        ("[trian]\n", "unknown key trian"),
        ("[train]\noptimizer = \"sgd\"\n", "train.optimizer: 'sgd' is not one of 'adamw', 'adamw8bit'"),
        ("[lora]\nrank = \"8\"\n", "lora.rank: expected int, got str"),
        ("[lora]\nrank = 0\n", "lora.rank: must be at least 1"),
        ("[data]\nresolution = 500\n", "data.resolution: must be a multiple of 8"),
        ("[data]\ndirs = \"imgs\"\n", "data.dirs: expected a list"),
        ("[data]\ncache_text_encoder_outputs = true\n", "needs lora.train_text_encoder = false"),
        ("[train]\nlearning_rate = true\n", "train.learning_rate: expected float, got bool"),
        ("[train\n", "not valid TOML"),
        ("[lora]\nmodule_dropout = 0.1\n", "peft's LoRA layers have neither"),
        ("[train]\nnew_tokens = [\"zkw\", \"zkw\"]\n", "train.new_tokens: a word is listed twice"),
    ],
)
def test_bad_config_names_key(tmp_path, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_every_problem_reported_at_once(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nfoo = 1\nbatch_size = 0\n[lora]\nbar = 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.foo" in str(err.value) and "lora.bar" in str(err.value)


def test_overrides_are_typed():
    cfg = load_config(None, ["train.learning_rate=3e-4", "lora.rank=4", "train.optimizer=adafactor",
                             'data.dirs=["a", "b"]', "train.output_dir=out/x"])
    assert cfg.train.learning_rate == 3e-4 and cfg.lora.rank == 4 and cfg.train.optimizer == "adafactor"
    assert cfg.data.dirs == ["a", "b"] and cfg.train.output_dir == "out/x"
    with pytest.raises(ConfigError, match="lora.rank: expected int"):
        load_config(None, ["lora.rank=high"])
    with pytest.raises(ConfigError, match="expected table.key=value"):
        load_config(None, ["rank=4"])


def test_int_accepted_for_float_and_dump_roundtrip(tmp_path):
    cfg = load_config(None, ["train.learning_rate=1", "train.unet_lr=2e-4", 'export.title="a \\"q\\" title"'])
    assert isinstance(cfg.train.learning_rate, float)
    path = tmp_path / "snap.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(path) == cfg
