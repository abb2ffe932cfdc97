"""Image generation with diffusers pipelines: samplers, LoRA files with weights (loaded once, blended by weight),
A1111-compatible PNG metadata, and `generate_images`, the one function behind `sdlora generate` and the app.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from sdlora.atomic import atomic_path
from sdlora.config import SAMPLERS, SampleConfig
from sdlora.errors import GenerationError, LoraFileError
from sdlora.generate.prompt import LoraTag, encode_prompt_embeds, parse_lora_tags
from sdlora.models.arch import ARCH_NAMES
from sdlora.models.loading import BaseModel, load_base_model, side_length

logger = logging.getLogger(__name__)



@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = 1
    sampler: str = "euler"
    clip_skip: int = 1  # A1111's "Clip skip": read the prompt this many layers from the text encoder's end


def make_scheduler(sampler: str, scheduler_config: dict):
    """A diffusers scheduler for `sampler`, built from the base model's scheduler config (betas, prediction type)."""
    import diffusers

    spec = SAMPLERS[sampler]
    return getattr(diffusers, spec.scheduler).from_config({**scheduler_config, **spec.config})


def build_pipeline(arch: str, unet, vae, text_encoders: list, tokenizers: list, scheduler_config: dict,
                   sampler="euler"):
    """A StableDiffusion(XL)Pipeline around already-loaded modules (no copies), e.g. the ones being trained."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = make_scheduler(sampler, scheduler_config)
    if arch == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1], tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0], unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def load_pipeline(base_model: str, device: str = "cpu", dtype: torch.dtype = torch.float32, vae: str = "",
                  allow_unsafe_pickle: bool = False):
    """Load a base model (tiny model name, diffusers folder or single-file checkpoint) as a pipeline on `device`."""
    base = load_base_model(base_model, vae=vae, allow_unsafe_pickle=allow_unsafe_pickle)
    pipe = build_pipeline(base.arch, base.unet, base.vae, base.text_encoders, base.tokenizers, base.scheduler_config)
    pipe.sdlora_arch = base.arch
    pipe.sdlora_scheduler_config = base.scheduler_config
    return pipe.to(device, dtype)


def default_device() -> tuple[str, torch.dtype]:
    """("cuda", fp16) when a GPU is there, else ("cpu", fp32): what `sdlora generate` and the app use."""
    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


def model_label(model: str) -> str:
    """The name A1111 writes as `Model:`: a tiny model's name, a folder's name, a file's name without suffix."""
    path = Path(model.rstrip("/\\"))
    return path.stem if path.suffix.lower() in (".safetensors", ".ckpt") else path.name


def default_size(pipe) -> int:
    """The side length the pipeline's base model was trained at (`models.side_length`)."""
    return side_length(pipe.unet.config, pipe.vae.config)


def generate(pipe, params: GenerationParams, sampler_config: dict | None = None) -> Image.Image:
    """Render one image; the same params and seed give the same image.

    The prompt is encoded A1111-style (`prompt.encode_prompt_embeds`): prompts over 75 tokens are encoded in
    75-token chunks instead of being cut off; shorter ones give exactly the pipeline's own embeddings.
    `<lora:...>` tags are not read here (see `generate_images`).
    """
    return generate_batch(pipe, params, 1, sampler_config)[0]


def generate_batch(pipe, params: GenerationParams, batch_size: int,
                   sampler_config: dict | None = None) -> list[Image.Image]:
    """Render `batch_size` images in one pipeline call (A1111's batch size), with the seeds params.seed,
    params.seed + 1, ...: each image's noise comes from its own seed, so an image is the one `generate` draws
    with that seed (up to the float rounding of a larger batch).
    """
    config = sampler_config
    if config is None:
        config = getattr(pipe, "sdlora_scheduler_config", pipe.scheduler.config)
    pipe.scheduler = make_scheduler(params.sampler, dict(config))
    generators = [torch.Generator("cpu").manual_seed(params.seed + i) for i in range(batch_size)]
    return pipe(
        **encode_prompt_embeds(pipe, params.prompt, params.negative_prompt, params.clip_skip),
        num_inference_steps=params.steps,
        guidance_scale=params.cfg,
        width=params.width,
        height=params.height,
        generator=generators,
        num_images_per_prompt=batch_size,
    ).images


def parse_sample_prompt(line: str, defaults: GenerationParams) -> GenerationParams:
    """A kohya sample-prompt line: `prompt --n negative --w 512 --h 768 --d seed --l cfg --s steps`."""
    parts = line.split(" --")
    params = replace(defaults, prompt=parts[0].strip())
    fields = {"n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
              "l": ("cfg", float), "s": ("steps", int)}
    for part in parts[1:]:
        flag, _, value = part.partition(" ")
        if flag in fields:
            name, kind = fields[flag]
            params = replace(params, **{name: kind(value.strip())})
    return params


@torch.no_grad()
def render_samples(base: BaseModel, unet, encoders: list, s: SampleConfig, resolution: int, folder: Path,
                   tag: str) -> list[Path]:
    """Render the `[sample]` prompts with these modules as they are now (the adapters being trained active), at
    `resolution` where the table says 0; returns the PNG paths (`<tag>-<i>.png` in `folder`)."""
    pipe = build_pipeline(base.arch, unet, base.vae, encoders, base.tokenizers, base.scheduler_config, s.sampler)
    pipe.set_progress_bar_config(disable=True)
    was_training = [m.training for m in [unet, *encoders]]
    for m in [unet, *encoders]:
        m.eval()
    defaults = GenerationParams(prompt="", steps=s.steps, cfg=s.cfg, seed=s.seed, sampler=s.sampler,
                                width=s.width or resolution, height=s.height or resolution)
    paths = []
    for i, line in enumerate(s.prompts):
        params = parse_sample_prompt(line, defaults)
        image = generate(pipe, params, base.scheduler_config)
        # A clip-skipped training model's encoder is cut already (loading.cut_text_encoder): only the text says it.
        labelled = replace(params, clip_skip=base.clip_skip or 1)
        paths.append(save_png(image, folder / f"{tag}-{i:02d}.png", a1111_parameters(labelled, base.name)))
    for m, training in zip([unet, *encoders], was_training):
        m.train(training)
    return paths


def a1111_parameters(params: GenerationParams, model_name: str = "", model_hash: str = "",
                     lora_hashes: dict[str, str] | None = None, vae_name: str = "", batch_size: int = 1,
                     batch_pos: int = 0) -> str:
    """The PNG `parameters` text A1111 writes, which model sites parse to credit models and LoRAs.

    `vae_name`: a VAE used instead of the model's own (`VAE:`); `batch_size` > 1 adds A1111's `Batch size` and
    `Batch pos` (the image's place in its batch; its seed is the batch's first seed + pos)."""
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    fields = [
        f"Steps: {params.steps}", f"Sampler: {SAMPLERS[params.sampler].a1111}",
    ]
    if SAMPLERS[params.sampler].schedule:  # A1111 1.9+ writes it as its own field
        fields.append(f"Schedule type: {SAMPLERS[params.sampler].schedule}")
    fields += [f"CFG scale: {params.cfg:g}", f"Seed: {params.seed}", f"Size: {params.width}x{params.height}"]
    if model_hash:
        fields.append(f"Model hash: {model_hash[:10]}")
    if model_name:
        fields.append(f"Model: {model_name}")
    if vae_name:
        fields.append(f"VAE: {vae_name}")
    if params.clip_skip > 1:  # A1111 writes it only when it is not 1
        fields.append(f"Clip skip: {params.clip_skip}")
    if batch_size > 1:
        fields += [f"Batch size: {batch_size}", f"Batch pos: {batch_pos}"]
    if lora_hashes:
        fields.append('Lora hashes: "' + ", ".join(f"{n}: {h[:12]}" for n, h in lora_hashes.items()) + '"')
    lines.append(", ".join(fields))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    """Save atomically with the A1111 `parameters` text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)



# A1111 sampler names -> ours. A1111 before 1.9 wrote the schedule into the name: "DPM++ 2M Karras".
A1111_SAMPLERS = ({s.a1111: key for key, s in SAMPLERS.items()}
                  | {f"{s.a1111} {s.schedule}": key for key, s in SAMPLERS.items() if s.schedule})
_PARAM_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param


def parse_a1111_parameters(text: str, defaults: GenerationParams | None = None
                           ) -> tuple[GenerationParams, dict[str, str]]:
    """Read A1111's PNG `parameters` text back (the inverse of `a1111_parameters`).

    Args:
        text: the text chunk: prompt lines, an optional `Negative prompt:` block, then the `Steps: ...` line.
        defaults: values for fields the text lacks.

    Returns:
        (the parameters; every `key: value` field of the last line, as text, e.g. {"Lora hashes": "a: 0123..."}).
        A sampler we do not have keeps the default and is reported as extras["unknown sampler"].
    """
    params = replace(defaults or GenerationParams(prompt=""), prompt="", negative_prompt="")
    lines = text.strip().split("\n")
    fields: dict[str, str] = {}
    if lines and len(_PARAM_FIELD.findall(lines[-1])) >= 3:
        for key, value in _PARAM_FIELD.findall(lines.pop()):
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            fields[key.strip()] = value
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    params = replace(params, prompt="\n".join(prompt), negative_prompt="\n".join(negative))
    converters = {"Steps": ("steps", int), "CFG scale": ("cfg", float), "Seed": ("seed", int),
                  "Clip skip": ("clip_skip", int)}
    for key, (name, kind) in converters.items():
        with contextlib.suppress(KeyError, ValueError):
            params = replace(params, **{name: kind(fields[key])})
    width, _, height = fields.get("Size", "").partition("x")
    if width.isdigit() and height.isdigit():
        params = replace(params, width=int(width), height=int(height))
    if "Sampler" in fields:
        sampler = fields["Sampler"]
        schedule = fields.get("Schedule type", "Automatic")
        if schedule != "Automatic":
            sampler = f"{sampler} {schedule}"  # "DPM++ 2M" + "Karras" -> "DPM++ 2M Karras"
        key = A1111_SAMPLERS.get(sampler)
        if key is None:
            fields["unknown sampler"] = sampler
        else:
            params = replace(params, sampler=key)
    return params, fields



def check_params(params: GenerationParams, count: int = 1) -> None:
    """Raise GenerationError for settings the pipelines would reject late or mysteriously."""
    problems = []
    if params.sampler not in SAMPLERS:
        problems.append(f"sampler {params.sampler!r} is not one of {', '.join(SAMPLERS)}")
    for name in ("width", "height"):
        value = getattr(params, name)
        if value < 64 or value > 4096 or value % 8:
            problems.append(f"{name} {value} must be a multiple of 8 between 64 and 4096")
    if params.clip_skip < 1:
        problems.append(f"clip skip {params.clip_skip} must be at least 1 (1 = the text encoder's last layer)")
    if not 1 <= params.steps <= 500:
        problems.append(f"steps {params.steps} must be between 1 and 500")
    if params.sampler == "lcm" and params.steps > 50:
        problems.append("the lcm sampler takes at most 50 steps (2-8 is typical)")
    if not 1 <= count <= 1000:
        problems.append(f"count {count} must be between 1 and 1000")
    if problems:
        raise GenerationError("; ".join(problems))


@dataclass
class LoraSpec:
    """A LoRA file and its weights; te_weight None means the same as unet_weight."""

    path: Path
    unet_weight: float = 1.0
    te_weight: float | None = None

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def tag(self) -> LoraTag:
        te = self.unet_weight if self.te_weight is None else self.te_weight
        return LoraTag(self.name, unet_weight=self.unet_weight, te_weight=te)


class LoraCache:
    """LoRA files loaded into one pipeline, each once, as named peft adapters; weights switch without reloading.

    Switching weights is `pipe.set_adapters` (a scale per adapter and component), so moving a slider costs
    nothing and never touches the base model. A file that changes on disk (retrained) is loaded again.
    When every weight is 0 the adapters are disabled altogether, so the image is the base model's, bit for bit.
    LoHa and LoKr files (LyCORIS) load as peft adapters too (`adapters.lycoris.load_lycoris`), so the same calls
    switch, weigh and blend them with LoRA files; a file with several kinds of module gets an adapter per kind.
    A module of a file that matches nothing in the model is left out with a note (`notes`), or with `strict`
    refused: never dropped silently, whichever way the file is loaded.
    Embeddings bundled in a file (pivotal tuning, `bundle_emb.*`) load with it as A1111 loads them: their words
    work in prompts while the file is loaded, whatever its weight; with `embeddings` False they are left out with a
    note. Standalone embedding files load with `embed`. Files that bundle the same word (the epochs of one run, in
    a grid) each get their own vectors: `activate` loads the active files' vectors of each word.
    """

    def __init__(self, pipe, strict: bool = False, embeddings: bool = True):
        self.pipe = pipe
        self.strict = strict
        self.embeddings = embeddings
        self._bundles: dict[Path, dict[str, dict[str, torch.Tensor]]] = {}  # file -> {word: {component: vectors}}
        self._word_source: dict[str, Path] = {}  # word -> the file whose vectors the pipeline holds now
        self._embedding_stamps: dict[Path, tuple[int, int]] = {}  # standalone embedding file -> (mtime_ns, size)
        self.notes: dict[Path, str] = {}  # file -> what was left out of it when it was loaded
        # file -> (its adapter names, (mtime_ns, size))
        self._adapters: dict[Path, tuple[tuple[str, ...], tuple[int, int]]] = {}
        self._count = 0
        self.load_seconds: dict[Path, float] = {}  # the last load time of each file
        self._hashes: dict[Path, tuple[tuple[int, int], str]] = {}
        # LyCORIS adapter -> (algorithm, {component: {module: {part: tensor}}}, file), to load it again (_lift)
        self._lycoris: dict[str, tuple[str, dict[str, dict[str, dict[str, torch.Tensor]]], str]] = {}

    def load(self, path: str | Path) -> tuple[str, ...]:
        """Load a LoRA, LoHa or LoKr file (once) and return its adapter names: one per kind of module it holds.

        Raises:
            LoraFileError: not a safetensors LoRA (missing, truncated, a pickle), another network type (OFT, a full
                weight difference, ...), another architecture than the pipeline's, keys/shapes that do not fit the
                model, or with `strict` modules that match nothing in it. The pipeline is left as it was.
        """
        from sdlora.adapters.embeddings import split_bundle
        from sdlora.adapters.export import match_lora_keys
        from sdlora.adapters.files import (
            detect_arch,
            lycoris_algo,
            read_lora_file,
            refuse_other_networks,
            split_lora_key,
        )
        path = Path(path).resolve()
        stamp = _stamp(path)
        if path in self._adapters:
            names, loaded_stamp = self._adapters[path]
            if loaded_stamp == stamp:
                return names
            for name in names:
                self._delete(name)
            del self._adapters[path]
            self.notes.pop(path, None)
            self._forget_words(path)
        started = time.perf_counter()
        tensors, metadata = read_lora_file(path)
        bundle, tensors = split_bundle(tensors, path)
        refuse_other_networks(path, tensors, lycoris=True)
        if not any(split_lora_key(key) for key in tensors):
            raise LoraFileError(f"{path}: holds no LoRA tensors (lora_down/lora_up or lora_A/lora_B keys)")
        arch = getattr(self.pipe, "sdlora_arch", None)
        try:
            lora_arch = detect_arch(tensors, metadata)
        except LoraFileError:  # nothing tells the architecture: let diffusers match the keys
            lora_arch = None
        if arch and lora_arch and lora_arch != arch:
            raise LoraFileError(f"{path}: a LoRA for {ARCH_NAMES[lora_arch]}, but the base model is "
                                f"{ARCH_NAMES[arch]}; pick a LoRA trained on this model family")
        module_names = {part: [n for n, _ in getattr(self.pipe, part).named_modules()]
                        for part in self.pipe._lora_loadable_modules if getattr(self.pipe, part, None) is not None}
        matched, unmatched = match_lora_keys(tensors, module_names)
        self._strays(path, unmatched, len(matched))
        # LyCORIS modules: {algorithm: {component: {module: {part: tensor}}}}, each algorithm an adapter of its own.
        lycoris: dict[str, dict[str, dict[str, dict[str, torch.Tensor]]]] = {}
        for (component, module), keys in matched.items():
            algo = lycoris_algo(keys)
            if algo:
                parts = {kind: tensors[key] for kind, key in keys.items()}
                lycoris.setdefault(algo, {}).setdefault(component, {})[module] = parts
        tensors = {key: tensors[key] for keys in matched.values() if not lycoris_algo(keys) for key in keys.values()}
        if _misread_by_diffusers(tensors):
            tensors = _as_peft(tensors, module_names, path)
        self._count += 1
        name = f"sdlora{self._count}_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)[:40]}"
        names = ((name,) if tensors else ()) + tuple(f"{name}_{algo}" for algo in lycoris)
        try:
            if tensors:
                with self._lift(), _quiet_diffusers():
                    self.pipe.load_lora_weights(tensors, adapter_name=name)
            for algo, components in lycoris.items():
                self._lycoris[f"{name}_{algo}"] = (algo, components, str(path))
                self._load_lycoris(f"{name}_{algo}")
            # What diffusers' own conversion or peft dropped on the way counts as stray too.
            adapted = self._adapted(names)
            dropped = [next(iter(keys.values())) for target, keys in matched.items() if target not in adapted]
            note = self._strays(path, unmatched + dropped, len(matched) - len(dropped))
            if bundle and self.embeddings:
                self._bundles[path] = bundle
                self._use_words(path)
            elif bundle:
                left_out = (f"{path.name}: its bundled embeddings ({', '.join(bundle)}) are left out; load the "
                            "standalone files from the run's embeddings/ folder")
                note = f"{note}; {left_out}" if note else left_out
        except LoraFileError:
            for adapter in names:
                self._delete(adapter)
            raise
        except Exception as e:  # diffusers/peft raise ValueError, RuntimeError (shapes), KeyError, ...
            for adapter in names:
                self._delete(adapter)
            if type(e).__name__ == "NoMatchingPeftModuleError":
                reason = "none of its module names exist in this base model"
            else:
                reason = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
            raise LoraFileError(f"{path}: does not fit this base model ({reason})") from None
        if note:
            self.notes[path] = note
        self._adapters[path] = (names, stamp)
        self.load_seconds[path] = time.perf_counter() - started
        logger.info(f"loaded {path.name} in {self.load_seconds[path]:.2f} s")
        return names

    def embed(self, path: str | Path) -> list[str]:
        """Load a standalone embedding file (once; again when it changes), its word its file name as A1111 and
        ComfyUI name it; returns its words.

        Raises:
            LoraFileError: not a safetensors embedding file, its word is loaded already, or it is for another model
                family.
        """
        from sdlora.adapters.embeddings import read_embedding_file
        from sdlora.adapters.files import read_lora_file

        path = Path(path).resolve()
        stamp = _stamp(path)
        if self._embedding_stamps.get(path) != stamp:
            tensors, _ = read_lora_file(path)
            self._forget_words(path)
            self._bundles[path] = {path.stem: read_embedding_file(tensors, path)}
            self._embedding_stamps[path] = stamp
        self._use_words(path)
        return list(self._bundles[path])

    def _use_words(self, path: Path) -> None:
        """Make the pipeline hold `path`'s vectors of each word it bundles (another file's are unloaded first).

        Raises:
            LoraFileError: see `adapters.embeddings.load_words`.
        """
        from sdlora.adapters.embeddings import load_words

        for word, vectors in self._bundles.get(path, {}).items():
            if self._word_source.get(word) == path:
                continue
            if word in self._word_source:
                self._unload_word(word)
            load_words(self.pipe, {word: vectors}, str(path))
            self._word_source[word] = path

    def _forget_words(self, path: Path) -> None:
        """Drop a file's bundled words, unloading those the pipeline holds from it."""
        for word in self._bundles.pop(path, {}):
            if self._word_source.get(word) == path:
                self._unload_word(word)
        self._embedding_stamps.pop(path, None)

    def _unload_word(self, word: str) -> None:
        from sdlora.adapters.embeddings import unload_word

        del self._word_source[word]
        unload_word(self.pipe, word)

    def _strays(self, path: Path, unmatched: list[str], matched: int) -> str | None:
        """The note on a file's modules that match nothing in the model (`unmatched` keys), if any.

        Raises:
            LoraFileError: nothing matches, or with `strict` anything does not.
        """
        from sdlora.adapters.export import stray_message

        if not matched:
            raise LoraFileError(f"{path}: none of its modules exist in this base model (is it a LoRA for another "
                                "model?)")
        if not unmatched:
            return None
        if self.strict:
            raise LoraFileError(f"{path}: {stray_message(unmatched, matched)}; refused (--strict), as it would load "
                                "only in part")
        return f"{path.name}: {stray_message(unmatched, matched)}; they are left out (--strict refuses such files)"

    @contextlib.contextmanager
    def _lift(self):
        """The LyCORIS adapters taken off the pipeline's models while the block runs and loaded again after it
        (`adapters.lycoris.remove_lycoris` says why)."""
        from sdlora.adapters.lycoris import remove_lycoris

        for model in self._models().values():
            remove_lycoris(model)
        try:
            yield
        finally:
            for adapter in self._lycoris:
                self._load_lycoris(adapter)

    def _load_lycoris(self, adapter: str) -> None:
        from sdlora.adapters.lycoris import load_lycoris

        algo, components, label = self._lycoris[adapter]
        models = self._models()
        with _quiet_diffusers():
            for component, modules in components.items():
                load_lycoris(models[component], adapter, algo, modules, label)

    def _models(self) -> dict[str, torch.nn.Module]:
        """The pipeline's models that take adapters: {"unet": ..., "text_encoder": ...[, "text_encoder_2": ...]}."""
        return {part: getattr(self.pipe, part) for part in self.pipe._lora_loadable_modules
                if getattr(self.pipe, part, None) is not None}

    def _adapted(self, adapters: tuple[str, ...]) -> set[tuple[str, str]]:
        """(component, module name) of every module that holds a peft layer (LoRA, LoHa, LoKr) of these adapters;
        a layer wrapped by another adapter's (`name.base_layer`) counts for the module `name`."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        return {(part, re.sub(r"(\.base_layer)+$", "", n)) for part, model in self._models().items()
                for n, module in model.named_modules() if isinstance(module, BaseTunerLayer)
                and any(a in getattr(module, kind) for kind in module.adapter_layer_names for a in adapters)}

    def model_hash(self, path: str | Path) -> str:
        """The file's `sshs_model_hash` (A1111's "Lora hashes" use its first 12 hex), computed once per file."""
        path = Path(path).resolve()
        stamp = (path.stat().st_mtime_ns, path.stat().st_size)
        if self._hashes.get(path, (None,))[0] != stamp:
            from sdlora.adapters.files import file_hashes

            self._hashes[path] = (stamp, file_hashes(path)["sshs_model_hash"])
        return self._hashes[path][1]

    def activate(self, loras: list[LoraSpec]) -> None:
        """Make exactly these LoRAs active with their weights (loading files not loaded yet).

        The same file listed twice adds its weights, as two identical A1111 tags do. Active adapters are
        ordered by file path, not by the order given: peft adds their outputs in that order, and floating-point
        sums depend on it, so sliders, tags and the CLI give the same bits whatever the order.
        """
        weights: dict[Path, list] = {}
        for spec in loras:
            names = self.load(spec.path)
            te = spec.unet_weight if spec.te_weight is None else spec.te_weight
            _, unet_total, te_total = weights.get(Path(spec.path).resolve(), (names, 0.0, 0.0))
            weights[Path(spec.path).resolve()] = [names, unet_total + spec.unet_weight, te_total + te]
        for path in sorted(weights, key=str):  # a word in several listed files: the last file's vectors
            self._use_words(path)
        active = [(name, u, te) for path in sorted(weights, key=str) if weights[path][1:] != [0.0, 0.0]
                  for names, u, te in [weights[path]] for name in names]
        if not self._adapters:
            return
        if not active:
            self.pipe.disable_lora()  # weight 0 everywhere: the base model exactly, not base + 0 * delta
            return
        self.pipe.enable_lora()
        parts = self.pipe.get_list_adapters()  # {"unet": [names], "text_encoder": [names], ...}
        per_adapter = [
            {part: (u if part == "unet" else te) for part, names in parts.items() if name in names}
            for name, u, te in active
        ]
        self.pipe.set_adapters([name for name, _, _ in active], per_adapter)

    def _delete(self, name: str) -> None:
        """Remove an adapter, also a half-loaded one, leaving the rest of the pipeline as it was."""
        self._lycoris.pop(name, None)
        for part in self.pipe._lora_loadable_modules:
            model = getattr(self.pipe, part, None)
            if model is None or name not in getattr(model, "peft_config", {}):
                continue
            with contextlib.suppress(Exception), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # peft: "Adapter ... was active which is now deleted"
                self.pipe.delete_adapters([name])


def _stamp(path: Path) -> tuple[int, int]:
    """(mtime_ns, size) of a file, (0, 0) when there is none: a file loaded again when it changes on disk."""
    stat = path.stat() if path.is_file() else None
    return (stat.st_mtime_ns, stat.st_size) if stat else (0, 0)


def _misread_by_diffusers(tensors: dict[str, torch.Tensor]) -> bool:
    """True for kohya files diffusers 0.42 loads wrongly: DoRA files (its SD/SDXL converter drops `.dora_scale`,
    with a warning) and files whose modules have different alphas (kohya's resize_lora.py): it mangles the names
    of the alphas that differ from the most common one and applies that one to every module."""
    alphas = {float(value) for key, value in tensors.items() if key.endswith(".alpha")}
    return len(alphas) > 1 or any(key.endswith(".dora_scale") for key in tensors)


def _as_peft(tensors: dict[str, torch.Tensor], module_names: dict[str, list[str]],
             path: Path) -> dict[str, torch.Tensor]:
    """The file mapped onto the pipeline's modules by our own reader and handed over in peft's format, which
    diffusers loads exactly: each alpha / rank folded into lora_B, DoRA's magnitude as `lora_magnitude_vector`."""
    from sdlora.adapters.export import from_kohya_state_dict, to_peft_state_dict

    try:
        return to_peft_state_dict(from_kohya_state_dict(tensors, module_names), torch.float32)
    except LoraFileError as e:
        raise LoraFileError(f"{path}: {e}") from None


@contextlib.contextmanager
def _quiet_diffusers():
    """Silence what diffusers/peft say on every second adapter (a 'missing keys' list for the other adapters
    and 'Already found a peft_config'): noise for us, since loading several named adapters is the point; and
    their messages about a failed load, which LoraCache re-raises as one LoraFileError line."""
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.CRITICAL)  # failures are re-raised as LoraFileError with one line
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*peft_config.*")
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            yield
    finally:
        diffusers_logger.setLevel(level)


def list_lora_files(folder: str | Path) -> list[Path]:
    """The LoRA files under `folder`, recursively, sorted: *.safetensors outside hidden folders, training
    checkpoints (`checkpoint-N/` holds resumable state, not LoRA files) and a run's `embeddings/` (pivotal tuning's
    standalone embeddings); symlinks that lead out of `folder` are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    root = folder.resolve()
    found = []
    for path in folder.rglob("*.safetensors"):
        parts = path.relative_to(folder).parts
        if any(p.startswith(".") or re.fullmatch(r"checkpoint-\d+", p) for p in parts) or "embeddings" in parts[:-1]:
            continue
        if path.is_file() and path.resolve().is_relative_to(root):  # no symlinks out of the folder
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def embeddings_named(folder: str | Path, *texts: str) -> list[Path]:
    """The embedding files under `folder` (recursively, not through hidden folders or symlinks out of it) whose
    file name appears as a word in one of `texts`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    root = folder.resolve()
    words = {w for text in texts for w in re.findall(r"[^\s,()\[\]{}:|]+", text.lower())}
    return sorted(path for path in folder.rglob("*.safetensors")
                  if path.stem.lower() in words and not any(p.startswith(".") for p in path.relative_to(folder).parts)
                  and path.resolve().is_relative_to(root))


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    parameters: list[str]  # the A1111 text saved in each PNG
    paths: list[Path] = field(default_factory=list)  # empty when nothing was saved
    warnings: list[str] = field(default_factory=list)
    load_seconds: float = 0.0  # LoRA files loaded for this call (0 when all were cached)
    loras: list[LoraSpec] = field(default_factory=list)  # those applied: lora_specs, then the prompt's tags
    generate_seconds: float = 0.0


def generate_images(pipe, loras: LoraCache, params: GenerationParams, lora_specs: Sequence[LoraSpec] = (),
                    count: int = 1, out_dir: str | Path | None = None, lora_dir: str | Path | None = None,
                    model_name: str = "", batch_size: int = 1, vae_name: str = "",
                    embedding_dir: str | Path | None = None) -> GenerationResult:
    """Render `count` batches of `batch_size` images (seeds seed, seed+1, ... across all of them, as A1111 numbers
    them) with LoRAs; what `sdlora generate` and the app both call.

    Args:
        pipe: a pipeline from `load_pipeline`.
        loras: the pipeline's LoraCache (files stay loaded between calls).
        params: the settings; the prompt may hold A1111 `<lora:name:weight>` tags and any number of tokens.
            A negative seed picks a random one.
        lora_specs: LoRA files with weights, on top of the prompt's tags.
        count: number of batches (A1111's batch count).
        batch_size: images per pipeline call (A1111's batch size; more memory, less time per image).
        out_dir: save each PNG here (`00001-<seed>.png`, A1111 `parameters` with `Lora hashes`), or None.
        lora_dir: where `<lora:name>` tags are looked up (by file stem, recursively); names also match the
            stems of `lora_specs`.
        model_name: written as `Model:` in the PNG parameters.
        vae_name: the VAE used instead of the model's own, written as `VAE:` ("" = the model's own).
        embedding_dir: the embeddings (`.safetensors`, recursively) whose file name the prompt or negative prompt
            holds as a word are loaded, as A1111 finds them in its embeddings folder.

    Returns:
        Images, seeds, the saved parameters and paths, warnings (malformed or unknown tags, modules of a LoRA
        file that match nothing in the model) and timings.

    Raises:
        GenerationError: impossible settings. LoraFileError: a LoRA file cannot be used (see LoraCache.load).
    """
    if not 1 <= batch_size <= 64:
        raise GenerationError(f"batch size {batch_size} must be between 1 and 64")
    check_params(params, count * batch_size)
    clean_prompt, tags, notes = parse_lora_tags(params.prompt)
    specs = list(lora_specs)
    known = {Path(s.path).stem: Path(s.path) for s in specs}
    if tags and lora_dir is not None:
        for path in list_lora_files(lora_dir):
            known.setdefault(path.stem, path)
            known.setdefault(path.relative_to(lora_dir).with_suffix("").as_posix(), path)
    tag_names = []
    for tag in tags:
        if tag.name not in known:
            notes.append(f"LoRA {tag.name!r} not found{f' in {lora_dir}' if lora_dir is not None else ''}; tag ignored")
            continue
        specs.append(LoraSpec(known[tag.name], tag.unet_weight, tag.te_weight))
        tag_names.append(tag.name)
    loaded_before = dict(loras.load_seconds)
    loras.activate(specs)
    for path in embeddings_named(embedding_dir, params.prompt, params.negative_prompt) if embedding_dir else []:
        loras.embed(path)  # after the LoRAs: a standalone file of a word takes the place of a bundled one
    load_seconds = sum(t for p, t in loras.load_seconds.items() if loaded_before.get(p) != t)
    used = dict.fromkeys(Path(spec.path).resolve() for spec in specs)
    notes += [loras.notes[path] for path in used if path in loras.notes]

    # The saved prompt keeps the tags the user typed and gets the other LoRAs appended as tags, so A1111 (and our
    # "read parameters") reproduce the image from the PNG alone; Lora hashes let model sites credit each file.
    saved_prompt = " ".join(x for x in [params.prompt.strip(), *(s.tag().to_tag() for s in lora_specs)] if x)
    hashes: dict[str, str] = {}
    for spec in specs:
        hashes.setdefault(spec.name, loras.model_hash(spec.path))
    total = count * batch_size
    base_seed = params.seed if params.seed >= 0 else random.randrange(2**32 - total)
    result = GenerationResult(images=[], seeds=[], parameters=[], warnings=notes, load_seconds=load_seconds,
                              loras=specs)
    started = time.perf_counter()
    for first in range(base_seed, base_seed + total, batch_size):
        images = generate_batch(pipe, replace(params, prompt=clean_prompt, seed=first), batch_size)
        for pos, image in enumerate(images):
            seed = first + pos
            text = a1111_parameters(replace(params, prompt=saved_prompt, seed=seed), model_name, lora_hashes=hashes,
                                    vae_name=vae_name, batch_size=batch_size, batch_pos=pos)
            result.images.append(image)
            result.seeds.append(seed)
            result.parameters.append(text)
            if out_dir is not None:
                result.paths.append(save_png(image, _next_png_path(Path(out_dir), seed), text))
    result.generate_seconds = time.perf_counter() - started
    return result


def _next_png_path(folder: Path, seed: int) -> Path:
    """`00001-<seed>.png`, numbered after the highest number in the folder, as A1111 names its outputs."""
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := re.match(r"(\d{5,})-", p.name))]
    return folder / f"{max(numbers, default=0) + 1:05d}-{seed}.png"
