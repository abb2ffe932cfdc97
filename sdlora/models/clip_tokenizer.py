"""The real CLIP tokenizer, from the BPE vocabulary shipped as package data (no download).

A module of its own, without torch: `sdlora doctor` counts caption tokens with it and should start in a second.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CLIP_POSITIONS = 77  # the text encoder's sequence length, as CLIP was trained
# Caption tokens that fit: the positions minus BOS and EOS. Training truncates captions to this (models.loading
# tokenize); prompts are encoded in chunks of this many (generate.prompt), as A1111 does.
CLIP_TOKENS = CLIP_POSITIONS - 2


def tokenizer_files() -> Path:
    """Folder holding the real CLIP BPE vocabulary (vocab.json, merges.txt) shipped as package data."""
    return Path(str(resources.files("sdlora") / "tokenizer"))


def load_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP tokenizer from package data. SD1.x pads with <|endoftext|>; SDXL's second one with '!'."""
    from transformers import CLIPTokenizer

    folder = tokenizer_files()
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), pad_token=pad_token,
                         model_max_length=CLIP_POSITIONS)
