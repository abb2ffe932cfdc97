"""Pretrain the toy-world base model from scratch: the autoencoder first, then the UNet and the text encoder.

No base model can be downloaded here, so sdlora makes its own: an SD1-shaped pipeline (AutoencoderKL,
UNet2DConditionModel, CLIPTextModel with the real CLIP tokenizer) at toy widths, trained on procedural
toy-world scenes until it draws what its captions say. This is a from-scratch training of whole models, which
sdlora's LoRA recipe does not do, so it has its own short loop here.

    python -m sdlora.toyworld.pretrain WORK_DIR [--ship sdlora/model_configs/toy-sd15] [--unet-until STEP]

Stages, each resumable from its newest checkpoint (run the same command again after a stop):
  vae      AutoencoderKL on random 64 px crops of renders in random looks (so it reconstructs any style)
  latents  a fixed set of plain scenes, encoded once; the latents' spread sets the VAE's scaling factor
  unet     UNet + text encoder from scratch on (latent, caption), caption dropout for classifier-free
           guidance, Min-SNR weighting, EMA of the weights
  decoder  the VAE's decoder trained on alone, its encoder (so the latent space) frozen: fine textures
  export   the EMA weights in fp16 into the shipped folder, beside the shipped configs, and a model card
The unet and decoder stages read the same inputs and can run side by side (`--only unet`, `--only decoder`).
`--unet-until STEP` ends the UNet stage at a step of its schedule (a multiple of --checkpoint-every) and exports
that: a run that cannot finish on the time it has still ships reproducible weights, and goes on without the option.
Every random draw is derived from (seed, stage, step), so a resumed run gives the same weights as one that
never stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from tqdm import tqdm

from sdlora.atomic import save_safetensors, write_text
from sdlora.toyworld.render import PLAIN, random_look, render, render_batch
from sdlora.toyworld.scene import TWO_OBJECT_SHARE, cell_centre, sample_scene
from sdlora.train.checkpoint import list_checkpoints, load_checkpoint, load_extra, prune, save_checkpoint

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

MODEL = "toy-sd15"
RESOLUTION = 128
INITIAL_LOGVAR = -8.0
VAE_CROP = 64  # the autoencoder is convolutional: crops teach it the same pixels at a quarter of the cost


@dataclass
class PretrainConfig:
    seed: int = 0
    threads: int = 2
    checkpoint_every: int = 500
    # autoencoder
    vae_images: int = 6000
    vae_steps: int = 6000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    decoder_steps: int = 12000
    # diffusion model
    scenes: int = 60000
    unet_steps: int = 20000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    text_encoder_lr: float = 1e-3
    warmup_steps: int = 500
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.9995
    # the model card's measurement
    card_seeds: int = 4
    card_scenes: int = 48


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdlora.toyworld.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("work", type=Path, help="working folder: data, checkpoints, logs (resumed when it exists)")
    parser.add_argument("--ship", type=Path, help="write the finished fp16 weights into this folder")
    parser.add_argument("--stop-after", choices=STAGES[:-1], help="end after this stage")
    parser.add_argument("--only", choices=STAGES, help="run only this stage (the earlier ones must have run)")
    parser.add_argument("--unet-until", type=int, metavar="STEP",
                        help="end the UNet stage at this step of its schedule (a multiple of --checkpoint-every)")
    defaults = PretrainConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    cfg = PretrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    if args.unet_until is not None and not (0 < args.unet_until <= cfg.unet_steps
                                            and args.unet_until % cfg.checkpoint_every == 0):
        parser.error(f"--unet-until {args.unet_until}: give a multiple of --checkpoint-every "
                     f"({cfg.checkpoint_every}) up to --unet-steps ({cfg.unet_steps})")
    pretrain(cfg, args.work, args.ship, args.stop_after, args.only, args.unet_until)


STAGES = ("vae", "latents", "unet", "decoder", "export")


def pretrain(cfg: PretrainConfig, work: Path, ship: Path | None = None, stop_after: str | None = None,
             only: str | None = None, unet_until: int | None = None) -> None:
    """Run the stages in order (each skipped when its result exists), up to `stop_after`; or `only` one of them,
    whose inputs must exist (the UNet and the decoder stages need the same inputs and can run side by side).
    `unet_until` ends the UNet stage at that step of its schedule, and export ships that."""
    torch.set_num_threads(cfg.threads)
    work.mkdir(parents=True, exist_ok=True)
    _record_config(cfg, work)
    wanted = [only] if only else list(STAGES[:STAGES.index(stop_after) + 1] if stop_after else STAGES)
    vae = train_vae(cfg, work)
    if "latents" in wanted:
        make_latents(cfg, work, vae)
    if "unet" in wanted or "export" in wanted:
        unet, text_encoder = train_unet(cfg, work, unet_until)
    if "decoder" in wanted or "export" in wanted:
        vae = tune_decoder(cfg, work, vae)
    if "export" in wanted and ship:
        export(cfg, work, ship, vae, unet, text_encoder, unet_until)


def _record_config(cfg: PretrainConfig, work: Path) -> None:
    """A resumed run must continue with the settings it started with, or the weights would mix two recipes."""
    path = work / "pretrain_config.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        # A setting added to the script since the folder was started counts as its default.
        defaults = asdict(PretrainConfig())
        changed = {k: (saved.get(k, defaults[k]), v) for k, v in asdict(cfg).items()
                   if saved.get(k, defaults[k]) != v and k != "threads"}
        if changed:
            raise SystemExit(f"{path}: this folder was started with other settings {changed}; "
                             "use a new folder or the same settings")
    write_text(path, json.dumps(asdict(cfg), indent=2))


def build_models():
    """The toy model's three networks from the shipped configs, randomly initialised."""
    from sdlora.models.tiny import build_components

    return build_components(MODEL, seed=0)


def _generator(cfg: PretrainConfig, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + stage * 100_000_007 + step)


def _resume(folder: Path, modules: dict[str, torch.nn.Module], optimizer, ema, at_most: int) -> dict:
    """Load the newest checkpoint in `folder` of step `at_most` or earlier into the modules, optimizer and EMA;
    its state (step, loss log, seconds spent), or a fresh one."""
    checkpoints = [c for c in list_checkpoints(folder) if _step_of(c) <= at_most]
    if not checkpoints:
        return {"step": 0, "losses": [], "seconds": 0.0}
    weights, optimizer_state, state = load_checkpoint(checkpoints[-1])
    _load_into(modules, weights)
    optimizer.load_state_dict(optimizer_state)
    if ema is not None:
        ema.load_state_dict(load_extra(checkpoints[-1], "ema"))
    return state


def _load_into(modules: dict[str, torch.nn.Module], weights: dict[str, torch.Tensor]) -> None:
    """Load `<module name>.<key>` tensors into each named module; every key must match."""
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})


def _prefixed(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, module in modules.items() for k, v in module.state_dict().items()}


def _checkpoint(folder: Path, modules: dict[str, torch.nn.Module], optimizer, state: dict, ema=None) -> None:
    extra = {"ema": ema.state_dict()} if ema is not None else None
    save_checkpoint(folder / f"checkpoint-{state['step']}", _prefixed(modules), optimizer.state_dict(), state, extra)
    prune(list_checkpoints(folder), keep=2)


def _train(desc: str, cfg: PretrainConfig, folder: Path, modules: dict[str, torch.nn.Module], optimizer,
           base_lrs: list[float], total: int, step_loss, ema=None, clip: float = 0.0, until: int | None = None
           ) -> dict:
    """The loop the stages share: resume, then `step_loss(step)` -> (loss, value to log) until `total` steps
    (or `until`, the schedule still that of `total`), with warm-up and cosine decay, checkpoints every
    `cfg.checkpoint_every` steps and the mean logged value per 100 steps (and at the end). Returns the final
    state (step, losses, seconds)."""
    end = until or total
    state = _resume(folder, modules, optimizer, ema, at_most=end)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for module in modules.values():
        module.train()
    started = time.perf_counter() - state.get("seconds", 0.0)
    bar = tqdm(total=total, initial=state["step"], desc=desc, unit="step")
    running = []
    while state["step"] < end:
        loss, logged = step_loss(state["step"])
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        factor = _cosine(state["step"], total, cfg.warmup_steps)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        state["step"] += 1
        running.append(logged)
        bar.update()
        if state["step"] % 100 == 0 or state["step"] == end:
            state["losses"].append([state["step"], float(np.mean(running))])
            bar.set_postfix(loss=f"{state['losses'][-1][1]:.4f}")
            running = []
        if state["step"] % cfg.checkpoint_every == 0 or state["step"] == end:
            state["seconds"] = time.perf_counter() - started
            _checkpoint(folder, modules, optimizer, state, ema)
    bar.close()
    for module in modules.values():
        module.eval()
    return state


# --- stage 1: the autoencoder -------------------------------------------------------------------------------


def train_vae(cfg: PretrainConfig, work: Path):
    _, vae, _ = build_models()
    final = work / "vae.safetensors"
    if final.is_file():
        vae.load_state_dict(_load(final))
        return vae.eval()
    images, centres = _vae_images(cfg, work)
    with torch.no_grad():
        # Start the posterior nearly deterministic: at the default log-variance of 0 the sampling noise drowns
        # what a few latent cells say about a small object, and the decoder learns to paint every object in
        # the mean colour (measured: grey-pink objects after 1,500 steps). The tiny KL weight keeps it small.
        vae.quant_conv.bias[vae.config.latent_channels:] = INITIAL_LOGVAR
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)

    def step_loss(step: int) -> tuple[torch.Tensor, float]:
        g = _generator(cfg, 1, step)
        x = _vae_batch(images, centres, cfg.vae_batch, g).float() / 127.5 - 1.0
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=g)).sample
        # L1 keeps edges and hatch lines sharper than MSE; the tiny KL term keeps the latents near N(0, I).
        recon = (reconstruction - x).abs().mean()
        return recon + cfg.vae_kl_weight * posterior.kl().mean(), recon.item()

    state = _train("autoencoder", cfg, work / "vae", {"vae": vae}, optimizer, [cfg.vae_lr], cfg.vae_steps, step_loss)
    save_safetensors(vae.state_dict(), final)
    write_text(work / "vae_log.json", json.dumps(state))
    return vae.eval()


def _vae_images(cfg: PretrainConfig, work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders in random looks, [N, 3, H, W] uint8, and the pixel centre (x, y) of one object in each, [N, 2];
    made once and kept in the working folder."""
    path = work / "vae_images.npy"
    if not path.is_file():
        rng = random.Random(cfg.seed * 7 + 1)
        scenes = [sample_scene(rng) for _ in range(cfg.vae_images)]
        rendered = np.stack([np.asarray(render(s, RESOLUTION, random_look(rng)))
                             for s in tqdm(scenes, desc="rendering autoencoder images")])
        centres = np.array([[(c + o) * RESOLUTION for c, o in zip(cell_centre(obj.cell), obj.offset)]
                            for obj in (rng.choice(s.objects) for s in scenes)], dtype=np.float32)
        _save_npy(work / "vae_centres.npy", centres)
        _save_npy(path, rendered)
    images = torch.from_numpy(np.load(path, allow_pickle=False)).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(np.load(work / "vae_centres.npy", allow_pickle=False))


def _vae_batch(images: torch.Tensor, centres: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Crops of VAE_CROP pixels, three in four centred on an object: objects cover a few percent of a scene, and
    crops taken anywhere teach the backgrounds long before the objects' colours (measured: grey blobs after
    2,000 steps)."""
    index = torch.randint(0, len(images), (size,), generator=g)
    anywhere = torch.randint(0, RESOLUTION - VAE_CROP + 1, (size, 2), generator=g).float()
    on_object = (centres[index] - VAE_CROP / 2).clamp(0, RESOLUTION - VAE_CROP)
    corner = torch.where((torch.rand(size, generator=g) < 0.75)[:, None], on_object, anywhere)
    corner = (corner / 8).round().long() * 8  # on the latent grid, as a whole picture would be encoded
    return torch.stack([images[i, :, top:top + VAE_CROP, left:left + VAE_CROP]
                        for i, (left, top) in zip(index.tolist(), corner.tolist())])


# --- stage 2: the latents -----------------------------------------------------------------------------------


def make_latents(cfg: PretrainConfig, work: Path, vae) -> None:
    """Encode `cfg.scenes` plain scenes once; the UNet stage reads them from latents.safetensors."""
    path = work / "latents.safetensors"
    if path.is_file():
        return
    rng = random.Random(cfg.seed * 7 + 2)
    scenes = [sample_scene(rng) for _ in range(cfg.scenes)]
    chunks = [scenes[start:start + 64] for start in range(0, len(scenes), 64)]
    encoded: list[torch.Tensor] = []
    # Rendering takes longer than encoding: worker processes draw the next chunks while this one encodes.
    with ProcessPoolExecutor(cfg.threads, mp_context=multiprocessing.get_context("spawn")) as pool, torch.no_grad():
        drawn = pool.map(render_batch, chunks, [RESOLUTION] * len(chunks), [PLAIN] * len(chunks))
        for pixels in tqdm(drawn, total=len(chunks), desc="drawing and encoding scenes"):
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            encoded.append(vae.encode(x).latent_dist.mean)
    latents = torch.cat(encoded)
    # As in SD: scale the latents to unit variance so the noise schedule sees the signal-to-noise it assumes.
    scaling = 1.0 / latents.std().item()
    save_safetensors({"latents": latents.half()}, path, metadata={"scaling_factor": f"{scaling:.6f}"})
    write_text(work / "captions.json", json.dumps([s.caption() for s in scenes]))


# --- stage 3: the UNet and the text encoder -----------------------------------------------------------------


def train_unet(cfg: PretrainConfig, work: Path, until: int | None = None):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel, compute_snr
    from safetensors import safe_open

    from sdlora.models.loading import tokenize
    from sdlora.models.tiny import load_clip_tokenizer, read_config

    unet, _, text_encoder = build_models()
    modules = {"unet": unet, "text_encoder": text_encoder}
    final, log = _unet_files(cfg, work, until)
    if final.is_file():
        _load_into(modules, _load(final))
        return unet.eval(), text_encoder.eval()
    with safe_open(str(work / "latents.safetensors"), "pt") as f:
        latents = f.get_tensor("latents").float() * _scaling_factor(work)
    captions = json.loads((work / "captions.json").read_text())
    input_ids = tokenize([load_clip_tokenizer()], captions)[0]
    empty_ids = tokenize([load_clip_tokenizer()], [""])[0]
    scheduler = DDPMScheduler.from_config(read_config(MODEL, "scheduler"))

    params = [p for m in modules.values() for p in m.parameters()]
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=0.75)
    optimizer = torch.optim.AdamW([
        {"params": list(unet.parameters()), "lr": cfg.unet_lr},
        {"params": list(text_encoder.parameters()), "lr": cfg.text_encoder_lr},
    ], weight_decay=0.01)

    def step_loss(step: int) -> tuple[torch.Tensor, float]:
        g = _generator(cfg, 3, step)
        index = torch.randint(0, len(latents), (cfg.unet_batch,), generator=g)
        x0 = latents[index]
        ids = input_ids[index].clone()
        # Empty captions teach the unconditional prediction that classifier-free guidance needs.
        ids[torch.rand(cfg.unet_batch, generator=g) < cfg.caption_dropout] = empty_ids
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=g)
        pred = unet(scheduler.add_noise(x0, noise, t), t, text_encoder(ids)[0]).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        # Min-SNR weighting (arXiv 2303.09556) for epsilon prediction: min(SNR, gamma) / SNR.
        snr = compute_snr(scheduler, t)
        return (per_sample * torch.clamp(snr, max=cfg.min_snr_gamma) / snr).mean(), per_sample.mean().item()

    state = _train("UNet + text encoder", cfg, work / "unet", modules, optimizer,
                   [cfg.unet_lr, cfg.text_encoder_lr], cfg.unet_steps, step_loss, ema=ema, clip=1.0,
                   until=until)
    ema.copy_to(params)
    save_safetensors(_prefixed(modules), final)
    write_text(log, json.dumps(state))
    return unet.eval(), text_encoder.eval()


def _unet_files(cfg: PretrainConfig, work: Path, until: int | None) -> tuple[Path, Path]:
    """The UNet stage's EMA weights and log: of the whole schedule, or of the run ended at `until`."""
    name = "unet" if until in (None, cfg.unet_steps) else f"unet_until_{until}"
    return work / f"{name}_final.safetensors", work / f"{name}_log.json"


# --- stage 4: the decoder, fine-tuned ------------------------------------------------------------------------


def tune_decoder(cfg: PretrainConfig, work: Path, vae):
    """Go on training the decoder alone, the encoder frozen: fine textures (hatching) take far longer to learn
    than shapes and colours, and a frozen encoder keeps the latent space the UNet was trained in, as SD's
    fine-tuned VAE decoders (ft-MSE) do. Returns the VAE with the tuned decoder."""
    final = work / "vae_tuned.safetensors"
    if final.is_file():
        vae.load_state_dict(_load(final))
        return vae.eval()
    images, centres = _vae_images(cfg, work)
    vae.requires_grad_(False)
    tuned = {"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv}
    params = [p for module in tuned.values() for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.vae_lr, weight_decay=0.0)

    def step_loss(step: int) -> tuple[torch.Tensor, float]:
        g = _generator(cfg, 2, step)
        x = _vae_batch(images, centres, cfg.vae_batch, g).float() / 127.5 - 1.0
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample(generator=g)
        recon = (vae.decode(latents).sample - x).abs().mean()
        return recon, recon.item()

    state = _train("decoder", cfg, work / "decoder", tuned, optimizer, [cfg.vae_lr], cfg.decoder_steps, step_loss)
    save_safetensors(vae.state_dict(), final)
    write_text(work / "decoder_log.json", json.dumps(state))
    return vae.eval()


def ema_models(work: Path):
    """The UNet and text encoder with the EMA weights of the newest checkpoint (to look at a run in progress)."""
    unet, _, text_encoder = build_models()
    modules = {"unet": unet, "text_encoder": text_encoder}
    checkpoint = list_checkpoints(work / "unet")[-1]
    weights, _, state = load_checkpoint(checkpoint)
    _load_into(modules, weights)
    shadow = load_extra(checkpoint, "ema")["shadow_params"]
    params = [p for m in modules.values() for p in m.parameters()]
    with torch.no_grad():
        for p, s in zip(params, shadow):
            p.copy_(s)
    return unet.eval(), text_encoder.eval(), state["step"]


# --- stage 5: the shipped weights ---------------------------------------------------------------------------


def export(cfg: PretrainConfig, work: Path, ship: Path, vae, unet, text_encoder, unet_until: int | None = None
           ) -> None:
    """fp16 weights, one file per network, beside the configs they must match (the VAE's scaling factor set to
    the one measured on the latents), and a model card with the figures measured on the shipped weights."""
    from sdlora.models.tiny import config_dir

    ship.mkdir(parents=True, exist_ok=True)
    scaling = round(_scaling_factor(work), 5)
    for source in sorted(config_dir(MODEL).glob("*.json")):
        config = json.loads(source.read_text())
        if source.stem == "vae":
            config["scaling_factor"] = scaling
        write_text(ship / source.name, json.dumps(config, indent=2) + "\n")
    vae.register_to_config(scaling_factor=scaling)
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    for name, module in modules.items():
        save_safetensors({k: v.half() for k, v in module.state_dict().items()}, ship / f"{name}.safetensors")
        # Measure what ships: the fp16 weights, computed in fp32 as every loader does.
        module.load_state_dict(_load(ship / f"{name}.safetensors"))
    write_text(ship / "MODEL_CARD.md", model_card(cfg, work, modules, unet_until))


def model_card(cfg: PretrainConfig, work: Path, modules: dict[str, torch.nn.Module], unet_until: int | None = None
               ) -> str:
    """The shipped model's card: data, recipe, losses, the command, and its prompt following measured by the
    toy world's evaluator on fixed seeds."""
    from sdlora.generate.pipeline import build_pipeline
    from sdlora.models.tiny import load_clip_tokenizer, read_config
    from sdlora.toyworld.quality import RenderSettings, measure_base
    from sdlora.toyworld.scene import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES
    from sdlora.toyworld.style_set import evaluation_scenes

    pipe = build_pipeline("sd1", modules["unet"], modules["vae"], [modules["text_encoder"]], [load_clip_tokenizer()],
                          read_config(MODEL, "scheduler"))
    pipe.set_progress_bar_config(disable=True)
    settings = RenderSettings(seeds=tuple(range(1, cfg.card_seeds + 1)))
    held_out = measure_base(pipe, evaluation_scenes(), settings)
    rng = random.Random(cfg.seed * 7 + 3)
    fresh = measure_base(pipe, [sample_scene(rng) for _ in range(cfg.card_scenes)], RenderSettings(seeds=(1,)))
    logs = {stage: json.loads((work / f"{stage}_log.json").read_text()) for stage in ("vae", "decoder")}
    logs["unet"] = json.loads(_unet_files(cfg, work, unet_until)[1].read_text())
    sizes = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    changed = {k: v for k, v in asdict(cfg).items()
               if v != getattr(PretrainConfig(), k) and k not in ("threads", "card_seeds", "card_scenes")}
    options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in changed.items())
    if unet_until:
        options = f"{options} --unet-until {unet_until}".strip()

    def row(name: str, r: dict) -> str:
        return f"| {name} | {r['images']} | {r['colour']:.0%} | {r['position']:.0%} | {r['shape']:.0%} |"

    scaling = cast("AutoencoderKL", modules["vae"]).config["scaling_factor"]
    return "\n".join([
        f"# {MODEL}: a Stable Diffusion 1.x-shaped model of the toy world",
        "",
        "Trained from scratch by sdlora (`sdlora/toyworld/pretrain.py`) on procedural scenes, so that the demo, the",
        "tests and the quality benchmark have a base model that draws. Nothing in it was downloaded.",
        "",
        f"- Networks: UNet2DConditionModel ({sizes['unet'] / 1e6:.2f} M parameters), CLIPTextModel "
        f"({sizes['text_encoder'] / 1e6:.2f} M, the real CLIP tokenizer), AutoencoderKL ({sizes['vae'] / 1e6:.2f} M); "
        f"fp16 weights; {RESOLUTION} px images, {RESOLUTION // 8}x{RESOLUTION // 8}x4 latents; epsilon prediction.",
        f"- Data: toy-world scenes (`sdlora/toyworld/scene.py`): one object, or two ({TWO_OBJECT_SHARE:.0%}), of "
        f"{len(SHAPES)} shapes, {len(COLOURS)} colours, {len(SIZES)} sizes, {len(POSITIONS)} positions, on "
        f"{len(BACKGROUNDS)} neutral backgrounds, captioned as drawn (\"a small red star at the top left, on a grey "
        "background\"); flat colours only. It has never seen hatching or outlines (the demo's style).",
        f"- Autoencoder: {cfg.vae_steps:,} steps of {cfg.vae_batch} crops of {VAE_CROP} px from {cfg.vae_images:,} "
        f"renders in random looks (flat, hatched, outlined), L1 + {cfg.vae_kl_weight:g} KL, AdamW {cfg.vae_lr:g}; "
        f"final L1 {logs['vae']['losses'][-1][1]:.4f} (pixels in [-1, 1]), "
        f"{logs['vae']['seconds'] / 60:.0f} min; then the decoder alone (encoder frozen) for "
        f"{cfg.decoder_steps:,} steps, final L1 {logs['decoder']['losses'][-1][1]:.4f}, "
        f"{logs['decoder']['seconds'] / 60:.0f} min. Scaling factor {scaling} (unit "
        "variance of the latents).",
        f"- UNet + text encoder: {logs['unet']['step']:,} steps of batch {cfg.unet_batch} over {cfg.scenes:,} "
        f"scenes encoded once, AdamW {cfg.unet_lr:g} (text encoder {cfg.text_encoder_lr:g}), warm-up "
        f"{cfg.warmup_steps} steps then cosine decay over {cfg.unet_steps:,} steps"
        f"{EARLY_END if unet_until else ''}, caption dropout {cfg.caption_dropout:g}, Min-SNR "
        f"{cfg.min_snr_gamma:g}, EMA {cfg.ema_decay:g} (shipped); final MSE {logs['unet']['losses'][-1][1]:.4f}, "
        f"{logs['unet']['seconds'] / 3600:.1f} h.",
        f"- Command: `python -m sdlora.toyworld.pretrain WORK_DIR --ship sdlora/model_configs/{MODEL}"
        f"{' ' + options if options else ''}` (seed {cfg.seed}; resumable, and the UNet and decoder stages can run "
        "side by side with `--only`; the times above are wall-clock on a shared 2-core CPU).",
        "",
        "## Prompt following",
        "",
        f"Measured by `sdlora.toyworld.evaluate` (pixel analysis and a shape classifier, not the model) on images "
        f"rendered with `sdlora generate`'s code: {settings.sampler}, {settings.steps} steps, CFG {settings.cfg:g}, "
        f"{RESOLUTION} px, fixed seeds. An object counts when it is drawn in the caption's colour, cell and shape.",
        "",
        "| prompts | images | colour | position | shape |",
        "|---|---:|---:|---:|---:|",
        row(f"the demo's 12 held-out prompts x {cfg.card_seeds} seeds", held_out),
        row(f"{cfg.card_scenes} random scenes (one or two objects) x 1 seed", fresh),
        "",
    ])


# --- helpers ------------------------------------------------------------------------------------------------


def _cosine(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


EARLY_END = " (ended early with --unet-until: the same command without it goes on)"


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rpartition("-")[2])


def _scaling_factor(work: Path) -> float:
    from safetensors import safe_open

    with safe_open(str(work / "latents.safetensors"), "pt") as f:
        return float(f.metadata()["scaling_factor"])


def _save_npy(path: Path, array: np.ndarray) -> None:
    from sdlora.atomic import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


if __name__ == "__main__":
    started = time.time()
    main()
    print(f"done in {(time.time() - started) / 60:.1f} min")
