"""Prompt syntax shared with A1111: `<lora:name:weight>` tags, and prompts longer than CLIP's 77 tokens.

Long prompts follow A1111: the tokens are cut into chunks of 75, each chunk is encoded on its own between BOS
and EOS (77 positions, as CLIP was trained), and the chunk encodings are concatenated along the sequence axis.
The UNet's cross-attention takes any sequence length, so a 150-token prompt becomes [1, 154, dim].
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from sdlora.errors import GenerationError
from sdlora.models.loading import token_chunks

# A1111's extra-network syntax is `<type:arg:arg...>`; we read the `lora` type (and LyCORIS' old `lyco` alias).
_TAG = re.compile(r"<\s*(lora|lyco)\s*:([^<>]*)>", re.IGNORECASE)


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:...>` tag: the LoRA's name (file stem) and its UNet and text-encoder weights."""

    name: str
    unet_weight: float = 1.0
    te_weight: float = 1.0

    def to_tag(self) -> str:
        """The tag A1111 reads back: `<lora:name:w>`, or `<lora:name:te:unet>` when the two weights differ."""
        if self.te_weight == self.unet_weight:
            return f"<lora:{self.name}:{self.unet_weight:g}>"
        return f"<lora:{self.name}:{self.te_weight:g}:{self.unet_weight:g}>"


def parse_lora_tags(prompt: str) -> tuple[str, list[LoraTag], list[str]]:
    """Take the `<lora:...>` tags out of a prompt, as A1111 reads them.

    Forms: `<lora:name>` (weight 1), `<lora:name:w>` (both weights w), `<lora:name:te:unet>` (A1111's order:
    text-encoder weight first, then UNet), and the named forms `<lora:name:w:unet=0.5>`, `te=`. Spaces around
    the parts are ignored. A1111's fourth argument (`dyn`) is not supported and is ignored with a warning.

    Args:
        prompt: the prompt as typed.

    Returns:
        (the prompt without the tags, whitespace tidied; the tags in order; warnings). A malformed tag (no name,
        a weight that is not a finite number, unknown arguments) stays in the prompt and gets a warning; this
        function never raises.
    """
    tags: list[LoraTag] = []
    warnings: list[str] = []

    def take(match: re.Match) -> str:
        try:
            tag, note = _parse_tag_args(match.group(2))
        except ValueError as e:
            warnings.append(f"ignored malformed tag {match.group(0)!r}: {e}")
            return match.group(0)
        if note:
            warnings.append(f"{match.group(0)!r}: {note}")
        tags.append(tag)
        return " "

    clean = _TAG.sub(take, prompt)
    if re.search(r"<\s*(lora|lyco)\s*:[^>]*$", clean, re.IGNORECASE):
        warnings.append("a '<lora:' tag is not closed with '>'; it was left in the prompt")
    # Removing a tag leaves its neighbours' spaces behind; CLIP ignores them, but the saved prompt reads better.
    clean = re.sub(r"[ \t]{2,}", " ", clean).strip()
    return clean, tags, warnings


def _parse_tag_args(text: str) -> tuple[LoraTag, str]:
    """The tag and a note about ignored arguments ("" if none). Raises ValueError: why the tag is malformed."""
    parts = [p.strip() for p in text.split(":")]
    positional = [p for p in parts if "=" not in p]
    named = {}
    for part in parts:
        if "=" in part:
            key, _, value = part.partition("=")
            named[key.strip().lower()] = value.strip()
    if not positional or not positional[0]:
        raise ValueError("no LoRA name")
    if len(positional) > 4:
        raise ValueError("too many arguments (expected <lora:name:te_weight:unet_weight>)")
    unknown = sorted(set(named) - {"te", "unet", "dyn"})
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r} (known: te=, unet=)")
    te = _weight(positional[1]) if len(positional) > 1 else 1.0
    te = _weight(named["te"]) if "te" in named else te
    unet = _weight(positional[2]) if len(positional) > 2 else te
    unet = _weight(named["unet"]) if "unet" in named else unet
    note = "the dyn argument is not supported and was ignored" if len(positional) > 3 or "dyn" in named else ""
    return LoraTag(positional[0], unet_weight=unet, te_weight=te), note


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"weight {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"weight {text!r} is not finite")
    return value
@torch.no_grad()
def encode_prompt_embeds(pipe, prompt: str, negative_prompt: str = "", clip_skip: int = 1) -> dict[str, torch.Tensor]:
    """Embeddings of a prompt of any length for a StableDiffusion(XL)Pipeline: the keyword arguments
    `prompt_embeds`, `negative_prompt_embeds` (and for SDXL `pooled_prompt_embeds`,
    `negative_pooled_prompt_embeds`) to pass to the pipeline instead of the strings.

    Prompt and negative are padded with empty-prompt chunks to the same number of chunks (A1111 does the same),
    so both are [1, 77 * chunks, dim]. SD 1.x/2.x take the text encoder's last hidden state. SDXL concatenates
    the penultimate hidden states of both encoders, and its pooled embedding comes from the first chunk of the
    second encoder, as in A1111; an empty negative is all zeros when the model's `force_zeros_for_empty_prompt`
    is set, as the diffusers pipeline does.

    `clip_skip` N > 1 (SD 1.x/2.x) reads the hidden state N - 1 layers before the end through the final layer norm,
    as A1111 and kohya do (diffusers' own `clip_skip` counts from 0: its 1 is this 2).

    Raises:
        GenerationError: clip_skip > 1 for SDXL, which always reads the penultimate layer.
    """
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if sdxl and clip_skip > 1:
        raise GenerationError("clip skip: SDXL always reads its text encoders' penultimate layer; leave it at 1")
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if sdxl:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    positive = [token_chunks(tok, prompt) for tok, _ in pairs]
    negative = [token_chunks(tok, negative_prompt) for tok, _ in pairs]
    n = max(len(chunks) for chunks in positive + negative)
    empty = [token_chunks(tok, "")[0] for tok, _ in pairs]

    def encode(per_encoder: list[list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        states, pooled = [], None
        for (_, encoder), chunks, pad in zip(pairs, per_encoder, empty):
            device = next(encoder.parameters()).device
            ids = torch.tensor(chunks + [pad] * (n - len(chunks)), device=device)  # [n, 77]
            if not sdxl and clip_skip > 1:
                hidden = encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
                states.append(getattr(encoder, "text_model", encoder).final_layer_norm(hidden))
                continue
            if not sdxl:
                states.append(encoder(ids)[0])  # [n, 77, dim]
                continue
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            if pooled is None and out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = out[0][:1]  # [1, proj_dim], first chunk
        hidden = torch.cat(states, dim=-1)
        return hidden.reshape(1, -1, hidden.shape[-1]), pooled  # [1, 77 * n, dim]

    embeds, pooled = encode(positive)
    if not sdxl:
        return {"prompt_embeds": embeds, "negative_prompt_embeds": encode(negative)[0]}
    assert pooled is not None, "SDXL's second text encoder has a projection"
    if not negative_prompt and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        negative_embeds, maybe_pooled = encode(negative)
        assert maybe_pooled is not None, "SDXL's second text encoder has a projection"
        negative_pooled = maybe_pooled
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds, "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled}
