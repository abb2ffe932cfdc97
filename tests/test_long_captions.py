"""data.max_token_length: long captions reach the text encoder whole, in kohya's chunk ids, joined as kohya joins
them."""

import pytest
import torch
from safetensors import safe_open

from sdlora.models.loading import encode_prompt, load_base_model, token_chunks, tokenize

WORDS = "red blue green star ring boat tree cat dog sun moon hill".split()


def caption_of(tokenizer, n_tokens: int) -> str:
    """A caption of exactly `n_tokens` tokens (single-token words)."""
    text = " ".join(WORDS[i % len(WORDS)] for i in range(n_tokens))
    assert len(tokenizer(text, add_special_tokens=False).input_ids) == n_tokens
    return text


def kohya_input_ids(tokenizer, caption: str, max_token_length: int) -> torch.Tensor:
    """kohya's BaseDataset.get_input_ids (library/train_util.py) for max_token_length 150 / 225, flattened."""
    ids = tokenizer(caption, padding="max_length", truncation=True, max_length=max_token_length + 2,
                    return_tensors="pt").input_ids.squeeze(0)
    chunks = []
    for i in range(1, max_token_length + 2 - 77 + 2, 75):
        chunk = torch.cat((ids[0].unsqueeze(0), ids[i:i + 75], ids[-1].unsqueeze(0)))
        if tokenizer.pad_token_id != tokenizer.eos_token_id:  # v2 / SDXL's second tokenizer
            if chunk[-2] != tokenizer.eos_token_id and chunk[-2] != tokenizer.pad_token_id:
                chunk[-1] = tokenizer.eos_token_id
            if chunk[1] == tokenizer.pad_token_id:
                chunk[1] = tokenizer.eos_token_id
        chunks.append(chunk)
    return torch.cat(chunks)


@pytest.fixture(scope="module")
def sdxl(sdxl_path):
    return load_base_model(str(sdxl_path))


@pytest.mark.parametrize("n_tokens", [10, 75, 80, 150, 200])
@pytest.mark.parametrize("max_token_length", [150, 225])
def test_ids_are_kohyas(sdxl, n_tokens, max_token_length):
    """Both of SDXL's tokenizers: CLIP's (pad = EOS, as SD 1.x) and OpenCLIP's (pad = "!", as SD 2.x)."""
    for tok in sdxl.tokenizers:
        caption = caption_of(tok, n_tokens)
        ids = tokenize([tok], [caption], max_token_length)[0]
        assert ids.shape == (1, 77 * max_token_length // 75)
        assert torch.equal(ids[0], kohya_input_ids(tok, caption, max_token_length)), tok.pad_token_id


def test_a_150_token_caption_reaches_the_encoder_whole(sd15_path):
    base = load_base_model(str(sd15_path))
    tok, encoder = base.tokenizers[0], base.text_encoders[0]
    caption = caption_of(tok, 150)
    ids = tokenize(base.tokenizers, [caption], 150)
    specials = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    assert [i for i in ids[0][0].tolist() if i not in specials] == tok(caption, add_special_tokens=False).input_ids
    assert tokenize(base.tokenizers, [caption])[0].shape == (1, 77)  # 75: cut
    with torch.no_grad():
        states, _ = encode_prompt("sd1", base.text_encoders, ids)
        chunks = [encoder(torch.tensor([c]))[0][0] for c in token_chunks(tok, caption)]
    # kohya's get_hidden_states: BOS of the first chunk, positions 1-75 of each, the last chunk's final position.
    expected = torch.cat([chunks[0][:1], chunks[0][1:76], chunks[1][1:76], chunks[1][76:]])
    assert states.shape == (1, 152, expected.shape[-1])
    torch.testing.assert_close(states[0], expected)


def test_sdxl_joins_both_encoders_and_pools_the_first_chunk(sdxl):
    captions = [caption_of(sdxl.tokenizers[0], 120), "a cat"]
    ids = tokenize(sdxl.tokenizers, captions, 225)
    with torch.no_grad():
        states, pooled = encode_prompt("sdxl", sdxl.text_encoders, ids)
        first = [tokenize(sdxl.tokenizers, [c])[1] for c in captions]  # each caption's first chunk alone
        expected_pooled = torch.cat([sdxl.text_encoders[1](f)[0] for f in first])
    dims = sum(e.config.hidden_size for e in sdxl.text_encoders)
    assert states.shape == (2, 227, dims)
    torch.testing.assert_close(pooled, expected_pooled)


def test_training_with_long_captions_records_it(dataset, tmp_path):
    from sdlora.train.recipe import train
    from tests.test_train import make_cfg

    path = train(make_cfg(dataset, tmp_path, "train.max_train_steps=2", "data.max_token_length=150",
                          "data.validation_split=0.34", f'data.caption_prefix="{" ".join(WORDS * 8)}"'))
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_max_token_length"] == "150"
