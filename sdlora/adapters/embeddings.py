"""Pivotal tuning: new words (train.new_tokens) whose embeddings train beside the LoRA, and embeddings in files.

Training adds each word to the tokenizers (with `train.new_token_vectors` vectors it is the word and `word_1`, ...,
diffusers' multi-vector convention, which `models.loading.expand_vectors` applies to prompts) and trains only its
rows of the token embedding through peft's TrainableTokens layer: the rest of the encoder stays frozen.

The files are community conventions that no library writes, hence by hand: inside a LoRA file as A1111/Forge read
bundled embeddings (`bundle_emb.<word>.string_to_param.*`, SDXL `bundle_emb.<word>.clip_l` / `.clip_g`; ComfyUI reads
the same keys when a prompt names `embedding:<lora file>`), and standalone as kohya writes them (`emb_params`; SDXL
`clip_l` / `clip_g`), which A1111, ComfyUI and diffusers' `load_textual_inversion` read. Loading into a pipeline goes
through diffusers' `load_textual_inversion`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdlora.atomic import atomic_dir
from sdlora.errors import ConfigError, LoraFileError

BUNDLE_PREFIX = "bundle_emb."
# One text encoder's vectors: in a LoRA file (A1111's own .pt name, kept by its bundle reader) and standalone (kohya's
# .safetensors name). SDXL files name each encoder's vectors instead.
BUNDLED_KEY = "string_to_param.*"
STANDALONE_KEY = "emb_params"
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
# The same table read the other way: a tensor name -> the text encoder its vectors are for.
_COMPONENT_OF = {BUNDLED_KEY: "text_encoder", STANDALONE_KEY: "text_encoder", **{v: k for k, v in SDXL_KEYS.items()}}
TOKENS_ADAPTER = "sdlora_tokens"
# A diffusers pipeline's text encoders and the tokenizer of each, by attribute name.
_PIPE_TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


def vector_names(word: str, vectors: int) -> list[str]:
    """The tokenizer entries of a word of `vectors` vectors: diffusers' `word`, `word_1`, ... convention."""
    return [word] + [f"{word}_{i}" for i in range(1, vectors)]


def check_new_word(word: str, tokenizer) -> None:
    """Raise ConfigError when `word` cannot be a new token of `tokenizer`: what diffusers' load_textual_inversion
    would refuse (already in the vocabulary), or what CLIP's lower-casing tokenizer would never match."""
    if not word or any(c.isspace() for c in word) or word != word.lower():
        raise ConfigError(f"train.new_tokens: {word!r} must be one lower-case word without spaces (CLIP reads "
                          "prompts lower-cased)")
    if word in tokenizer.get_vocab():
        raise ConfigError(f"train.new_tokens: {word!r} is already a token of the base model's vocabulary; pick a "
                          "made-up word such as \"zkw\" or \"<zk>\"")


def add_trainable_words(encoder: Any, tokenizer, words: list[str], vectors: int, init: str) -> list[int]:
    """Add `words` (each of `vectors` vectors) to `tokenizer` and `encoder`, their rows trainable (fp32, peft's
    TrainableTokens on the token embedding) and starting at the mean embedding of `init`'s tokens ("" = of the
    whole vocabulary); returns the new token ids in `vector_names` order.

    Call after the LoRA adapters are injected: injection freezes the whole model.
    """
    # peft (also under adapters.lora) takes seconds to import: `inspect`, which reads bundles, needs none of it.
    from peft import TrainableTokensConfig, inject_adapter_in_model

    from sdlora.adapters.lora import trained_in_fp32
    for word in words:
        check_new_word(word, tokenizer)
    names = [name for word in words for name in vector_names(word, vectors)]
    embedding = encoder.get_input_embeddings()
    with torch.no_grad():
        if init:
            ids = tokenizer(init, add_special_tokens=False).input_ids
            start = embedding.weight[ids].float().mean(0)
        else:
            start = embedding.weight.float().mean(0)
    tokenizer.add_tokens(names)
    new_ids = tokenizer.convert_tokens_to_ids(names)
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the rows are set just below
    fix_pooling(encoder, tokenizer)
    with torch.no_grad():
        encoder.get_input_embeddings().weight[new_ids] = start.to(embedding.weight.dtype)
    target = next(name for name, module in encoder.named_modules() if module is encoder.get_input_embeddings())
    with warnings.catch_warnings():  # "Already found a peft_config": the LoRA's, beside which this one is meant
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        inject_adapter_in_model(TrainableTokensConfig(token_indices=new_ids, target_modules=[target]), encoder,
                                adapter_name=TOKENS_ADAPTER)
    trained_in_fp32(encoder)
    return new_ids


def is_embedding(param_name: str) -> bool:
    """True for the trained rows of new words (`add_trainable_words`)."""
    return "trainable_tokens_delta" in param_name


def fix_pooling(encoder: Any, tokenizer) -> None:
    """Make the encoder pool at the end-of-text token by its id: configs from before transformers PR #24773 (e.g.
    SDXL's second encoder) say eos_token_id 2, for which CLIP pools at the highest token id, and a new token's id is
    higher than end-of-text's, so the pooled embedding SDXL conditions on would move to the new word."""
    text_model: Any = getattr(encoder, "text_model", encoder)
    if getattr(text_model, "eos_token_id", None) == 2:
        text_model.eos_token_id = tokenizer.eos_token_id
        encoder.config.eos_token_id = tokenizer.eos_token_id


def trained_vectors(encoder: Any) -> torch.Tensor:
    """The new rows of a text encoder with `add_trainable_words`, [new tokens, dim], detached fp32."""
    layer = encoder.get_input_embeddings()
    return layer.trainable_tokens_delta[TOKENS_ADAPTER].detach().float().clone()


def split_vectors(rows: torch.Tensor, words: list[str]) -> dict[str, torch.Tensor]:
    """{word: its vectors} from the rows of `trained_vectors` (each word's vectors in a row)."""
    return dict(zip(words, rows.reshape(len(words), -1, rows.shape[-1])))


def bundle_tensors(per_encoder: Mapping[str, Mapping[str, torch.Tensor]], arch: str,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{component: {word: vectors}} as the `bundle_emb.*` keys of a LoRA file."""
    return {f"{BUNDLE_PREFIX}{word}.{_key(component, arch, bundled=True)}": vectors.to(dtype).contiguous()
            for component, words in per_encoder.items() for word, vectors in words.items()}


def standalone_tensors(per_encoder: Mapping[str, Mapping[str, torch.Tensor]], arch: str,
                       word: str) -> dict[str, torch.Tensor]:
    """One word's standalone embedding file: {"emb_params": vectors} or SDXL's {"clip_l", "clip_g"}."""
    return {_key(component, arch, bundled=False): words[word].contiguous() for component, words in per_encoder.items()}


def save_embeddings(per_encoder: Mapping[str, Mapping[str, torch.Tensor]], arch: str, folder: Path) -> None:
    """Each word as its standalone file `<folder>/<word>.safetensors` (fp32), the folder written atomically: A1111
    and ComfyUI name an embedding by its file name."""
    from safetensors.torch import save_file

    words = next(iter(per_encoder.values()))
    with atomic_dir(folder) as tmp:
        for word in words:
            save_file(standalone_tensors(per_encoder, arch, word), str(tmp / f"{word}.safetensors"))


def _key(component: str, arch: str, bundled: bool) -> str:
    if arch == "sdxl":
        return SDXL_KEYS[component]
    return BUNDLED_KEY if bundled else STANDALONE_KEY


def split_bundle(tensors: Mapping[str, torch.Tensor],
                 path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A LoRA file's tensors as (the embeddings bundled in it as {word: {component: vectors [n, dim]}}, the other
    tensors).

    Raises:
        LoraFileError: a bundled embedding in a layout A1111 does not read either.
    """
    found: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(BUNDLE_PREFIX):
            rest[key] = value
            continue
        word, _, name = key[len(BUNDLE_PREFIX):].partition(".")
        component = _COMPONENT_OF.get(name)
        if component is None or not word:
            raise LoraFileError(f"{path}: bundled embedding key {key!r} is not one A1111 reads "
                                f"(bundle_emb.<word>.{BUNDLED_KEY}, .clip_l or .clip_g)")
        found.setdefault(word, {})[component] = value.reshape(-1, value.shape[-1])
    return found, rest


def read_embedding_file(tensors: Mapping[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """A standalone embedding's {component: vectors [n, dim]}: kohya's `emb_params`, A1111's `string_to_param.*`,
    diffusers' single {word: vectors}, or SDXL's `clip_l` + `clip_g`.

    Raises:
        LoraFileError: none of those layouts.
    """
    if set(SDXL_KEYS.values()) <= set(tensors):
        return {component: tensors[key].reshape(-1, tensors[key].shape[-1]) for component, key in SDXL_KEYS.items()}
    for key in (STANDALONE_KEY, BUNDLED_KEY):
        if key in tensors:
            return {"text_encoder": tensors[key].reshape(-1, tensors[key].shape[-1])}
    if len(tensors) == 1:
        value = next(iter(tensors.values()))
        return {"text_encoder": value.reshape(-1, value.shape[-1])}
    raise LoraFileError(f"{path}: not an embedding file (no emb_params, string_to_param.*, or clip_l + clip_g "
                        "tensor)")


def load_words(pipe, words: Mapping[str, Mapping[str, torch.Tensor]], label: str) -> list[str]:
    """Load {word: {component: vectors}} into a pipeline's tokenizers and text encoders with diffusers'
    `load_textual_inversion` (each component's vectors into its own encoder); returns the words loaded.

    Raises:
        LoraFileError: a word that is a token of the model (or loaded already: unload it first), vectors of the
            wrong width, or an SDXL embedding without both encoders' vectors (or one for another model family).
    """
    encoders = _pipe_encoders(pipe)
    for word, per_component in words.items():
        if set(per_component) != set(encoders):
            have = "SDXL" if "text_encoder_2" in per_component else "SD 1.x/2.x"
            raise LoraFileError(f"{label}: the embedding {word!r} is for {have}, not for this base model")
        for component, (tokenizer, encoder) in encoders.items():
            if word in tokenizer.get_vocab():
                raise LoraFileError(f"{label}: the embedding's word {word!r} is a token of this model already; "
                                    "rename the embedding (its file name, or the word it bundles)")
            width = encoder.get_input_embeddings().weight.shape[-1]
            if per_component[component].shape[-1] != width:
                raise LoraFileError(f"{label}: the embedding {word!r} is {per_component[component].shape[-1]} wide, "
                                    f"the text encoder {width}: it is for another model family")
            pipe.load_textual_inversion(per_component[component].to(encoder.dtype), token=word, tokenizer=tokenizer,
                                        text_encoder=encoder)
            fix_pooling(encoder, tokenizer)
    return list(words)


def unload_word(pipe, word: str) -> None:
    """Take a word that `load_words` loaded (all its vectors: `word`, `word_1`, ...) out of a pipeline's tokenizers
    and text encoders again, with diffusers' `unload_textual_inversion`."""
    for tokenizer, encoder in _pipe_encoders(pipe).values():
        names = [name for name in tokenizer.added_tokens_encoder
                 if name == word or re.fullmatch(rf"{re.escape(word)}_\d+", name)]
        pipe.unload_textual_inversion(names, tokenizer=tokenizer, text_encoder=encoder)


def _pipe_encoders(pipe) -> dict[str, tuple[Any, Any]]:
    """{component: (tokenizer, text encoder)} of a pipeline's text encoders (SD's one, SDXL's two)."""
    return {component: (getattr(pipe, tokenizer), getattr(pipe, component))
            for component, tokenizer in _PIPE_TOKENIZERS.items() if getattr(pipe, component, None) is not None}
