"""LoRA tools on files alone: merge several LoRAs into one, resize a LoRA, extract a LoRA from two checkpoints.

Merging and resizing work on the factors in the files and never load a base model. peft can combine adapters too
(`add_weighted_adapter`, with combination_type="svd" for a low-rank result), but only adapters injected into a
loaded base model, which for SDXL means reading gigabytes to change a file of megabytes, and only at one rank for
every module; here it is a few lines of torch.linalg (QR and SVD), documented where it happens, per module.
Extraction reads the two models and keeps the SVD of their difference on the modules training adapts.

Files are read with `files.read_lora_file` and written in the kohya format (`lora_unet_…`, `lora_te_…`) with
`export.save_kohya_state_dict` / `save_kohya_lora`, so the results load where the trainer's own files load.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdlora.adapters.embeddings import BUNDLE_PREFIX, split_bundle
from sdlora.adapters.export import (
    COMPONENTS,
    arch_metadata,
    kohya_module_name,
    kohya_module_tensors,
    lora_weights_from_tensors,
    metadata_number,
    save_kohya_lora,
    save_kohya_state_dict,
)
from sdlora.adapters.files import (
    KOHYA_PREFIXES,
    detect_arch,
    file_hashes,
    group_lora_keys,
    read_lora_file,
    unsupported_network_type,
)
from sdlora.adapters.lora import LoraWeights, target_module_names
from sdlora.errors import LoraFileError, ModelError
from sdlora.models.arch import ARCH_NAMES, component_names
from sdlora.models.loading import BaseModel

logger = logging.getLogger(__name__)

__all__ = [
    "LoraFile", "ModuleError", "ToolReport", "choose_rank", "extract_lora", "extract_lora_file",
    "factor_svd", "factors_2d", "merge_lora_files", "merge_loras", "read_lora", "require_arch",
    "resize_lora", "resize_lora_file", "save_lora_modules",
]


# --------------------------------------------------------------------------------------------------------------
# Reading LoRA files by kohya module name
# --------------------------------------------------------------------------------------------------------------

@dataclass
class LoraFile:
    """A LoRA file keyed by kohya module name (`lora_unet_…`), whatever key style the file used."""

    path: Path
    arch: str  # "sd1", "sd2" or "sdxl"
    modules: dict[str, LoraWeights]  # kohya module name -> fp32 weights
    metadata: dict[str, str]
    bundle: dict[str, torch.Tensor] = field(default_factory=dict)  # bundled embeddings' keys, carried to outputs

    @property
    def v_prediction(self) -> bool:
        """The file says it was trained on a v-prediction (SD 2.x 768-v) model."""
        return (self.metadata.get("modelspec.prediction_type") == "v"
                or self.metadata.get("ss_base_model_version", "").endswith("_v"))


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA file (kohya, LDM-named SDXL, diffusers/peft) into kohya-named modules, without a model.

    Merging and resizing match modules across files by name and write kohya files, so diffusers/peft names are
    converted to the kohya names `export` writes; SDXL's CLIP-L `lora_te_` is spelled `lora_te1_`.

    Raises:
        LoraFileError: unreadable file (see `read_lora_file`), another network type, keys that are not LoRA
            weights, an unknown architecture, or broken modules; the message names the file.
    """
    path = Path(path)
    tensors, metadata = read_lora_file(path)
    _, lora_tensors = split_bundle(tensors, path)
    # the bundled embeddings' tensors as the file has them, written into the outputs unchanged
    bundle = {key: value for key, value in tensors.items() if key not in lora_tensors}
    tensors = lora_tensors
    unsupported = unsupported_network_type(tensors)
    if unsupported:
        raise LoraFileError(f"{path}: a {unsupported[0]} network (e.g. key {unsupported[1]!r}), not a plain LoRA")
    groups, unknown = group_lora_keys(tensors)
    if unknown:
        raise LoraFileError(f"{path}: {len(unknown)} keys are not LoRA weights, e.g. {unknown[0]!r}")
    if not groups:
        raise LoraFileError(f"{path}: holds no LoRA tensors (lora_down/lora_up or lora_A/lora_B keys)")
    try:
        arch = detect_arch(tensors, metadata)
    except LoraFileError as e:
        raise LoraFileError(f"{path}: {e}") from None
    modules: dict[str, LoraWeights] = {}
    for key, parts in groups.items():
        name = _kohya_name(key, arch, path)
        if name in modules:
            raise LoraFileError(f"{path}: two keys name the same module {name}")
        weights = lora_weights_from_tensors(parts, f"{path}: module {key}")
        if weights.magnitude is not None:
            raise LoraFileError(f"{path}: a DoRA LoRA (dora_scale); merging, resizing and extracting work on plain "
                                "LoRA files, because DoRA's normalisation is not linear in the factors")
        if weights.up.numel() != weights.up.shape[0] * weights.rank:
            raise LoraFileError(f"{path}: module {key}: up {tuple(weights.up.shape)} is not [out, rank(, 1, 1)]")
        modules[name] = weights
    return LoraFile(path, arch, modules, metadata, bundle)


def _kohya_name(key: str, arch: str, path: Path) -> str:
    if key.startswith(KOHYA_PREFIXES):
        if arch == "sdxl" and key.startswith("lora_te_"):
            return "lora_te1_" + key.removeprefix("lora_te_")  # both mean CLIP-L (ComfyUI reads either)
        return key
    component, _, module = key.partition(".")
    if component in COMPONENTS and module:
        try:
            return kohya_module_name(component, module, arch)
        except ValueError as e:
            raise LoraFileError(f"{path}: module {key}: {e}") from None
    raise LoraFileError(f"{path}: key {key!r} is neither a kohya nor a diffusers/peft LoRA key")


def require_arch(path: str | Path, lora_arch: str, model_arch: str, model: str) -> None:
    """Raise LoraFileError (one line naming both architectures) when a LoRA is for another model family."""
    if lora_arch != model_arch:
        raise LoraFileError(f"{path}: a LoRA for {ARCH_NAMES[lora_arch]}, but {model} is {ARCH_NAMES[model_arch]}; "
                            "LoRAs only work on the model family they were trained for")


# --------------------------------------------------------------------------------------------------------------
# Linear algebra
# --------------------------------------------------------------------------------------------------------------

def factors_2d(weights: LoraWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in * kh * kw]) in fp32: a conv LoRA as the matrix product kohya's resize_lora.py uses.

    The delta is (alpha / r) * up @ down, reshaped to the weight's shape [out, in(, kh, kw)].
    """
    return weights.up.float().reshape(weights.up.shape[0], weights.rank), weights.down.float().reshape(weights.rank, -1)


def factor_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, Vh) of `up @ down` ([out, r] @ [r, n]), in float64, without forming the product.

    With up = Qu Ru and down^T = Qd Rd (QR), up @ down = Qu (Ru Rd^T) Qd^T, so only the small r x r core needs an
    SVD: exact, and O((out + n) r^2) instead of O(out * n * min(out, n)) for a dense SVD of an out x n matrix
    (a 3x3 conv is 9x wider still). S has at most r entries, in descending order.
    """
    qu, ru = torch.linalg.qr(up.double())
    qd, rd = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return qu @ u, s, vh @ qd.T


def choose_rank(singular_values: torch.Tensor, rank: int | None = None, energy: float | None = None) -> int:
    """The rank to keep: `rank` (at most the number of singular values), or the smallest rank whose singular
    values hold at least `energy` of the sum of squares (the squared Frobenius norm). At least 1.

    Raises:
        ValueError: neither or both of rank and energy, rank < 1, or energy outside (0, 1].
    """
    if (rank is None) == (energy is None):
        raise ValueError("choose_rank: give either rank or energy")
    available = max(1, len(singular_values))
    if rank is not None:
        if rank < 1:
            raise ValueError(f"rank must be at least 1, not {rank}")
        return min(rank, available)
    assert energy is not None  # exactly one of the two is set, checked above
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], not {energy}")
    cumulative = (singular_values.double() ** 2).cumsum(0)
    if not len(cumulative) or cumulative[-1] == 0:
        return 1
    # searchsorted (left) gives the first index whose cumulative energy reaches the target.
    k = int(torch.searchsorted(cumulative, cumulative[-1] * energy)) + 1
    return min(k, available)


def _truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, k], down [k, n]) of the rank-k truncation; sqrt(S) goes to both sides so neither factor is much
    larger than the other, which keeps fp16/bf16 files from rounding one side to zero or inf."""
    root = s[:k].clamp(min=0).sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


# --------------------------------------------------------------------------------------------------------------
# Error reports
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleError:
    """How well one written module reproduces its exact delta: Frobenius norms of the delta and of the error."""

    name: str
    rank_before: int  # input rank (sum of the inputs' ranks for a merge; full rank for an extraction)
    rank: int  # rank written
    norm: float  # ||exact delta||_F
    error: float  # ||exact delta - written delta||_F, with the factors as stored (dtype rounding included)

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm else 0.0


@dataclass
class ToolReport:
    """Per-module errors of a merge, resize or extraction, and notes (skipped modules, ...)."""

    action: str
    modules: list[ModuleError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def relative_error(self) -> float:
        """Overall relative Frobenius error: ||all errors|| / ||all deltas|| over every module."""
        norm = math.sqrt(sum(m.norm ** 2 for m in self.modules))
        return math.sqrt(sum(m.error ** 2 for m in self.modules)) / norm if norm else 0.0

    def summary(self, verbose: bool = False, worst: int = 5) -> str:
        """A readable report: ranks, overall and per-module relative error, the worst modules (or all)."""
        if not self.modules:
            return "\n".join([f"{self.action}: no modules", *self.notes])
        ranks = [m.rank for m in self.modules]
        before = sorted({m.rank_before for m in self.modules})
        errors = [m.relative_error for m in self.modules]
        rank_text = str(ranks[0]) if len(set(ranks)) == 1 else (
            f"{min(ranks)}-{max(ranks)} (mean {statistics.fmean(ranks):.1f})")
        lines = [
            f"{self.action}: {len(self.modules)} modules, rank {_span(before)} -> {rank_text}",
            f"relative Frobenius error: overall {self.relative_error:.3g}; per module min {min(errors):.3g}, "
            f"median {statistics.median(errors):.3g}, max {max(errors):.3g}",
        ]
        shown = self.modules if verbose else sorted(self.modules, key=lambda m: -m.relative_error)[:worst]
        lines.append("per module:" if verbose else f"largest errors ({len(shown)} of {len(self.modules)}; "
                                                   "--verbose lists all):")
        lines += [f"  {m.relative_error:9.3g}  rank {m.rank_before:>4} -> {m.rank:<4} {m.name}" for m in shown]
        return "\n".join(lines + self.notes)


def _span(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def _written(name: str, exact: torch.Tensor, up: torch.Tensor, down: torch.Tensor, alpha: float,
             shapes: tuple[tuple[int, ...], tuple[int, ...]], dtype: torch.dtype,
             rank_before: int) -> tuple[LoraWeights, ModuleError]:
    """The module as it will be stored (factors rounded to `dtype`, reshaped back to conv form) and its error
    against `exact`, the 2-D delta it should reproduce."""
    k = up.shape[1]
    up_q, down_q = up.to(dtype).double(), down.to(dtype).double()
    alpha = float(torch.tensor(alpha, dtype=torch.float32))  # .alpha is stored as fp32
    error = torch.linalg.matrix_norm(exact.double() - (alpha / k) * (up_q @ down_q)).item()
    up_shape, down_shape = shapes
    weights = LoraWeights(down=down_q.float().reshape(k, *down_shape),
                          up=up_q.float().reshape(up_shape[0], k, *up_shape[1:]), alpha=alpha)
    return weights, ModuleError(name, rank_before, k, torch.linalg.matrix_norm(exact.double()).item(), error)


def _shapes(weights: LoraWeights) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """((out, *up trailing dims), down trailing dims): what `_written` reshapes new factors back to."""
    return (weights.up.shape[0], *weights.up.shape[2:]), tuple(weights.down.shape[1:])


# --------------------------------------------------------------------------------------------------------------
# Merge several LoRAs into one, resize
# --------------------------------------------------------------------------------------------------------------

def merge_loras(sources: Sequence[tuple[LoraFile, float]], rank: int | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[dict[str, LoraWeights], ToolReport]:
    """One LoRA whose delta per module is sum_i weight_i * (alpha_i / r_i) * up_i @ down_i.

    Without `rank` the factors are concatenated (rank = sum of the ranks), which is exact: each source's
    weight * alpha / rank is folded into its factors (split as a square root between up and down, sign on up)
    and the result has scale 1 (one alpha for the file, see `_write_all`). With `rank`, the summed delta is cut to
    that rank by SVD.

    Args:
        sources: (file, weight) pairs, all for one architecture; weight 0 leaves a file out.
        rank: SVD rank per module (at most the summed rank), or None to concatenate.
        dtype: the dtype the factors will be stored in; the report's errors include its rounding.

    Returns:
        ({kohya module name: LoraWeights}, per-module errors against the exact weighted sum).

    Raises:
        LoraFileError: architectures differ, or a module has another shape in another file.
    """
    if not sources:
        raise ValueError("merge_loras: no LoRA files given")
    first = sources[0][0]
    for lora, _ in sources[1:]:
        require_arch(lora.path, lora.arch, first.arch, f"{first.path} (the first LoRA)")
    names = list(dict.fromkeys(name for lora, _ in sources for name in lora.modules))
    parts = []  # (name, exact delta, up, down, alpha, shapes, rank before), written once the file's alpha is known
    for name in tqdm(names, desc="merging", unit="module"):
        items = [(lora, weight, lora.modules[name]) for lora, weight in sources if name in lora.modules]
        _check_same_shape(name, [(lora.path, w) for lora, _, w in items])
        ups, downs, exact = [], [], None
        for _, weight, lw in items:
            scale = weight * lw.alpha / lw.rank
            if scale == 0:
                continue
            up, down = factors_2d(lw)
            term = scale * (up.double() @ down.double())
            exact = term if exact is None else exact + term
            root = math.sqrt(abs(scale))
            ups.append(up * math.copysign(root, scale))
            downs.append(down * root)
        if not ups:
            continue
        up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
        total_rank = up.shape[1]
        if rank is not None:
            u, s, vh = factor_svd(up, down)
            up, down = _truncate(u, s, vh, choose_rank(s, rank=rank))
        parts.append((name, exact, up, down, float(up.shape[1]), _shapes(items[0][2]), total_rank))
    if not parts:
        raise LoraFileError("merge: every LoRA has weight 0 (or alpha 0); nothing to merge")
    return _write_all(parts, dtype, ToolReport("merge" if rank is None else f"merge, SVD to rank {rank}"))


def _check_same_shape(name: str, items: list[tuple[Path, LoraWeights]]) -> None:
    shapes = {(w.up.shape[0], *w.down.shape[1:]) for _, w in items}
    if len(shapes) > 1:
        described = ", ".join(f"{path.name} {tuple((w.up.shape[0], *w.down.shape[1:]))}" for path, w in items)
        raise LoraFileError(f"module {name} has different shapes in the files ({described}); "
                            "they are not LoRAs for the same model")


def resize_lora(lora: LoraFile, rank: int | None = None, energy: float | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[dict[str, LoraWeights], ToolReport]:
    """Every module cut to a rank by SVD of its delta: a fixed `rank`, or per module the smallest rank keeping
    `energy` of the sum of squared singular values. Ranks never grow; keeping the full rank is lossless.

    Each module keeps its scale alpha / rank; the file gets one alpha (see `_write_all`).

    Returns:
        ({kohya module name: LoraWeights}, per-module errors against the input's delta).
    """
    choose_rank(torch.ones(1), rank, energy)  # argument errors before any work
    parts = []
    for name, lw in tqdm(lora.modules.items(), desc="resizing", unit="module"):
        up, down = factors_2d(lw)
        scale = lw.alpha / lw.rank
        u, s, vh = factor_svd(up, down)
        k = choose_rank(s, rank, energy)
        new_up, new_down = _truncate(u, s, vh, k)
        parts.append((name, scale * (up.double() @ down.double()), new_up, new_down, scale * k, _shapes(lw), lw.rank))
    action = f"resize to rank {rank}" if rank is not None else f"resize keeping {energy:g} of the energy"
    return _write_all(parts, dtype, ToolReport(action))


def _write_all(parts: list[tuple], dtype: torch.dtype, report: ToolReport) -> tuple[dict[str, LoraWeights], ToolReport]:
    """`_written` for every (name, exact, up, down, alpha, shapes, rank before), with ONE alpha for the file: the
    most common one, each module's remaining scale folded into its up factor. diffusers 0.42's kohya loader applies
    the most common alpha to every module (it mangles the names of the others), so per-module alphas, as kohya's
    resize_lora.py writes them, load mis-scaled there; every other loader reads the same delta either way."""
    alpha = Counter(part[4] for part in parts).most_common(1)[0][0]
    modules = {}
    for name, exact, up, down, own_alpha, shapes, rank_before in parts:
        modules[name], error = _written(name, exact, up * (own_alpha / alpha), down, alpha, shapes, dtype,
                                        rank_before)
        report.modules.append(error)
    return modules, report


def save_lora_modules(modules: Mapping[str, LoraWeights], path: str | Path, metadata: Mapping[str, str],
                      dtype: torch.dtype = torch.float16, bundle: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write kohya-named modules (and bundled embeddings' tensors, as read) as a kohya `.safetensors` file
    (atomically, with `sshs_*` hashes)."""
    tensors: dict[str, torch.Tensor] = dict(bundle or {})
    for name, weights in modules.items():
        tensors.update(kohya_module_tensors(name, weights, dtype))
    return save_kohya_state_dict(tensors, path, metadata)


def merge_lora_files(sources: Sequence[tuple[str | Path, float]], out: str | Path, rank: int | None = None,
                     dtype: torch.dtype = torch.float16) -> ToolReport:
    """`merge_loras` on files, written to `out` with the sources recorded in `sdlora_merged_from` (JSON: file
    name, weight, sshs_model_hash) and `modelspec.merged_from`."""
    out = _lora_output(out)
    loras = [(read_lora(path), float(weight)) for path, weight in sources]
    merged, report = merge_loras(loras, rank, dtype)
    first = loras[0][0]
    record = [{"file": lora.path.name, "weight": weight, "sshs_model_hash": _model_hash(lora)}
              for lora, weight in loras]
    how = "concatenated ranks" if rank is None else f"SVD to rank {rank}"
    metadata = _lora_metadata(merged, first.arch, first.v_prediction, out.stem, {
        "sdlora_merged_from": json.dumps(record),
        "modelspec.merged_from": ", ".join(lora.path.name for lora, _ in loras),
        "ss_training_comment": f"merged from {len(loras)} LoRAs ({how})",
    })
    save_lora_modules(merged, out, metadata, dtype, _joined_bundles([lora for lora, _ in loras]))
    return report


def _joined_bundles(loras: list[LoraFile]) -> dict[str, torch.Tensor]:
    """The embeddings the merged files bundle, each word once (weights do not apply to words).

    Raises:
        LoraFileError: two files bundle the same word with different vectors.
    """
    joined: dict[str, tuple[torch.Tensor, Path]] = {}
    for lora in loras:
        for key, value in lora.bundle.items():
            if key in joined and not torch.equal(joined[key][0], value):
                word = key[len(BUNDLE_PREFIX):].partition(".")[0]
                raise LoraFileError(f"{lora.path}: bundles the word {word!r} as {joined[key][1]} does, with other "
                                    "vectors; a merged file can hold one (rename it in one of them)")
            joined.setdefault(key, (value, lora.path))
    return {key: value for key, (value, _) in joined.items()}


def resize_lora_file(path: str | Path, out: str | Path, rank: int | None = None, energy: float | None = None,
                     dtype: torch.dtype = torch.float16) -> ToolReport:
    """`resize_lora` on a file, written to `out`. The input's metadata is kept, with ss_network_dim/alpha
    updated ("Dynamic" when ranks differ per module), and `sdlora_resized_from` added."""
    out = _lora_output(out)
    lora = read_lora(path)
    resized, report = resize_lora(lora, rank, energy, dtype)
    how = f"rank {rank}" if rank is not None else f"energy {energy:g}"
    old = {w.rank for w in lora.modules.values()}
    metadata = {
        **lora.metadata,
        **_lora_metadata(resized, lora.arch, lora.v_prediction, lora.metadata.get("modelspec.title") or out.stem),
        "ss_training_comment": f"resized ({how}) from rank {_span(sorted(old))}; relative Frobenius error "
                               f"{report.relative_error:.4g}",
        "sdlora_resized_from": json.dumps({"file": lora.path.name, "sshs_model_hash": _model_hash(lora),
                                           "rank": rank, "energy": energy}),
    }
    save_lora_modules(resized, out, metadata, dtype, lora.bundle)
    return report


def _lora_output(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise LoraFileError(f"{out}: LoRA files are written as .safetensors; give a name ending in .safetensors")
    return out


def _model_hash(lora: LoraFile) -> str:
    return lora.metadata.get("sshs_model_hash") or file_hashes(lora.path)["sshs_model_hash"]


def _lora_metadata(modules: Mapping[str, LoraWeights], arch: str, v_pred: bool, title: str,
                   extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """kohya `ss_network_*` and modelspec keys for a LoRA made by a tool (no training run to describe)."""
    ranks = {w.rank for w in modules.values()}
    alphas = {w.alpha for w in modules.values()}
    return {
        "ss_network_module": "networks.lora",
        # kohya's resize_lora.py writes "Dynamic" when modules have different ranks.
        "ss_network_dim": str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": metadata_number(next(iter(alphas))) if len(alphas) == 1 else "Dynamic",
        **arch_metadata(arch, v_pred),
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }


# --------------------------------------------------------------------------------------------------------------
# Extract a LoRA from two checkpoints
# --------------------------------------------------------------------------------------------------------------

def extract_lora(base: BaseModel, tuned: BaseModel, rank: int, targets: str = "attn", conv: bool = False,
                 dtype: torch.dtype = torch.float32, device: str | None = None
                 ) -> tuple[dict[str, dict[str, LoraWeights]], ToolReport]:
    """A LoRA approximating tuned - base on the modules training adapts, by truncated SVD of each difference.

    Args:
        base, tuned: two loaded models of one architecture (`models.load_base_model`).
        rank: rank per module (at most the weight's smaller side).
        targets: "attn", "attn_mlp" or "all", the training target sets (`lora.TARGETS`).
        conv: add the ResNet/sampler convs (LoCon) to the target set.
        dtype: the storage dtype; the report's errors include its rounding.
        device: where the SVDs run; default "cuda" when available.

    Returns:
        ({component: {module path: LoraWeights}} for `export.save_kohya_lora`, per-module errors). Modules whose
        weights are equal in both models are left out (noted in the report).

    Raises:
        ModelError: the architectures differ, a module's shapes differ, or nothing differs.
    """
    if base.arch != tuned.arch:
        raise ModelError(f"{tuned.path}: an {ARCH_NAMES[tuned.arch]} model, but the base {base.path} is "
                         f"{ARCH_NAMES[base.arch]}; extract needs two models of one architecture")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, not {rank}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    parts = {"unet": (base.unet, tuned.unet),
             **dict(zip(component_names(base.arch), zip(base.text_encoders, tuned.text_encoders)))}
    jobs = [(component, name) for component, (model, _) in parts.items()
            for name in _extract_targets(model, component, targets, conv)]
    layers: dict[str, dict[str, LoraWeights]] = {}
    report = ToolReport(f"extract at rank {rank}")
    unchanged = 0
    modules = {component: (dict(a.named_modules()), dict(b.named_modules())) for component, (a, b) in parts.items()}
    for component, name in tqdm(jobs, desc="extracting", unit="module"):
        before, after = modules[component][0][name].weight, getattr(modules[component][1].get(name), "weight", None)
        if after is None or before.shape != after.shape:
            found = "no such module" if after is None else tuple(after.shape)
            raise ModelError(f"{component} {name}: weight {tuple(before.shape)} in {base.path} but {found} in "
                             f"{tuned.path}; the models do not have the same layout")
        delta = (after.detach().float() - before.detach().float()).reshape(before.shape[0], -1)
        if not delta.any():
            unchanged += 1
            continue
        u, s, vh = (t.cpu() for t in torch.linalg.svd(delta.to(device), full_matrices=False))
        up, down = _truncate(u, s, vh, min(rank, len(s)))
        shapes = ((before.shape[0], *([1] * (before.dim() - 2))), tuple(before.shape[1:]))
        weights, error = _written(f"{component}.{name}", delta, up, down, float(up.shape[1]), shapes, dtype, len(s))
        layers.setdefault(component, {})[name] = weights
        report.modules.append(error)
    if not layers:
        raise ModelError(f"{base.path} and {tuned.path} have the same weights in all {len(jobs)} target modules; "
                         "nothing to extract")
    if unchanged:
        report.notes.append(f"{unchanged} of {len(jobs)} target modules are equal in both models and left out")
    return layers, report


def _extract_targets(model: torch.nn.Module, component: str, targets: str, conv: bool) -> list[str]:
    names = target_module_names(model, component, targets)
    if conv and component == "unet":
        # The conv set is what "all" adds to "attn_mlp" (lora.TARGETS), so --conv means exactly training's LoCon.
        skip = set(names) | set(target_module_names(model, component, "attn_mlp"))
        names += [n for n in target_module_names(model, component, "all") if n not in skip]
    return names


def extract_lora_file(base_model: str, tuned_model: str, out: str | Path, rank: int, targets: str = "attn",
                      conv: bool = False, dtype: torch.dtype = torch.float16,
                      allow_unsafe_pickle: bool = False) -> ToolReport:
    """`extract_lora` on two models (diffusers folders, single files or tiny names), written to `out` as kohya."""
    from sdlora.models.loading import load_base_model

    out = _lora_output(out)
    base = load_base_model(base_model, allow_unsafe_pickle=allow_unsafe_pickle)
    tuned = load_base_model(tuned_model, allow_unsafe_pickle=allow_unsafe_pickle)
    layers, report = extract_lora(base, tuned, rank, targets, conv, dtype)
    flat = {f"{c}.{n}": w for c, modules in layers.items() for n, w in modules.items()}
    network_args = {"targets": targets, "conv": conv}
    if conv:
        network_args.update(conv_dim=str(rank), conv_alpha=str(rank))
    base_name, tuned_name = Path(base_model).name, Path(tuned_model).name  # no absolute paths in shared files
    metadata = _lora_metadata(flat, base.arch, base.prediction_type == "v_prediction", out.stem, {
        "ss_network_args": json.dumps(network_args),
        "ss_sd_model_name": base_name,
        "ss_training_comment": f"extracted at rank {rank} from the difference of {tuned_name} and {base_name}; "
                               f"relative Frobenius error {report.relative_error:.4g}",
        "sdlora_extracted_from": json.dumps({"base": base_name, "tuned": tuned_name, "rank": rank,
                                             "targets": targets, "conv": conv}),
    })
    save_kohya_lora(layers, base.arch, out, metadata, dtype, unet_config=base.unet.config)
    return report
