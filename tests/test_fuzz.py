"""Property-based fuzzing of the parsers that read user input: captions, configs, LoRA files, prompt tags.

Each parser must either succeed or raise its own one-line error type, never crash with anything else.
Bounded (max_examples) so the whole file runs in well under 30 s.
"""

from __future__ import annotations

import json
import random
import struct
import tracemalloc
from collections import Counter
from datetime import date

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

from sdlora.adapters.files import read_lora_file
from sdlora.config import Config, DataConfig, load_config
from sdlora.data.dataset import process_caption
from sdlora.errors import ConfigError, LoraFileError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _tags(text: str) -> list[str]:
    return [tag.strip() for tag in text.split(",") if tag.strip()]


# --- captions --------------------------------------------------------------------------------------------------

_caption_parts = st.sampled_from(["zkstyle", "a cat", " ", "", ",", ", ,", "\t", "\n", "é", "🙂", "1girl", "\u3000"])
_captions = st.one_of(
    st.text(max_size=80),
    st.lists(st.one_of(_caption_parts, st.text(max_size=8)), max_size=12).map(", ".join),
)


@FUZZ
@given(
    caption=_captions,
    prefix=st.one_of(st.just(""), _captions),
    keep=st.integers(0, 6),
    caption_dropout=st.sampled_from([0.0, 0.3, 1.0]),
    tag_dropout=st.sampled_from([0.0, 0.5, 1.0]),
    shuffle=st.booleans(),
    seed=st.integers(),
)
def test_process_caption_never_raises_and_keeps_leading_tags(caption, prefix, keep, caption_dropout, tag_dropout,
                                                             shuffle, seed):
    cfg = DataConfig(caption_prefix=prefix, keep_tokens=keep, caption_dropout=caption_dropout,
                     tag_dropout=tag_dropout, shuffle_caption=shuffle)
    out = process_caption(caption, cfg, random.Random(seed))

    assert isinstance(out, str)
    tags, prefix_tags = _tags(caption), _tags(prefix)
    expected = tags if tags[: len(prefix_tags)] == prefix_tags else prefix_tags + tags
    got = _tags(out)
    if not got and caption_dropout:
        return  # the whole caption was dropped
    kept = max(keep, len(prefix_tags))
    assert got[:kept] == expected[:kept]  # prefix and keep_tokens tags: never dropped, never moved
    assert not Counter(got[kept:]) - Counter(expected[kept:])  # the rest: only tags of the caption
    if not tag_dropout:
        assert Counter(got) == Counter(expected)


# --- config ----------------------------------------------------------------------------------------------------

_TABLES = {name: [f for f in getattr(Config(), name).__dataclass_fields__] for name in Config.__dataclass_fields__}
_scalars = st.one_of(
    st.booleans(),
    st.integers(),  # unbounded: ints beyond float range must be refused, not overflow
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.dates(),
    st.sampled_from(["adamw", "fp16", "attn", "kohya", "cosine", "memory", "euler", "", "v_prediction"]),
)
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                       max_leaves=8)


def _toml(value) -> str:
    """An inline TOML value (JSON strings are TOML basic strings; lone surrogates make it invalid, which is fine)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(value), repr(value))
    if isinstance(value, (int, date)):
        return str(value) if isinstance(value, int) else value.isoformat()
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"


@st.composite
def _toml_documents(draw) -> str:
    lines = []
    for table in draw(st.lists(st.sampled_from([*_TABLES, "extra"]), max_size=4, unique=True)):
        lines.append(f"[{table}]")
        names = _TABLES.get(table, []) + ["typo_key"]
        for key in draw(st.lists(st.sampled_from(names), max_size=5, unique=True)):
            lines.append(f"{key} = {_toml(draw(_values))}")
    return "\n".join(lines)


@st.composite
def _overrides(draw) -> str:
    table = draw(st.sampled_from([*_TABLES, "nope", ""]))
    key = draw(st.sampled_from(_TABLES.get(table, []) + ["typo", "a.b"]))
    value = draw(st.one_of(_values.map(_toml), st.text(max_size=15)))
    return draw(st.sampled_from([f"{table}.{key}={value}", f"--{table}.{key}={value}", f"{table}.{key}", value]))


def _load_or_config_error(path, overrides) -> None:
    try:
        assert isinstance(load_config(path, overrides), Config)
    except ConfigError as e:
        assert str(e)


@FUZZ
@given(text=st.one_of(st.text(max_size=300), _toml_documents()), overrides=st.lists(_overrides(), max_size=4))
def test_load_config_raises_only_config_error(tmp_path_factory, text, overrides):
    path = tmp_path_factory.getbasetemp() / "fuzz_config.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _load_or_config_error(path, overrides)


@FUZZ
@given(overrides=st.lists(st.one_of(_overrides(), st.text(max_size=30)), max_size=6))
def test_config_overrides_raise_only_config_error(overrides):
    _load_or_config_error(None, overrides)


# Inputs the strategies above rarely reach: each once made load_config raise something other than ConfigError.
@pytest.mark.parametrize("text, overrides", [
    ("", ["data.resolution=" + "[" * 2000 + "]" * 2000]),  # RecursionError in tomllib
    ("[data]\nresolution = " + "[" * 2000 + "]" * 2000, []),  # RecursionError in tomllib
    ("", ["train.learning_rate=" + "9" * 400]),  # OverflowError: float(int) in config._build
    ("[train]\nseed = " + "9" * 5000, []),  # ValueError: int over 4300 digits in tomllib
], ids=["override-nesting", "file-nesting", "override-huge-int-for-float", "file-5000-digit-int"])
def test_pathological_configs_give_config_error(tmp_path, text, overrides):
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="resolution|learning_rate|not valid TOML"):
        load_config(path, overrides)


# --- LoRA files ------------------------------------------------------------------------------------------------


def _valid_lora() -> bytes:
    tensors = {
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.ones(2, 8),
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.ones(8, 2, dtype=torch.float16),
        "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(2.0),
    }
    return save_safetensors(tensors, metadata={"ss_network_dim": "2", "ss_network_alpha": "2.0"})


VALID = _valid_lora()
_HEADER_LENGTH = int.from_bytes(VALID[:8], "little")
_HEADER = json.loads(VALID[8 : 8 + _HEADER_LENGTH])
_PAYLOAD = VALID[8 + _HEADER_LENGTH :]
_ABSURD_LENGTHS = [0, 1, 2, _HEADER_LENGTH - 1, _HEADER_LENGTH + 1, len(VALID) - 8, len(VALID) - 7, 2**31, 2**32,
                   100 * 1024 * 1024, 2**60, 2**63, 2**64 - 1]


@st.composite
def _mutated_files(draw) -> bytes:
    data = bytearray(VALID)
    kind = draw(st.sampled_from(["flip", "length", "truncate", "header", "random"]))
    if kind == "flip":
        for position, byte in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)),
                                            min_size=1, max_size=8)):
            data[position] = byte
    elif kind == "length":
        data[:8] = struct.pack("<Q", draw(st.sampled_from(_ABSURD_LENGTHS)))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "header":
        header = json.loads(json.dumps(_HEADER))
        name = draw(st.sampled_from([k for k in header if k != "__metadata__"]))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "entry"]))
        big = st.sampled_from([0, 1, 7, 2**31, 2**32 + 1, 2**62, 2**63, 2**64, 2**70, -1, True, 1.5, "3", None])
        if field == "dtype":
            header[name]["dtype"] = draw(st.sampled_from(["F64", "BF16", "I8", "BOOL", "F8_E4M3", "X", "", 3]))
        elif field == "shape":
            header[name]["shape"] = draw(st.lists(big, max_size=4))
        elif field == "data_offsets":
            header[name]["data_offsets"] = draw(st.lists(big, max_size=3))
        elif field == "__metadata__":
            header["__metadata__"] = draw(st.sampled_from([{"a": 1}, [], "x", None, {"k": "v" * 100}]))
        else:
            header[name] = draw(st.sampled_from([None, [], "x", {}, {"dtype": "F32"}]))
        raw = json.dumps(header).encode()
        data = bytearray(struct.pack("<Q", len(raw)) + raw + _PAYLOAD)
    else:
        data = bytearray(draw(st.binary(max_size=256)))
    return bytes(data)


def _read_or_lora_file_error(path) -> None:
    tracemalloc.start()
    try:
        tensors, metadata = read_lora_file(path)
        assert all(isinstance(t, torch.Tensor) for t in tensors.values())
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    except LoraFileError as e:
        assert str(e)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"read_lora_file allocated {peak} bytes for a {path.stat().st_size}-byte file"


@FUZZ
@given(data=_mutated_files(), suffix=st.sampled_from([".safetensors", ".SAFETENSORS", ".bin", ""]))
def test_read_lora_file_raises_only_lora_file_error(tmp_path_factory, data, suffix):
    path = tmp_path_factory.getbasetemp() / f"fuzz_lora{suffix}"
    path.write_bytes(data)
    _read_or_lora_file_error(path)


def test_read_lora_file_reads_the_unmutated_file(tmp_path):
    path = tmp_path / "valid.safetensors"
    path.write_bytes(VALID)
    tensors, metadata = read_lora_file(path)
    assert set(tensors) == {k for k in _HEADER if k != "__metadata__"} and metadata["ss_network_dim"] == "2"


# --- prompt tags -----------------------------------------------------------------------------------------------


def _parse_lora_tags():
    prompt = pytest.importorskip("sdlora.generate.prompt")
    if not hasattr(prompt, "parse_lora_tags"):
        pytest.skip("sdlora.generate.prompt has no parse_lora_tags yet")
    return prompt


_prompt_parts = st.sampled_from(["<lora:", "<lyco:", "<LORA :", ">", "<", ":", "=", "te=", "unet=", "dyn=", "nan",
                                 "inf", "-1e309", "0.5", "1", " ", "\t", "name", "a cat", ",", "::", "\n", "é"])


def test_parse_lora_tags_never_raises():
    prompt = _parse_lora_tags()

    @FUZZ
    @given(text=st.one_of(st.text(max_size=60), st.lists(st.one_of(_prompt_parts, st.text(max_size=3)),
                                                          max_size=16).map("".join)))
    def check(text):
        clean, tags, warnings = prompt.parse_lora_tags(text)
        assert isinstance(clean, str) and all(isinstance(w, str) for w in warnings)
        for tag in tags:
            assert tag.name and tag.name == tag.name.strip()
            assert all(abs(w) < float("inf") for w in (tag.unet_weight, tag.te_weight))

    check()


def test_parse_lora_tags_reads_back_to_tag():
    prompt = _parse_lora_tags()
    weights = st.floats(-10, 10, allow_nan=False).map(lambda w: float(f"{w:g}"))
    names = st.text(alphabet="abcXYZ019_-.", min_size=1, max_size=12)

    @FUZZ
    @given(tags=st.lists(st.builds(prompt.LoraTag, names, weights, weights), max_size=4),
           words=st.lists(st.sampled_from(["a cat", "zkstyle,", "masterpiece"]), max_size=4))
    def check(tags, words):
        text = " ".join(words + [tag.to_tag() for tag in tags])
        clean, parsed, warnings = prompt.parse_lora_tags(text)
        assert parsed == tags and not warnings
        assert "<lora" not in clean

    check()
