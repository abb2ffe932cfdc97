"""Prompt syntax: A1111 `<lora:...>` tags and long prompts encoded in 75-token chunks."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdlora.generate.prompt import LoraTag, encode_prompt_embeds, parse_lora_tags, token_chunks

# (prompt, clean prompt, tags as (name, unet, te), number of warnings)
TAG_CASES = [
    ("a cat", "a cat", [], 0),
    ("a cat <lora:zk:0.8>", "a cat", [("zk", 0.8, 0.8)], 0),
    ("<lora:zk> a cat", "a cat", [("zk", 1.0, 1.0)], 0),
    ("a <lora: zk : 0.5 > cat", "a cat", [("zk", 0.5, 0.5)], 0),
    ("<lora:zk:0.3:0.7>", "", [("zk", 0.7, 0.3)], 0),  # A1111 order: te weight, then unet weight
    ("<lora:zk:1:unet=0.2>", "", [("zk", 0.2, 1.0)], 0),
    ("<lora:zk:te=0:unet=-1.5>", "", [("zk", -1.5, 0.0)], 0),
    ("<LORA:Zk:2>", "", [("Zk", 2.0, 2.0)], 0),
    ("<lora:my lora v2:-0.25>, red", ", red", [("my lora v2", -0.25, -0.25)], 0),
    ("<lora:a:1> <lora:b:0.5> x", "x", [("a", 1.0, 1.0), ("b", 0.5, 0.5)], 0),
    ("<lora:sub/style:1e-1>", "", [("sub/style", 0.1, 0.1)], 0),
    ("<lora:zk:1:1:8>", "", [("zk", 1.0, 1.0)], 1),  # dyn: ignored, with a warning
    ("a <lora::1> b", "a <lora::1> b", [], 1),
    ("a <lora:zk:heavy> b", "a <lora:zk:heavy> b", [], 1),
    ("<lora:zk:nan>", "<lora:zk:nan>", [], 1),
    ("<lora:zk:inf>", "<lora:zk:inf>", [], 1),
    ("<lora:zk:1:2:3:4:5>", "<lora:zk:1:2:3:4:5>", [], 1),
    ("<lora:zk:foo=1>", "<lora:zk:foo=1>", [], 1),
    ("a <lora:zk:0.5", "a <lora:zk:0.5", [], 1),
    ("<hypernet:zk:1> a", "<hypernet:zk:1> a", [], 0),
]


@pytest.mark.parametrize("prompt,clean,tags,n_warnings", TAG_CASES)
def test_parse_lora_tags(prompt, clean, tags, n_warnings):
    got_clean, got_tags, warnings = parse_lora_tags(prompt)
    assert got_clean == clean
    assert [(t.name, t.unet_weight, t.te_weight) for t in got_tags] == tags
    assert len(warnings) == n_warnings, warnings


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("<>:=lorayLORA .,-+e0123456789naifzk \n\t/")) | st.characters(),
               max_size=80))
def test_parse_never_raises(text):
    clean, tags, warnings = parse_lora_tags(text)
    assert isinstance(clean, str) and all(isinstance(w, str) for w in warnings)
    for tag in tags:
        assert tag.name and tag.name == tag.name.strip()
        assert math.isfinite(tag.unet_weight) and math.isfinite(tag.te_weight)


@settings(max_examples=100, deadline=None)
@given(name=st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_ .-]{0,20}[A-Za-z0-9_]", fullmatch=True),
       unet=st.floats(-2, 2, allow_nan=False), te=st.floats(-2, 2, allow_nan=False))
def test_tag_round_trip(name, unet, te):
    tag = LoraTag(name, unet_weight=unet, te_weight=te)
    _, tags, warnings = parse_lora_tags(f"a photo {tag.to_tag()}")
    assert warnings == [] and len(tags) == 1
    assert tags[0].name == name
    assert tags[0].unet_weight == pytest.approx(unet, rel=1e-5) and tags[0].te_weight == pytest.approx(te, rel=1e-5)


@pytest.fixture(scope="module")
def pipes():
    from sdlora.generate.pipeline import load_pipeline

    return {name: load_pipeline(name) for name in ("tiny-sd15", "tiny-sdxl")}


LONG = ", ".join(f"detail number {i}" for i in range(30))  # ~120 tokens: two chunks


def test_token_chunks_match_the_pipeline_tokenizer(pipes):
    tok = pipes["tiny-sd15"].tokenizer
    short = tok("a red boat", padding="max_length", max_length=77, truncation=True).input_ids
    assert token_chunks(tok, "a red boat") == [short]
    assert token_chunks(tok, "") == [tok("", padding="max_length", max_length=77).input_ids]
    chunks = token_chunks(tok, LONG)
    ids = tok(LONG, add_special_tokens=False).input_ids
    assert 75 < len(ids) <= 150 and len(chunks) == 2 and all(len(c) == 77 for c in chunks)
    assert chunks[0] == [tok.bos_token_id, *ids[:75], tok.eos_token_id]
    rest = ids[75:]
    assert chunks[1] == [tok.bos_token_id, *rest, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(rest))


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_short_prompts_equal_the_pipeline_encoding(pipes, model):
    pipe = pipes[model]
    for negative in ("", "blurry"):
        ours = encode_prompt_embeds(pipe, "zkstyle, a red boat", negative)
        if model == "tiny-sdxl":
            ref = pipe.encode_prompt("zkstyle, a red boat", None, "cpu", 1, True, negative or None)
            names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
        else:
            ref = pipe.encode_prompt("zkstyle, a red boat", "cpu", 1, True, negative or None)
            names = ["prompt_embeds", "negative_prompt_embeds"]
        for name, expected in zip(names, ref):
            assert torch.equal(ours[name], expected), (name, negative)


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_long_prompts_are_chunked(pipes, model):
    pipe = pipes[model]
    ours = encode_prompt_embeds(pipe, LONG, "blurry")
    assert ours["prompt_embeds"].shape[1] == 77 * 2
    assert ours["negative_prompt_embeds"].shape == ours["prompt_embeds"].shape  # negative padded to 2 chunks
    if model == "tiny-sd15":  # each chunk is encoded on its own, as a separate 77-token prompt
        for i, chunk in enumerate(token_chunks(pipe.tokenizer, LONG)):
            alone = pipe.text_encoder(torch.tensor([chunk]))[0]
            torch.testing.assert_close(ours["prompt_embeds"][:, 77 * i:77 * (i + 1)], alone, rtol=0, atol=1e-6)
    # Three chunks of negative against two of prompt: the prompt is padded instead.
    longer = encode_prompt_embeds(pipe, LONG, LONG + ", " + LONG)
    assert longer["prompt_embeds"].shape[1] == longer["negative_prompt_embeds"].shape[1] == 77 * 4
    if model == "tiny-sdxl":
        assert ours["pooled_prompt_embeds"].shape == (1, pipe.text_encoder_2.config.projection_dim)


def test_long_prompt_renders(pipes):
    from sdlora.generate.pipeline import GenerationParams, generate

    pipe = pipes["tiny-sd15"]
    pipe.set_progress_bar_config(disable=True)
    params = GenerationParams(prompt=LONG, steps=2, width=64, height=64, seed=1)
    first, again = generate(pipe, params), generate(pipe, params)
    assert first.size == (64, 64) and first.tobytes() == again.tobytes()
