"""The LoRA training recipe. `train(cfg)` reads top to bottom: data, models, LoRA, caches, optimizer, loop, export.

Every random choice in a step (noise, timesteps, augmentation, dropout) is derived from (seed, step) or
(seed, epoch, position), never from RNG state carried between steps; that is what makes a resumed run
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from sdlora import bnb_import
from sdlora.adapters.adalora import AdaLora
from sdlora.adapters.export import (
    EXPORT_DTYPES,
    build_metadata,
    from_kohya_state_dict,
    group_lora_keys,
    lora_weights_from_tensors,
    read_lora_file,
    refuse_other_networks,
    save_kohya_lora,
    save_peft_lora,
)
from sdlora.adapters.lora import (
    count_parameters,
    inject_lora,
    is_up_weight,
    lora_layers,
    pissa_as_lora,
    trainable_parameters,
)
from sdlora.atomic import write_text
from sdlora.config import Config, TrainConfig, config_to_dict, dump_toml
from sdlora.data.cache import build_latent_cache, encode_latents
from sdlora.data.dataset import (
    ImageRecord,
    bucket_summary,
    epoch_batches,
    process_caption,
    sample_rng,
    scan_dataset,
    tag_frequency,
)
from sdlora.data.doctor import diagnose
from sdlora.data.loader import epoch_loader
from sdlora.errors import DatasetError, LoraFileError, PlanError, TrainingError
from sdlora.generate.pipeline import (
    GenerationParams,
    a1111_parameters,
    build_pipeline,
    generate,
    parse_sample_prompt,
    save_png,
)
from sdlora.models.loading import BaseModel, component_names, encode_prompt, load_base_model, tokenize
from sdlora.models.quantize import fp8_checkpointing, quantize_nf4, store_fp8, stored_bytes
from sdlora.train import checkpoint as ckpt
from sdlora.train.deferred import SkippedSteps, StepClock, skips_on_device
from sdlora.train.loss import compute_loss
from sdlora.train.plan import check_fits, offloads
from sdlora.train.validation import (
    best,
    prepare_validation,
    read_history,
    split_records,
    validation_loss,
    write_history,
)

logger = get_logger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def with_precision(cfg: Config) -> Config:
    """`train.mixed_precision = "auto"` made concrete for this machine; the run's config.toml records the choice."""
    if cfg.train.mixed_precision != "auto":
        return cfg
    if torch.cuda.is_available():
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        precision = "no"  # CPUs have no fast half-precision matmuls for training
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision=precision))



def train(cfg: Config, resume: str | None = None, init_lora: str | Path | None = None,
          on_step: Callable[[dict], bool | None] | None = None) -> Path:
    """Train a LoRA as `cfg` says and return the path of the final kohya-format .safetensors file.

    Args:
        cfg: the validated config.
        resume: a checkpoint folder, a run folder, or "latest" (the newest checkpoint in train.output_dir).
        init_lora: a LoRA file to start from; each of its modules keeps its rank and alpha. A file that cannot
            continue this config is refused before the model loads.
        on_step: for a UI, single process only: called after every step with {"step", "max_steps", "loss", "lr"},
            where "loss" is the mean since the last log at `train.log_every_n_steps` steps and None between them
            (reading it every step would make the host wait for the GPU); returning False stops training there,
            saving the LoRA (under its final name) and a checkpoint to resume from.
    """
    cfg = with_precision(cfg)
    t = cfg.train
    out = Path(t.output_dir)
    # Ranks started by torchrun / accelerate launch on a machine without a GPU: accelerate joins them over gloo
    # only when told to use the CPU; otherwise each rank would train alone and they would overwrite each other.
    cpu_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu_ranks,
        mixed_precision=t.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    device, weight_dtype = accelerator.device, DTYPES[t.mixed_precision]
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ~free speed on Ampere+, fine for training
        torch.backends.cudnn.allow_tf32 = True
    started_at = time.time()

    # --- data first: a broken dataset must fail before minutes of model loading --------------------------
    records, val_records = split_records(scan_dataset(cfg.data), cfg)
    _check_dataset(cfg, accelerator)
    start_tensors = _read_init_lora(init_lora, cfg) if init_lora else {}
    if device.type == "cuda":  # a run that cannot fit stops here, not with an OOM minutes later
        try:
            warning = check_fits(cfg, torch.cuda.get_device_properties(device).total_memory)
        except PlanError as e:
            raise TrainingError(str(e)) from None
        if warning:
            logger.warning(warning)

    # --- models: frozen base in weight_dtype, VAE in fp32, LoRA adapters (fp32) via peft ------------------
    base = load_base_model(cfg.model.base_model, cfg.model.vae, cfg.model.allow_unsafe_pickle, cfg.model.prediction_type)
    base.vae.to(device, torch.float32).requires_grad_(False)
    modules = {"unet": base.unet, **dict(zip(component_names(base.arch), base.text_encoders))}
    for name, module in modules.items():
        # The UNet joins the device after the caches are built: caching then has the memory to itself.
        module.requires_grad_(False).to("cpu" if name == "unet" else device, weight_dtype)
    if cfg.model.quantize_base == "nf4":  # before injection: peft then wraps the 4-bit layers in its bnb LoRA layer
        quantize_nf4(base.unet, weight_dtype, device)
    trained = [n for n in modules if (n == "unet" and cfg.lora.train_unet) or (n != "unet" and cfg.lora.train_text_encoder)]
    try:  # the file of --init-lora mapped onto the model, each module at its own rank
        start = from_kohya_state_dict(start_tensors, {name: [n for n, _ in m.named_modules()] for name, m in
                                                      modules.items()}) if start_tensors else {}
        set_seed(t.seed)  # LoRA A matrices are initialised from the global RNG
        pissa_start = {}  # PiSSA's initial factors, which the export needs (see lora.pissa_as_lora)
        adalora = AdaLora(cfg.lora, t.max_train_steps) if cfg.lora.method == "adalora" else None
        for name in trained:
            if adalora is not None:
                adalora.inject(modules[name], name)  # keeps peft's tuner: its rank allocator runs after every step
            else:
                inject_lora(modules[name], name, cfg.lora, start.get(name))
            if cfg.lora.init == "pissa":
                pissa_start[name] = lora_layers(modules[name])
    except LoraFileError as e:
        raise LoraFileError(f"{init_lora}: {e}") from None
    if cfg.model.quantize_base == "fp8":  # after injection, or peft would create the adapters in fp8 too
        store_fp8(base.unet, weight_dtype)
    if t.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing(fp8_checkpointing if cfg.model.quantize_base == "fp8" else None)
        for name in trained:
            if name != "unet":
                # Non-reentrant: reentrant checkpointing (transformers 4.x's default) gives adapters inside a block
                # no gradient when the block's input needs none, as a frozen embedding's output does.
                modules[name].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_trainable, n_total = count_parameters(list(modules.values()))
    logger.info(f"trainable parameters: {n_trainable:,} of {n_total:,} ({100 * n_trainable / n_total:.3f}%) "
                f"in {', '.join(trained)}", main_process_only=True)

    val_items = prepare_validation(val_records, base, cfg) if val_records and accelerator.is_main_process else []

    # --- caches: encode images / captions once when nothing about them changes between epochs -------------
    latent_cache = None
    if cfg.data.cache_latents != "none":
        with accelerator.main_process_first():
            latent_cache = build_latent_cache(records, base.vae, cfg.data.cache_latents, cfg.data.flip_aug)
    te_cache = _cache_text_outputs(base, records, cfg) if cfg.data.cache_text_encoder_outputs else None
    modules["unet"].to(device)
    _speed_up_unet(modules["unet"], t)
    offload_vae, offload_te = offloads(cfg)
    if offload_vae:  # nothing encodes or decodes images any more: free the device memory for activations
        base.vae.to("cpu")
    if offload_te:
        for name in component_names(base.arch):
            modules[name].to("cpu")

    # --- optimizer, LR schedule, noise schedule ------------------------------------------------------------
    optimizer = _make_optimizer(t, {name: modules[name] for name in trained}, fused=device.type == "cuda")
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                 num_training_steps=t.max_train_steps)
    prediction_type = cfg.model.prediction_type or base.prediction_type
    noise_scheduler = DDPMScheduler.from_config(
        base.scheduler_config, prediction_type=prediction_type, rescale_betas_zero_snr=t.zero_terminal_snr
    )
    prepared = accelerator.prepare(*[modules[name] for name in trained], optimizer)
    modules.update(zip(trained, prepared[:-1]))
    optimizer = prepared[-1]

    # --- resume: the adapter, optimizer, schedules and position in the data all come back ----------------
    global_step, epoch, batch_in_epoch = 0, 0, 0
    if resume:
        folder = ckpt.resolve_resume(resume, out)
        adapters, optimizer_state, state = ckpt.load_checkpoint(folder)
        _load_adapters(accelerator, modules, trained, adapters)
        if adalora is not None:
            adalora.load_state_dict(ckpt.load_extra(folder, "adalora"))
        optimizer.load_state_dict(optimizer_state)
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        global_step, epoch, batch_in_epoch = state["global_step"], state["epoch"], state["batch_in_epoch"]
        logger.info(f"resumed from {folder} at step {global_step} (epoch {epoch}, batch {batch_in_epoch})")

    n_images = sum(r.repeats for r in records)
    batches_per_epoch = len(epoch_batches(records, t.batch_size, t.seed, 0))
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / accelerator.num_processes / t.gradient_accumulation_steps))
    logger.info(
        "***** Running training *****\n"
        f"  images: {len(records)} ({n_images} with repeats), buckets: {bucket_summary(records)}\n"
        f"  batch size per device: {t.batch_size}, processes: {accelerator.num_processes}, "
        f"accumulation: {t.gradient_accumulation_steps}\n"
        f"  steps: {t.max_train_steps} (~{steps_per_epoch} per epoch), mixed precision: {t.mixed_precision}, "
        f"prediction: {prediction_type}",
        main_process_only=True,
    )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.toml", dump_toml(cfg))
        accelerator.init_trackers("sdlora", config=_flat_hparams(cfg))
    val_rows = read_history(out, global_step) if resume else []

    def validate(epoch_now: int) -> None:
        unwrap = accelerator.unwrap_model
        with accelerator.autocast():
            value = validation_loss(val_items, unwrap(modules["unet"]), [unwrap(m) for m in encoders], base.arch,
                                    noise_scheduler, t, weight_dtype, compute_loss)
        val_rows.append({"step": global_step, "epoch": epoch_now, "val_loss": value})
        write_history(out, val_rows)
        accelerator.log({"val_loss": value}, step=global_step)

    run_info = {"started_at": started_at, "records": records, "n_images": n_images, "arch": base.arch,
                "model_name": Path(cfg.model.base_model).name, "prediction_type": prediction_type,
                "unet_config": dict(base.unet.config), "pissa_start": pissa_start}

    # --- the loop ------------------------------------------------------------------------------------------
    loss_sum = torch.zeros((), device=device)
    # Steps with a NaN/Inf loss or gradient are skipped. A fused AdamW skips them on the device, and the host reads
    # the flags only at check points; other optimizers need each flag before their step (a host sync per step).
    on_device = adalora is None and skips_on_device(optimizer.optimizer)  # AdaLoRA's allocator needs each flag
    skipped = SkippedSteps(t.max_nonfinite_steps, lambda streak, step: TrainingError(
        _nonfinite_message(t, streak, step, out)))
    clock = StepClock(device)  # data + forward + backward + update, without saving/sampling/validation

    def settle() -> None:  # the host catches up with the device: skipped steps (may stop the run), step times
        clock.settle()
        skipped.settle()

    trained_modules = [modules[name] for name in trained]
    adapter_params = [p for m in trained_modules for p in m.parameters() if p.requires_grad]
    for module in trained_modules:
        module.train()
    encoders = [modules[name] for name in component_names(base.arch)]
    te_grad = any(name != "unet" for name in trained)
    if val_items and global_step == 0:
        validate(0)  # the untrained baseline
    gas = t.gradient_accumulation_steps
    # The with-block closes the bar before an error message is printed, so the message is the last line.
    with tqdm(total=t.max_train_steps, initial=global_step, desc="training", unit="step",
              disable=not accelerator.is_local_main_process) as progress:
        stopped = False
        while global_step < t.max_train_steps and not stopped:
            batches = _shard(epoch_batches(records, t.batch_size, t.seed, epoch), accelerator)
            loader = epoch_loader(records, batches, batch_in_epoch, cfg, epoch, latent_cache, base.tokenizers, device)
            # One optimizer step per group of `gas` micro-batches; the last group of an epoch may be shorter.
            for start in range(batch_in_epoch, len(batches), gas):
                group = range(start, min(start + gas, len(batches)))
                step_loss = torch.zeros((), device=device)
                clock.start()
                for micro, position in enumerate(group):
                    # All randomness of this micro-batch comes from (seed, step, micro-batch, rank) alone.
                    seed = _step_seed(t.seed, global_step, micro, accelerator.process_index)
                    torch.manual_seed(seed)
                    batch = next(loader)
                    with contextlib.ExitStack() as stack:
                        if position != group[-1]:  # gradients are all-reduced only on the group's last micro-batch
                            for module in trained_modules:
                                stack.enter_context(accelerator.no_sync(module))
                        with accelerator.autocast():
                            if "latents" in batch:
                                latents = batch["latents"]
                            else:
                                latents = encode_latents(base.vae, batch["pixels"])
                            if te_cache is not None:
                                states, pooled = _from_te_cache(te_cache, batch["captions"], device)
                            else:
                                with torch.set_grad_enabled(te_grad):
                                    states, pooled = encode_prompt(base.arch, encoders, batch["input_ids"])
                            time_ids = batch["time_ids"] if base.arch == "sdxl" else None
                            loss = compute_loss(modules["unet"], noise_scheduler, latents, states, pooled, time_ids,
                                                batch.get("mask"), torch.Generator(device).manual_seed(seed), t,
                                                weight_dtype)
                        # AdaLoRA's orthogonality penalty (fp32, no autocast) joins the gradient, not the logged loss.
                        penalty = adalora.penalty() if adalora is not None else 0.0
                        accelerator.backward((loss + penalty) / len(group))
                    step_loss += loss.detach()
                # NaN/Inf guard: an AdamW update with NaN would ruin the adapter for good.
                grad_norm = accelerator.clip_grad_norm_(adapter_params, t.max_grad_norm or math.inf)
                nonfinite = ~(torch.isfinite(grad_norm) & torch.isfinite(step_loss))
                flag = nonfinite  # what `skipped` reads at its next check
                if on_device:
                    if accelerator.scaler is None:  # under fp16 the GradScaler passes its own flag
                        optimizer.optimizer.found_inf = nonfinite.float()
                    optimizer.step()
                else:
                    finite = not nonfinite.item()
                    flag = torch.tensor(not finite)  # read already: the check must not wait for the device again
                    if finite or accelerator.scaler is not None:
                        optimizer.step()  # under fp16 the GradScaler skips a non-finite step itself
                    if adalora is not None:
                        adalora.update(global_step + 1, finite)  # scores ranks from the (unscaled, clipped) gradients
                clock.stop()
                optimizer.zero_grad(set_to_none=True)
                lr_scheduler.step()
                global_step += 1
                progress.update(1)
                loss_sum += torch.where(nonfinite, 0.0, step_loss)
                skipped.add(global_step, flag, len(group))

                # --- after the step: log, save, sample -----------------------------------------------------------
                epoch_done = group[-1] + 1 == len(batches)
                final = global_step >= t.max_train_steps
                log_now = global_step % t.log_every_n_steps == 0 or final
                if log_now or not on_device or skipped.due():
                    settle()
                mean_loss = None
                if log_now and skipped.finite_micro_batches:
                    mean_loss = accelerator.reduce(loss_sum, reduction="mean").item() / skipped.finite_micro_batches
                    logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "skipped_steps": skipped.skipped}
                    progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}")
                    accelerator.log(logs, step=global_step)
                    loss_sum.zero_()
                    skipped.finite_micro_batches = 0
                if on_step is not None:
                    step_info = {"step": global_step, "max_steps": t.max_train_steps, "loss": mean_loss,
                                 "lr": lr_scheduler.get_last_lr()[0]}
                    stopped = on_step(step_info) is False
                    final = final or stopped
                lora_name = None
                if final:
                    lora_name = t.output_name
                elif epoch_done and t.save_every_n_epochs and (epoch + 1) % t.save_every_n_epochs == 0:
                    lora_name = f"{t.output_name}-{epoch + 1:06d}"  # kohya's per-epoch naming
                elif t.save_every_n_steps and global_step % t.save_every_n_steps == 0:
                    lora_name = f"{t.output_name}-step{global_step:08d}"
                if lora_name or (t.checkpoint_every_n_steps and global_step % t.checkpoint_every_n_steps == 0):
                    settle()  # a run that has to stop for NaN stops before it saves
                    accelerator.wait_for_everyone()
                    if accelerator.is_main_process:
                        state = {"global_step": global_step, "epoch": epoch + epoch_done,
                                 "batch_in_epoch": 0 if epoch_done else group[-1] + 1,
                                 "lr_scheduler": lr_scheduler.state_dict(),
                                 "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}
                        _save_checkpoint(accelerator, modules, trained, optimizer, state, out, t.save_last_k,
                                         {"adalora": adalora.state_dict()} if adalora is not None else None)
                        if lora_name:
                            _export(accelerator, modules, trained, cfg, run_info, global_step, epoch + epoch_done,
                                    out / f"{lora_name}.safetensors", keep=0 if final else t.save_last_k)
                if val_items and (
                    final or (t.validate_every_n_steps and global_step % t.validate_every_n_steps == 0)
                    or (not t.validate_every_n_steps and epoch_done)
                ):
                    validate(epoch + epoch_done)
                s = cfg.sample
                if s.prompts and accelerator.is_main_process and (
                    final or (s.every_n_steps and global_step % s.every_n_steps == 0)
                    or (epoch_done and s.every_n_epochs and (epoch + 1) % s.every_n_epochs == 0)
                ):
                    with accelerator.autocast():
                        render_samples(base, modules, cfg, out / "samples", f"step{global_step:08d}", accelerator)
                if final:
                    break
            epoch, batch_in_epoch = epoch + 1, 0
    if accelerator.is_main_process:
        stats = speed_stats(clock.seconds, t.batch_size * t.gradient_accumulation_steps * accelerator.num_processes,
                            device)
        stats["trainable_parameters"] = n_trainable
        # UNet and text-encoder weights on the device as stored (model.quantize_base shrinks them), for `sdlora bench`.
        stats["base_weights_gb"] = stored_bytes([accelerator.unwrap_model(m) for m in modules.values()], device) / 1e9
        write_text(out / "train_stats.json", json.dumps(stats, indent=1))
        memory = f", peak memory {stats['peak_allocated_gb']:.2f} GB" if "peak_allocated_gb" in stats else ""
        logger.info(f"speed: {stats['images_per_s']:.2f} images/s, {stats['step_s_median']:.3f} s/step (median "
                    f"after warm-up){memory}", main_process_only=True)
        if adalora is not None:
            logger.info(adalora.report(out), main_process_only=True)
    lowest = best(val_rows)
    if lowest:
        logger.info(f"lowest validation loss {lowest['val_loss']:.5f} at step {lowest['step']} (epoch "
                    f"{lowest['epoch']}); every value is in {out / 'validation.csv'}", main_process_only=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out / f"{t.output_name}.safetensors"


@torch.no_grad()
def render_samples(base: BaseModel, modules: dict, cfg: Config, folder: Path, tag: str, accelerator=None) -> list[Path]:
    """Render cfg.sample.prompts with the models as they are now (adapters active); returns the PNG paths."""
    unwrap = accelerator.unwrap_model if accelerator is not None else (lambda m: m)
    encoders = [unwrap(modules[name]) for name in component_names(base.arch)]
    unet = unwrap(modules["unet"])
    pipe = build_pipeline(base.arch, unet, base.vae, encoders, base.tokenizers, base.scheduler_config, cfg.sample.sampler)
    pipe.set_progress_bar_config(disable=True)
    was_training = [m.training for m in [unet, *encoders]]
    for m in [unet, *encoders]:
        m.eval()
    s = cfg.sample
    defaults = GenerationParams(prompt="", steps=s.steps, cfg=s.cfg, seed=s.seed, sampler=s.sampler,
                                width=s.width or cfg.data.resolution, height=s.height or cfg.data.resolution)
    paths = []
    for i, line in enumerate(s.prompts):
        params = parse_sample_prompt(line, defaults)
        image = generate(pipe, params, base.scheduler_config)
        paths.append(save_png(image, folder / f"{tag}-{i:02d}.png", a1111_parameters(params, base.name)))
    for m, training in zip([unet, *encoders], was_training):
        m.train(training)
    return paths


def _read_init_lora(path: str | Path, cfg: Config) -> dict[str, torch.Tensor]:
    """The tensors of the LoRA file `path`, after checking, before the model loads, that `cfg` can continue it.

    Raises:
        TrainingError: the adapter method cannot start from a file, or the file has parts the run would not train
            (and so would drop from its output).
        LoraFileError: the file cannot be read, is another network type, or has a module without its pair.
    """
    if cfg.lora.init == "pissa":
        raise TrainingError("lora.init = \"pissa\" starts from the base weights' own singular vectors; it cannot "
                            "continue an existing LoRA file (use init = \"default\")")
    if cfg.lora.method == "adalora":
        raise TrainingError("lora.method = \"adalora\" learns its ranks from the start; it cannot continue an "
                            "existing LoRA file (use method = \"lora\")")
    tensors, _ = read_lora_file(path)
    refuse_other_networks(path, tensors)
    modules, _ = group_lora_keys(tensors)
    if not modules:
        raise LoraFileError(f"{path}: holds no LoRA module to continue")
    weights = {module: lora_weights_from_tensors(parts, f"{path}: module {module}") for module, parts in modules.items()}
    dora = any(w.magnitude is not None for w in weights.values())
    if dora != (cfg.lora.method == "dora"):
        raise TrainingError(f"{path} is {'a DoRA' if dora else 'a plain LoRA'} file: set lora.method = "
                            f"\"{'dora' if dora else 'lora'}\" to continue it")
    text_encoder = [m.startswith(("lora_te", "text_encoder")) for m in modules]
    for key, present in (("train_unet", not all(text_encoder)), ("train_text_encoder", any(text_encoder))):
        if present and not getattr(cfg.lora, key):
            raise TrainingError(f"{path} has modules that lora.{key} = false would drop from the result: set "
                                f"lora.{key} = true to continue them")
    return tensors


def _speed_up_unet(unet: torch.nn.Module, t: TrainConfig) -> None:
    if t.compile != "none":
        backends = torch._dynamo.list_backends(exclude_tags=())
        if t.compile_backend not in backends:
            raise TrainingError(f"train.compile_backend: {t.compile_backend!r} is not one of {', '.join(backends)}")
    if t.channels_last:
        unet.to(memory_format=torch.channels_last)
    mode = None if t.compile_mode == "default" else t.compile_mode
    if t.compile == "regional":
        unet.compile_repeated_blocks(backend=t.compile_backend, mode=mode)
    elif t.compile == "full":
        unet.compile(backend=t.compile_backend, mode=mode)


def _make_optimizer(t: TrainConfig, trained: dict[str, torch.nn.Module], fused: bool) -> torch.optim.Optimizer:
    """The optimizer over the adapters; `fused` (AdamW on a GPU) also lets the loop skip NaN steps without a sync.

    On a CPU, fused AdamW is ~15x slower than foreach over LoRA's many small tensors (0.65 s vs 0.04 s a step for
    600 [64, 8] tensors on a 2-core CPU)."""
    groups = []
    for name, module in trained.items():
        lr = (t.unet_lr if name == "unet" else t.text_encoder_lr) or t.learning_rate
        params = trainable_parameters(module)
        down = [p for n, p in params.items() if not (t.loraplus_lr_ratio and is_up_weight(n))]
        up = [p for n, p in params.items() if t.loraplus_lr_ratio and is_up_weight(n)]
        groups.append({"params": down, "lr": lr, "name": f"{name}"})
        if up:
            # LoRA+ (arXiv 2402.12354): B learns faster than A for the same stability.
            groups.append({"params": up, "lr": lr * t.loraplus_lr_ratio, "name": f"{name}_up"})
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=t.weight_decay, fused=fused or None, foreach=None if fused else True)
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=t.learning_rate, weight_decay=t.weight_decay, relative_step=False,
                         scale_parameter=False, warmup_init=False)
    if t.optimizer == "adamw8bit":
        try:
            bnb = bnb_import.load()
        except ImportError:
            raise TrainingError("train.optimizer = \"adamw8bit\" needs bitsandbytes: pip install 'sdlora[bnb]'") from None
        return bnb.optim.AdamW8bit(groups, weight_decay=t.weight_decay)
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise TrainingError("train.optimizer = \"prodigy\" needs prodigyopt: pip install 'sdlora[prodigy]'") from None
    # Prodigy estimates the step size itself; the learning rate is a multiplier (1.0 is the usual choice).
    return Prodigy(groups, weight_decay=t.weight_decay)


@torch.no_grad()
def _cache_text_outputs(base: BaseModel, records: list[ImageRecord], cfg: Config) -> dict[str, tuple]:
    """{caption: (states, pooled)} for every distinct caption; only valid when captions never change."""
    cache = {}
    for caption in sorted({process_caption(r.caption, cfg.data, sample_rng(0, 0, 0)) for r in records}):
        states, pooled = encode_prompt(base.arch, base.text_encoders, tokenize(base.tokenizers, [caption]))
        cache[caption] = (states[0], None if pooled is None else pooled[0])
    return cache


def _from_te_cache(cache: dict, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    states = torch.stack([cache[c][0] for c in captions]).to(device)
    pooled = None if cache[captions[0]][1] is None else torch.stack([cache[c][1] for c in captions]).to(device)
    return states, pooled


def _shard(batches: list[list[int]], accelerator) -> list[list[int]]:
    """This process's share of the epoch's batches; the list is cycled so every process gets as many batches."""
    world = accelerator.num_processes
    if world == 1:
        return batches
    padded = batches + batches[: (-len(batches)) % world]
    return padded[accelerator.process_index :: world]


def _step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1009 + micro * 31 + rank) % (2**63)


def _adapter_tensors(accelerator, modules: dict, trained: list[str]) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name in trained
            for k, v in trainable_parameters(accelerator.unwrap_model(modules[name])).items()}


def _load_adapters(accelerator, modules: dict, trained: list[str], adapters: dict[str, torch.Tensor]) -> None:
    current = _adapter_tensors(accelerator, modules, trained)
    if set(current) != set(adapters):
        raise TrainingError("the checkpoint's adapter does not match this config (lora.rank/targets/train_* changed?)")
    with torch.no_grad():
        for key, param in current.items():
            param.copy_(adapters[key])


WARMUP_STEPS = 3  # first steps include allocator growth, cuDNN autotuning and compilation


def speed_stats(step_seconds: list[float], images_per_step: int, device: torch.device) -> dict:
    """Throughput after warm-up and peak device memory, as written to train_stats.json and read by benchmarks."""
    timed = step_seconds[WARMUP_STEPS:] or step_seconds
    ordered = sorted(timed)
    stats = {
        "steps_timed": len(timed),
        "images_per_step": images_per_step,
        "step_s_median": ordered[len(ordered) // 2] if ordered else 0.0,
        "images_per_s": images_per_step * len(timed) / sum(timed) if timed else 0.0,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
    }
    if device.type == "cuda":
        stats["peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        stats["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
    return stats


def _nonfinite_message(t: TrainConfig, streak: int, step: int, out: Path) -> str:
    causes = [f"lower train.learning_rate (now {t.learning_rate:g})"]
    if t.mixed_precision == "fp16":
        causes.append("use mixed_precision = \"bf16\" if the GPU has it (fp16 overflows)")
    if t.max_grad_norm == 0:
        causes.append("set train.max_grad_norm = 1.0")
    return (f"loss or gradients were NaN/Inf for {streak} steps in a row (steps {step - streak + 1}-{step}); "
            f"those updates were skipped, so the weights and the checkpoints in {out} are intact. Likely fix: "
            + ", or ".join(causes))


def _check_dataset(cfg: Config, accelerator) -> None:
    """Run `sdlora doctor`'s checks: errors (an image that only fails when decoded, a bad mask) stop the run
    here instead of at the step that first reads the file; warnings are logged once."""
    report = diagnose(cfg.data)
    errors = [f for f in report.findings if f.severity == "error"]
    if errors:
        first = errors[0]
        where = f"{first.path}: " if first.path is not None else ""
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise DatasetError(f"{where}{first.message}{more}; `sdlora doctor` lists every problem")
    if accelerator.is_main_process:
        for f in report.findings:
            if f.severity == "warning":
                logging.getLogger(__name__).warning("dataset: %s%s", f"{f.path}: " if f.path else "", f.message)


def _save_checkpoint(accelerator, modules, trained, optimizer, state, out: Path, keep: int,
                     extra: dict | None = None) -> None:
    folder = out / f"checkpoint-{state['global_step']}"
    ckpt.save_checkpoint(folder, _adapter_tensors(accelerator, modules, trained), optimizer.state_dict(), state,
                         extra)
    ckpt.prune(ckpt.list_checkpoints(out), keep)


def _export(accelerator, modules, trained, cfg: Config, run_info: dict, step: int, epoch: int, path: Path,
            keep: int) -> None:
    layers = {name: lora_layers(accelerator.unwrap_model(modules[name])) for name in trained}
    if run_info["pissa_start"]:
        layers = {name: pissa_as_lora(layers[name], run_info["pissa_start"][name]) for name in trained}
    records = run_info["records"]
    dirs: dict[str, dict[str, int]] = {}
    for r in records:
        entry = dirs.setdefault(r.dataset_dir, {"n_repeats": r.repeats, "img_count": 0})
        entry["img_count"] += 1
    info = {
        "steps": step, "epoch": epoch, "num_train_images": run_info["n_images"],
        "training_started_at": run_info["started_at"], "training_finished_at": time.time(),
        "tag_frequency": tag_frequency(records), "dataset_dirs": dirs, "sd_model_name": run_info["model_name"],
        "prediction_type": run_info["prediction_type"],
    }
    metadata = build_metadata(cfg, run_info["arch"], info)
    dtype = EXPORT_DTYPES[cfg.export.dtype]
    if "kohya" in cfg.export.formats:
        save_kohya_lora(layers, run_info["arch"], path, metadata, dtype, run_info["unet_config"])
    if "peft" in cfg.export.formats:
        save_peft_lora(layers, path.with_suffix(""), dtype)
    if keep:
        intermediate = sorted(path.parent.glob(f"{cfg.train.output_name}-*.safetensors"), key=lambda p: p.stat().st_mtime)
        ckpt.prune(intermediate, keep)
    logging.getLogger(__name__).info("saved %s", path)


def _flat_hparams(cfg: Config) -> dict:
    """TensorBoard hparams take scalars only: dotted keys, lists as JSON strings."""
    flat = {}
    for table, values in config_to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{table}.{key}"] = json.dumps(value) if isinstance(value, list) else value
    return flat
