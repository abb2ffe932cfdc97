"""diffusers module names -> the original LDM/SGM names, as one table per model part, read by single-file checkpoints
(`single_file`: write a model in A1111/ComfyUI's layout) and by LoRA files (`adapters.export`: SDXL LoRAs name the
UNet's modules the LDM way).

The renames follow diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py and
convert_diffusers_to_original_sdxl.py, ComfyUI's unet_to_diffusers and A1111's networks.py, but are generated from
the model's block layout instead of their hard-coded 4-block / 3-block loops, so tiny models convert as real ones do.
Each table maps a diffusers module prefix to an LDM one; a name is renamed by its longest prefix in the table.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class UnetLayout:
    """What the LDM block numbering depends on: resnets per down/up block and which up blocks have attentions.

    LDM numbers every layer of a level in one flat list (input_blocks / output_blocks), so index = layers of all
    earlier levels + position; with layers_per_block=2 that is 3 slots per level (2 layers + down/upsampler).
    """

    down_layers: tuple[int, ...]  # resnets per down block (layers_per_block)
    up_layers: tuple[int, ...]  # resnets per up block (layers_per_block + 1, reversed)
    up_attention: tuple[bool, ...]  # True: the upsampler sits in slot 2 (after resnet + attention), else slot 1


# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json: layers_per_block 2, up blocks CrossAttn, CrossAttn,
# UpBlock2D. Used when no UNet config is given; every SDXL fine-tune shares it (the tiny model too).
SDXL_BASE_LAYOUT = UnetLayout(down_layers=(2, 2, 2), up_layers=(3, 3, 3), up_attention=(True, True, False))

# diffusers ResnetBlock2D child -> LDM ResBlock child. Same table as ComfyUI's UNET_MAP_RESNET (comfy/utils.py),
# A1111's suffix_conversion (extensions-builtin/Lora/networks.py) and kohya's sdxl_original_unet.ResnetBlock2D
# (in_layers = GroupNorm, SiLU, Conv; emb_layers = SiLU, Linear; out_layers = GroupNorm, SiLU, Dropout, Conv).
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# Modules outside the blocks (ComfyUI's UNET_MAP_BASIC); middle_block = [ResBlock, SpatialTransformer, ResBlock].
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",  # SDXL
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.attentions.0": "middle_block.1"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP = {  # transformers CLIP -> open_clip (q/k/v are fused into in_proj by single_file)
    "text_model.embeddings.token_embedding": "token_embedding",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm": "ln_final",
    "text_projection.weight": "text_projection",  # stored transposed: open_clip computes x @ text_projection
}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def unet_layout_from_config(config: Mapping[str, Any]) -> UnetLayout:
    """The LDM layout of a diffusers UNet2DConditionModel config (`unet.config`)."""
    n_blocks = len(config["down_block_types"])
    per_block = config["layers_per_block"]
    down = tuple(per_block) if isinstance(per_block, (list, tuple)) else (per_block,) * n_blocks
    # diffusers builds up block i with reversed(layers_per_block)[i] + 1 resnets.
    up = tuple(n + 1 for n in reversed(down))
    up_attention = tuple("CrossAttn" in block_type for block_type in config["up_block_types"])
    return UnetLayout(down, up, up_attention)


def unet_layout_from_names(names: Iterable[str]) -> UnetLayout | None:
    """The LDM layout read off a UNet's module names (all of `named_modules()`), or None if names are missing."""
    counts: dict[tuple[str, int, str], int] = {}
    for name in names:
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(?:\.|$)", name)
        if m:
            key = (m[1], int(m[2]), m[3])
            counts[key] = max(counts.get(key, 0), int(m[4]) + 1)
    blocks = {(side, b) for side, b, _ in counts}
    n_down = 1 + max((b for side, b in blocks if side == "down"), default=-1)
    n_up = 1 + max((b for side, b in blocks if side == "up"), default=-1)
    if n_down == 0 or n_down != n_up or len(blocks) != n_down + n_up:
        return None

    def layers(side: str, b: int) -> int:
        return counts.get((side, b, "resnets"), counts.get((side, b, "attentions"), 0))

    return UnetLayout(
        down_layers=tuple(layers("down", b) for b in range(n_down)),
        up_layers=tuple(layers("up", b) for b in range(n_up)),
        up_attention=tuple(("up", b, "attentions") in counts for b in range(n_up)),
    )


@functools.lru_cache(maxsize=8)
def unet_table(layout: UnetLayout) -> dict[str, str]:
    """diffusers UNet2DConditionModel module prefix -> LDM `openaimodel.UNetModel` prefix."""
    table = dict(_UNET_TOP)

    def resnet(hf: str, ldm: str) -> None:
        table.update({f"{hf}.{child}": f"{ldm}.{ldm_child}" for child, ldm_child in _UNET_RESNET.items()})

    n = len(layout.down_layers)
    start = 1  # input_blocks.0 is conv_in; each level then has its layers followed by one downsampler slot
    for i, per in enumerate(layout.down_layers):
        for j in range(per):
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{start + j}.0")
            table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{start + j}.1"
        if i < n - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{start + per}.0.op"
        start += per + 1
    start = 0
    for i, per in enumerate(layout.up_layers):
        for j in range(per):
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{start + j}.0")
            table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{start + j}.1"
        if i < n - 1:
            # The upsampler follows the last layer's resnet (slot 0) and, in cross-attention blocks, its attention
            # (slot 1): ComfyUI's unet_to_diffusers counter `c`; A1111 hardcodes SD1's "2 if m[0]>0 else 1".
            slot = 2 if layout.up_attention[i] else 1
            table[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{start + per - 1}.{slot}.conv"
        start += per
    resnet("mid_block.resnets.0", "middle_block.0")
    resnet("mid_block.resnets.1", "middle_block.2")
    return table


def vae_table(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers AutoencoderKL module prefix -> LDM `AutoencoderKL` prefix (decoder levels are numbered in reverse)."""
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    table = {f"{side}.{name}": f"{side}.{name}" for side in ("encoder", "decoder") for name in ("conv_in", "conv_out")}
    table.update({"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out",
                  "quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"})

    def resnet(hf: str, ldm: str) -> None:
        table[hf] = ldm
        table[f"{hf}.conv_shortcut"] = f"{ldm}.nin_shortcut"

    for i in range(n):
        for j in range(per):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        for j in range(per + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{n - 1 - i}.block.{j}")
        if i < n - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
            table[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{n - 1 - i}.upsample"
    for side in ("encoder", "decoder"):
        for j in range(2):
            resnet(f"{side}.mid_block.resnets.{j}", f"{side}.mid.block_{j + 1}")
        for hf, ldm in _VAE_ATTENTION.items():
            table[f"{side}.mid_block.attentions.0.{hf}"] = f"{side}.mid.attn_1.{ldm}"
    return table


def openclip_table(num_layers: int) -> dict[str, str]:
    """transformers CLIP text model prefix -> open_clip prefix (without the fused q/k/v)."""
    table = dict(_OPENCLIP)
    for i in range(num_layers):
        for hf, ldm in _OPENCLIP_LAYER.items():
            table[f"text_model.encoder.layers.{i}.{hf}"] = f"transformer.resblocks.{i}.{ldm}"
    return table


def rename(name: str, table: Mapping[str, str]) -> str | None:
    """`name` with its longest prefix (whole dotted parts) replaced as `table` says, or None when no prefix is in it."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in table:
            return ".".join([table[prefix], *parts[n:]])
    return None


def unet_path_to_ldm(path: str, layout: UnetLayout) -> str:
    """diffusers UNet module path -> the original LDM/SGM path (what kohya's SDXL UNet and A1111 call it).

    e.g. down_blocks.1.attentions.0.proj_in -> input_blocks.4.1.proj_in,
    up_blocks.0.upsamplers.0.conv -> output_blocks.2.2.conv, mid_block.resnets.1.conv2 -> middle_block.2.out_layers.3

    Raises:
        ValueError: the module has no LDM counterpart (e.g. a SiLU, or a block as a whole).
    """
    ldm = rename(path, unet_table(layout))
    if ldm is None:
        raise ValueError(f"UNet module {path!r} has no LDM name")
    return ldm


def kohya_block(path: str, layout: UnetLayout, sdxl: bool) -> str:
    """kohya's block (`config.KOHYA_BLOCKS`) of a diffusers UNet module, named after its LDM block: "IN04" for
    input_blocks.4, "OUT02" for output_blocks.2, "MID" (SDXL: "MID00" - "MID02"), SDXL's "BASE" / "OUT" for the
    time/label embedding and the final layers.

    As sd-scripts' networks/lora.py get_block_index numbers them: on SDXL, kohya's UNet has the LDM names and each
    of the middle block's resnet, transformer, resnet is a block; on SD 1.x it counts diffusers' down/up blocks
    three slots a level (1 + 3 i + j), which is the LDM input_blocks / output_blocks index of every UNet whose
    levels have two layers, and one MID.

    Raises:
        ValueError: the module has no LDM name.
    """
    level, _, rest = unet_path_to_ldm(path, layout).partition(".")
    number = int(rest.partition(".")[0])
    if level == "middle_block":
        return f"MID{number:02d}" if sdxl else "MID"
    names = {"input_blocks": "IN", "output_blocks": "OUT"}
    return f"{names[level]}{number:02d}" if level in names else ("OUT" if level == "out" else "BASE")
