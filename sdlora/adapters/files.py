"""LoRA files on disk: safe reading, the A1111 hashes, key kinds, architecture detection, a readable report.

Only safetensors is read: .ckpt/.pt/.bin files are pickles that can run code when loaded. Mapping keys onto a
model is `export.from_kohya_state_dict`; `export` re-exports the public names here, so callers can import
everything LoRA-file related from `sdlora.adapters.export`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from sdlora.errors import LoraFileError

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")

# The LyCORIS algorithms sdlora trains and loads (`adapters.lycoris`) -> the tensor names of one module, as LyCORIS
# writes them (lycoris/modules/loha.py, lokr.py), ComfyUI (comfy/weight_adapter/loha.py, lokr.py) and A1111/Forge
# (extensions-builtin/Lora/network_hada.py, network_lokr.py) read them and peft names its layers' parameters.
# Each module has `.alpha` too, as a LoRA module does.
LYCORIS_PARTS = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
LYCORIS_NAMES = {"loha": "LoHa", "lokr": "LoKr"}

# Parameter suffixes -> (down | up | alpha). Order matters: longest first.
_KEY_SUFFIXES = (
    (".lora_down.weight", "down"),  # kohya / A1111 / ComfyUI
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),  # peft / diffusers >= 0.24 (pytorch_lora_weights.safetensors)
    (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),  # diffusers' old text-encoder format
    (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"),  # diffusers' old attention-processor format: attn1.processor.to_q_lora
    ("_lora.up.weight", "up"),
    (".lora.down.weight", "down"),  # diffusers' non-peft format
    (".lora.up.weight", "up"),
    (".alpha", "alpha"),
    (".dora_scale", "dora_scale"),  # DoRA magnitude, LyCORIS/kohya: [out, 1(, 1, 1)] or, per input, [1, in(, 1, 1)]
    (".lora_magnitude_vector", "magnitude"),  # DoRA magnitude, peft: [out] ([1, out, 1, 1] for convolutions)
    (".lora_magnitude_vector.weight", "magnitude"),
    *((f".{part}", part) for parts in LYCORIS_PARTS.values() for part in parts),
)
# LyCORIS and other non-LoRA network types, recognised by their parameter names (as LyCORIS writes them and
# ComfyUI's load_lora reads them), with the LYCORIS_PARTS algorithm for the ones sdlora loads (None: not read).
_OTHER_TYPES = (
    (re.compile(r"[._]hada_"), "LoHa (LyCORIS)", "loha"),
    (re.compile(r"[._]lokr_"), "LoKr (LyCORIS)", "lokr"),
    (re.compile(r"\.oft_|\.boft_|oft_blocks|oft_diag"), "OFT/BOFT (LyCORIS)", None),
    (re.compile(r"\.diff(_b)?$"), "full weight difference (LyCORIS 'full')", None),
    (re.compile(r"\.[wb]_norm$"), "norm-layer fine-tune (LyCORIS 'norm')", None),
    (re.compile(r"\.lora_mid\."), "LoCon with Tucker decomposition (lora_mid)", None),
    (re.compile(r"\.[ab][12]\.weight$"), "GLoRA (LyCORIS)", None),
    (re.compile(r"\.on_input$"), "(IA)^3 (LyCORIS)", None),
)
_OLD_TE_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

# A1111's legacy model hash (modules/sd_models.model_hash): sha256 of the 0x10000 bytes at offset 0x100000, first
# 8 hex. It hashes whatever is there, so a file shorter than 1 MiB gets the hash of b"" (e3b0c442) and one ending
# inside the window the hash of its tail; we do the same.
_LEGACY_OFFSET, _LEGACY_LENGTH = 0x100000, 0x10000
_HASH_CHUNK = 1 << 20

# Extensions of torch.save / pickle files.
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# Largest safetensors header we parse; ComfyUI's safetensors_header() uses the same cap. A garbage length would
# otherwise make us read (or allocate) up to 2**64 bytes.
_MAX_HEADER = 100 * 1024 * 1024


def split_lora_key(key: str) -> tuple[str, str] | None:
    """(module key, "down" | "up" | "alpha" | "dora_scale" | "magnitude") of a LoRA tensor key, or None.

    The module key keeps its prefix (`lora_unet_...`, `unet.down_blocks...`); diffusers' old attention-processor
    spelling (`attn1.processor.to_q_lora.down.weight`) is normalised to the module path (`attn1.to_q`).
    """
    for suffix, kind in _KEY_SUFFIXES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            if suffix.startswith("_lora."):
                module = module.replace(".processor.", ".")
                head, _, leaf = module.rpartition(".")
                if module.startswith("text_encoder"):
                    leaf = _OLD_TE_ATTN.get(leaf, leaf)
                elif leaf == "to_out":
                    leaf = "to_out.0"
                module = f"{head}.{leaf}"
            return module, kind
    return None


def group_lora_keys(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """({module key: {"down" | "up" | "alpha" | ...: tensor}}, keys that are no LoRA tensor), per `split_lora_key`."""
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unknown = []
    for key, tensor in sd.items():
        split = split_lora_key(key)
        if split is None:
            unknown.append(key)
        else:
            modules[split[0]][split[1]] = tensor
    return dict(modules), unknown


def unsupported_network_type(keys: Iterable[str], lycoris: bool = False) -> tuple[str, str] | None:
    """(type name, example key) if any key belongs to a network type other than LoRA; with `lycoris`, other than
    LoRA and the LyCORIS algorithms of LYCORIS_PARTS."""
    for key in keys:
        for pattern, name, algo in _OTHER_TYPES:
            if pattern.search(key) and not (lycoris and algo):
                return name, key
    return None


def refuse_other_networks(path: str | Path, keys: Iterable[str], lycoris: bool = False) -> None:
    """Raise LoraFileError (naming the file, the network type and a key) for a network that is no LoRA: any, for
    the commands that read LoRA factors; with `lycoris` (loading into a model: generate, the app, grid,
    merge-into-base, inspect) only the types that are no LoHa/LoKr either."""
    unsupported = unsupported_network_type(keys, lycoris)
    if unsupported:
        name, key = unsupported
        if lycoris:
            raise LoraFileError(f"{path}: a {name} network (e.g. key {key!r}), which sdlora does not read; it reads "
                                "LoRA (also LoCon, DoRA), LoHa and LoKr files")
        raise LoraFileError(f"{path}: a {name} network (e.g. key {key!r}), not a LoRA; this reads LoRA files only "
                            "(LoHa and LoKr files load in generate, the app, grid and merge-into-base)")


def lycoris_algo(parts: Iterable[str]) -> str | None:
    """The LYCORIS_PARTS algorithm ("loha", "lokr") of one module's tensor kinds (from `split_lora_key`), or None."""
    return next((algo for algo, names in LYCORIS_PARTS.items() if any(p in names for p in parts)), None)


def lycoris_missing(algo: str, parts: Iterable[str]) -> str | None:
    """What one LoHa / LoKr module lacks to make a weight (as A1111's network_hada.py / network_lokr.py require),
    e.g. "hada_w2_b", or None when complete."""
    have = set(parts)
    if algo == "loha":
        needed = [p for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if p not in have]
        return ", ".join(needed) or None
    needed = [f"lokr_{w} or lokr_{w}_a/_b" for w in ("w1", "w2")
              if f"lokr_{w}" not in have and not {f"lokr_{w}_a", f"lokr_{w}_b"} <= have]
    return ", ".join(needed) or None


def lycoris_rank(parts: Mapping[str, torch.Tensor]) -> int | None:
    """The rank that ComfyUI (comfy/weight_adapter) and A1111 (network_hada.py, network_lokr.py) read from one
    LoHa/LoKr module's tensors and divide its alpha by: LoHa's hada_w1_b rows; LoKr's lokr_w2_b rows, else
    lokr_w1_b's; None for a LoKr whose two Kronecker factors are both full matrices, which loaders scale by 1
    whatever its alpha."""
    for part in ("hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if part in parts:
            return parts[part].shape[0]
    return None


def bytes_hashes(data: bytes) -> dict[str, str]:
    """`file_hashes` of a serialised safetensors file held in memory."""
    n = int.from_bytes(data[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(memoryview(data)[8 + n:]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(data[_LEGACY_OFFSET:_LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8],
    }


def file_hashes(path: str | Path) -> dict[str, str]:
    """The two hashes A1111 / the additional-networks extension show for a safetensors LoRA.

    Returns:
        {"sshs_model_hash": sha256 hex of the tensor payload (everything after the 8-byte length and the JSON
        header, so metadata edits never change it; A1111's "addnet" hash, whose first 12 hex are the PNG
        "Lora hashes"), "sshs_legacy_hash": first 8 hex of sha256 of the 0x10000 bytes at offset 0x100000}.
    """
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            sha.update(chunk)
        f.seek(_LEGACY_OFFSET)
        legacy = hashlib.sha256(f.read(_LEGACY_LENGTH)).hexdigest()[:8]
    return {"sshs_model_hash": sha.hexdigest(), "sshs_legacy_hash": legacy}


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and `__metadata__` of a safetensors LoRA file, after checking the header before trusting it.

    Args:
        path: a `.safetensors` file.

    Returns:
        (tensors on CPU, metadata {str: str}; empty when the file has none).

    Raises:
        LoraFileError: a pickle file (.ckpt/.pt/.bin, or pickle/zip content), a missing, truncated or
            non-safetensors file, or a corrupt header; the message names the file.
    """
    path = Path(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise LoraFileError(
            f"{path}: {path.suffix} files are Python pickles that can run code when loaded and are refused; "
            "use the .safetensors version of this LoRA"
        )
    if not path.is_file():
        raise LoraFileError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little")
        if len(head) < 8 or n < 2 or n > min(_MAX_HEADER, size - 8):
            if head.startswith((b"PK", b"\x80")):  # zip (torch.save) or pickle magic
                raise LoraFileError(f"{path}: this is a torch.save/pickle file, not safetensors; pickles are refused")
            raise LoraFileError(
                f"{path}: not a safetensors file, or truncated (header length field {n}, file size {size} bytes)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise LoraFileError(f"{path}: safetensors header is not valid JSON (corrupt, or not safetensors)") from None
    metadata = header.pop("__metadata__", None) if isinstance(header, dict) else None
    _check_header(path, header, metadata, size - 8 - n)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError and others for bad files
        raise LoraFileError(f"{path}: cannot read the tensors ({e})") from e
    return tensors, dict(metadata or {})


def _check_header(path: Path, header, metadata, payload_size: int) -> None:
    if not isinstance(header, dict):
        raise LoraFileError(f"{path}: safetensors header is not a JSON object")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise LoraFileError(f"{path}: __metadata__ must map strings to strings")
    end = 0
    for name, entry in header.items():
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(isinstance(x, int) and x >= 0 for x in entry["data_offsets"] + entry["shape"])
        )
        if not ok:
            raise LoraFileError(f"{path}: corrupt safetensors header entry {name!r}")
        end = max(end, entry["data_offsets"][1])
    if end > payload_size:
        raise LoraFileError(f"{path}: truncated ({payload_size} bytes of tensor data, the header lists {end})")


def detect_arch(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """"sd1", "sd2" or "sdxl" for a LoRA state dict, from its keys, then shapes, then its metadata.

    Order: SDXL-only prefixes (lora_te1_/lora_te2_, text_encoder_2.); the cross-attention context width of an
    attn2 to_k/to_v down weight (768 SD1.x, 1024 SD2.x, 2048 SDXL); the text encoder width (768 / 1024);
    `ss_base_model_version` / `modelspec.architecture` (the only clue for tiny test models); LDM block names
    (kohya uses them for SDXL only).

    Raises:
        LoraFileError: nothing identifies the architecture.
    """
    keys = list(sd)
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl"
    widths = {1024: "sd2", 768: "sd1", 2048: "sdxl"}
    inputs = ("down", "hada_w1_b")  # [rank, in features] of a Linear: LoRA's down, LoHa's first factor
    for key in keys:
        split = split_lora_key(key)
        if split and split[1] in inputs and re.search(r"attn2[._]to_[kv]$", split[0]) and sd[key].dim() >= 2:
            if sd[key].shape[1] in widths:
                return widths[sd[key].shape[1]]
    for key in keys:
        split = split_lora_key(key)
        if split and split[1] in inputs and split[0].startswith(("lora_te_", "text_encoder.")) and sd[key].dim() == 2:
            if sd[key].shape[1] in (768, 1024):
                return widths[sd[key].shape[1]]
    metadata = metadata or {}
    version = metadata.get("ss_base_model_version", "")
    architecture = metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or architecture.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith("sd_v2") or architecture.startswith("stable-diffusion-v2"):
        return "sd2"
    if version.startswith("sd_v1") or architecture.startswith("stable-diffusion-v1"):
        return "sd1"
    if any(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", k) for k in keys):
        return "sdxl"
    raise LoraFileError(
        "cannot tell which Stable Diffusion version this LoRA is for (no SDXL keys, no known widths, no metadata)"
    )


def inspect_lora(path: str | Path) -> str:
    """A human-readable report on a LoRA file: format, architecture, modules, ranks/alphas per block, metadata.

    LoHa and LoKr modules (LyCORIS) are listed with their algorithm and the rank loaders read (`lycoris_rank`).
    Warns about NaN/Inf tensors, all-zero up weights (the LoRA does nothing there), keys of no known kind and a
    stored `sshs_model_hash` that does not match the file (LyCORIS' own `0x` hash is named, not checked).

    Raises:
        LoraFileError: see `read_lora_file`; and a file that holds no LoRA module (a checkpoint, a VAE, another
            LyCORIS network), in one line saying what it looks like.
    """
    from sdlora.adapters.embeddings import split_bundle

    path = Path(path)
    sd, metadata = read_lora_file(path)
    bundle, sd = split_bundle(sd, path)
    refuse_other_networks(path, sd, lycoris=True)
    modules, unknown = group_lora_keys(sd)
    algos = {module: lycoris_algo(parts) for module, parts in modules.items()}
    complete = {m: not lycoris_missing(a, modules[m]) if a else "down" in modules[m] and "up" in modules[m]
                for m, a in algos.items()}
    if not any(complete.values()):
        from sdlora.models.single_file import describe_tensors

        kinds = "/".join(sorted({LYCORIS_NAMES[a] if a else "LoRA" for a in algos.values()}))
        what = f"{kinds} tensors without their pairs, e.g. {next(iter(modules))}" if modules else describe_tensors(sd)
        raise LoraFileError(f"{path}: holds no LoRA module (lora_down/lora_up or lora_A/lora_B pairs); it looks "
                            f"like {what}")
    warnings: list[str] = []
    try:
        arch = detect_arch(sd, metadata)
    except LoraFileError:
        arch = "unknown"
    lycoris = sorted({LYCORIS_NAMES[a] for a in algos.values() if a})
    if lycoris:
        lora = any(a is None and "down" in modules[m] for m, a in algos.items())
        fmt = f"LyCORIS {' + '.join(lycoris + (['LoRA'] if lora else []))} (kohya module names)"
    elif all(k.startswith(KOHYA_PREFIXES) for k in sd):
        dora = any(k.endswith(".dora_scale") for k in sd)
        fmt = "kohya (lora_down/lora_up)" + (" with DoRA dora_scale" if dora else "")
    else:
        fmt = "diffusers/peft" if any(".lora_A." in k for k in sd) else "other"
        if any(k.endswith(".lora_magnitude_vector") for k in sd):
            fmt += " with DoRA lora_magnitude_vector"

    for key, tensor in sd.items():
        if tensor.is_floating_point() and tensor.numel() and not torch.isfinite(tensor).all():
            warnings.append(f"{key} contains NaN/Inf")
    if unknown:
        warnings.append(f"{len(unknown)} keys are not LoRA weights, e.g. {unknown[0]!r}")

    # (component, block) -> Counter of (rank, alpha); rank None for a LoKr module without a low-rank factor
    groups: dict[tuple[str, str], Counter] = defaultdict(Counter)
    zero_up = []
    for module, parts in modules.items():
        algo = algos[module]
        if algo:
            missing = lycoris_missing(algo, parts)
            if missing:
                warnings.append(f"{module} has no {missing}")
            else:
                alpha = float(parts["alpha"].item()) if "alpha" in parts else None
                groups[_component_and_block(module)][(lycoris_rank(parts), alpha)] += 1
            continue
        down, up = parts.get("down"), parts.get("up")
        if down is None or up is None:
            warnings.append(f"{module} has no {'up' if up is None else 'down'} weight")
            continue
        rank = down.shape[0]
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(rank)
        groups[_component_and_block(module)][(rank, alpha)] += 1
        if not up.any():
            zero_up.append(module)
    if zero_up:
        warnings.append(f"{len(zero_up)} modules have an all-zero up weight (no effect), e.g. {zero_up[0]}")

    dtypes = Counter(str(t.dtype).removeprefix("torch.") for k, t in sd.items() if not k.endswith(".alpha"))
    lines = [
        f"LoRA file: {path.name} ({path.stat().st_size / 2**20:.2f} MiB)",
        f"Format: {fmt}; architecture: {arch}; dtype: {', '.join(dtypes) or '-'}",
        f"Modules: {sum(sum(c.values()) for c in groups.values())}",
    ]
    per_component: dict[str, int] = Counter()
    for (component, _), counter in groups.items():
        per_component[component] += sum(counter.values())
    for component in sorted(per_component, key=_component_order):
        lines.append(f"  {component}: {per_component[component]} modules")
        for (comp, block), counter in sorted(groups.items(), key=lambda kv: _block_order(kv[0])):
            if comp == component:
                lines.append(f"    {block:<22} {sum(counter.values()):>4} modules  {_ranks_text(counter)}")
    for word, vectors in bundle.items():  # pivotal tuning: A1111 loads them with the file
        lines.append(f"Bundled embedding: {word} ({next(iter(vectors.values())).shape[0]} vectors; "
                     f"{', '.join(vectors)})")
    lines += _metadata_lines(path, metadata, warnings)
    if warnings:
        lines.append("Warnings:")
        lines += [f"  ! {w}" for w in warnings]
    return "\n".join(lines)


def _component_and_block(module: str) -> tuple[str, str]:
    """(component, block label) of a module key, e.g. ("unet", "input_blocks_4"), ("text_encoder", "encoder")."""
    for prefix, component in (("lora_unet_", "unet"), ("unet.", "unet"), ("lora_te2_", "text_encoder_2"),
                              ("text_encoder_2.", "text_encoder_2"), ("lora_te1_", "text_encoder"),
                              ("lora_te_", "text_encoder"), ("text_encoder.", "text_encoder")):
        if module.startswith(prefix):
            rest = module[len(prefix):].replace(".", "_")
            break
    else:
        return "other", module.split(".")[0]
    if component == "unet":
        m = re.match(r"(down_blocks_\d+|up_blocks_\d+|mid_block|input_blocks_\d+|middle_block|output_blocks_\d+)", rest)
        return component, m[1] if m else rest
    return component, "encoder layers" if "layers_" in rest else rest


def _ranks_text(counter: Counter) -> str:
    """A block's (rank, alpha) -> count: each pair, or for ranks that vary per module (AdaLoRA, resize_lora.py's
    dynamic methods) their range, mean and alpha/rank, which a list of a dozen pairs would bury.

    A rank None is a LoKr module whose Kronecker factors are both full ("full", alpha unused); an alpha None a
    LyCORIS module without one (scale 1)."""
    if len(counter) <= 4 or any(r is None or a is None for r, a in counter):
        return ", ".join(("full" if r is None else f"rank {r}")
                         + ("" if r is None or a is None else f" alpha {_fmt(a)}")
                         + (f" (x{n})" if len(counter) > 1 else "")
                         for (r, a), n in sorted(counter.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1] or 0)))
    mean = sum(r * n for (r, _), n in counter.items()) / sum(counter.values())
    alphas, scales = {a for _, a in counter}, {round(a / r, 6) for r, a in counter if r}
    if len(alphas) == 1:
        alpha = f"alpha {_fmt(alphas.pop())}"
    else:
        alpha = f"alpha/rank {_fmt(scales.pop())}" if len(scales) == 1 else "alpha varies"
    return f"rank {min(r for r, _ in counter)}-{max(r for r, _ in counter)} (mean {mean:.1f}), {alpha}"


def _component_order(component: str) -> int:
    order = ("unet", "text_encoder", "text_encoder_2")
    return order.index(component) if component in order else len(order)


def _block_order(key: tuple[str, str]) -> tuple:
    component, block = key
    side = next((i for i, s in enumerate(("down", "input", "mid", "middle", "up", "output")) if block.startswith(s)), 9)
    number = re.search(r"\d+", block)
    return _component_order(component), side, int(number[0]) if number else -1, block


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def tag_frequency(metadata: Mapping[str, str]) -> Counter:
    """How often each caption tag occurs in the training captions, summed over the dataset folders (kohya's
    `ss_tag_frequency`: {folder: {tag: count}}); empty without it.

    Raises:
        ValueError: the field is not that JSON.
    """
    tags: Counter = Counter()
    try:
        for counts in json.loads(metadata.get("ss_tag_frequency", "{}")).values():
            tags.update(counts)
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        raise ValueError("ss_tag_frequency is not valid JSON") from None
    return tags


def _metadata_lines(path: Path, metadata: Mapping[str, str], warnings: list[str]) -> list[str]:
    if not metadata:
        return ["Metadata: none"]
    lines = [f"Metadata: {len(metadata)} keys"]
    shown = (
        ("modelspec.title", "title"), ("modelspec.architecture", "architecture"),
        ("ss_base_model_version", "base model version"), ("ss_sd_model_name", "trained on"),
        ("ss_network_dim", "network dim"), ("ss_network_alpha", "network alpha"), ("ss_network_args", "network args"),
        ("ss_steps", "steps"), ("ss_epoch", "epoch"), ("ss_num_train_images", "train images"),
        ("ss_resolution", "resolution"), ("ss_learning_rate", "learning rate"), ("ss_optimizer", "optimizer"),
        ("modelspec.trigger_phrase", "trigger phrase"), ("modelspec.author", "author"),
        ("modelspec.date", "date"), ("sshs_model_hash", "model hash"), ("sshs_legacy_hash", "legacy hash"),
    )
    lines += [f"  {label}: {metadata[key]}" for key, label in shown if key in metadata]
    try:
        tags = tag_frequency(metadata)
        if tags:
            lines.append("  top tags: " + ", ".join(f"{t} ({n})" for t, n in tags.most_common(10)))
    except ValueError as e:
        warnings.append(str(e))
    stored = metadata.get("sshs_model_hash")
    if stored and stored.startswith("0x"):
        # LyCORIS' hash (lycoris/utils precalculate_safetensors_hashes): sha256 over each tensor's bytes in the
        # order of its network's state_dict, which the file does not keep, so it cannot be recomputed from it.
        lines.append("  (model hash 0x...: LyCORIS' own, over its tensors in training order; not checked)")
    elif stored and stored != file_hashes(path)["sshs_model_hash"]:
        warnings.append("sshs_model_hash does not match the file's tensors (edited after export?)")
    return lines
