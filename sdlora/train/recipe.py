"""The LoRA training recipe. `train(cfg)` sets up in named phases (accelerator, data, class images, models and
adapters, caches, optimizer and schedules, restore) and then loops; each step is forward/backward (with the
preservation term when asked), a guarded optimizer step, and what `due_after` says is due after it (log, save,
validate, sample); early stopping can end the loop after a validation.

Every random choice in a step (noise, timesteps, augmentation, dropout) is derived from (seed, step) or
(seed, epoch, position), never from RNG state carried between steps; that is what makes a resumed run
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from sdlora.adapters.embeddings import (
    add_trainable_words,
    bundle_tensors,
    save_embeddings,
    split_vectors,
    trained_vectors,
)
from sdlora.adapters.export import (
    RunInfo,
    build_metadata,
    from_kohya_state_dict,
    save_kohya_state_dict,
    save_peft_lora,
    to_kohya_state_dict,
)
from sdlora.adapters.lora import count_parameters, trainable_parameters
from sdlora.adapters.methods import Adapters, adapters_for, read_init_lora
from sdlora.atomic import atomic_dir, write_text
from sdlora.config import Config, TrainConfig, derive, dump_toml, torch_dtype
from sdlora.data.cache import build_latent_cache, build_text_cache, encode_latents, from_text_cache
from sdlora.data.dataset import (
    ImageRecord,
    bucket_summary,
    epoch_batches,
    kohya_datasets,
    pair_regularization,
    tag_frequency,
)
from sdlora.data.doctor import diagnose
from sdlora.data.loader import epoch_loader
from sdlora.errors import DatasetError, LoraFileError, PlanError, TrainingError
from sdlora.generate.pipeline import render_samples
from sdlora.models.arch import component_names
from sdlora.models.loading import BaseModel, encode_prompt, load_base_model, tokenize
from sdlora.models.quantize import fp8_checkpointing, quantize_nf4, store_fp8, stored_bytes
from sdlora.train import checkpoint as ckpt
from sdlora.train.class_images import draw_class_images, plan_class_images
from sdlora.train.deferred import SkippedSteps, StepClock, skips_on_device, speed_stats
from sdlora.train.ema import AdapterEMA
from sdlora.train.loss import compute_loss
from sdlora.train.optimizer import evaluation_weights, make_lr_scheduler, make_optimizer
from sdlora.train.plan import check_fits, offloads
from sdlora.train.preservation import adapters_off, preservation_loss, preservation_prompts
from sdlora.train.trackers import log_samples, start_trackers, tracker_names
from sdlora.train.validation import (
    ValidationItem,
    best,
    prepare_validation,
    read_history,
    split_records,
    stalled,
    validation_loss,
    write_history,
)

if TYPE_CHECKING:
    from accelerate.optimizer import AcceleratedOptimizer
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

logger = get_logger(__name__)


def with_precision(cfg: Config) -> Config:
    """`train.mixed_precision = "auto"` made concrete for this machine; the run's config.toml records the choice."""
    if cfg.train.mixed_precision != "auto":
        return cfg
    if torch.cuda.is_available():
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        precision = "no"  # CPUs have no fast half-precision matmuls for training
    return derive(cfg, {"train.mixed_precision": precision})


# --- what the phases hand on ------------------------------------------------------------------------------------


@dataclass
class Run:
    """What every phase reads: the config (precision resolved), the accelerator, where the files go."""

    cfg: Config
    accelerator: Accelerator
    out: Path
    weight_dtype: torch.dtype  # the frozen base's; adapters stay fp32
    started_at: float

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


@dataclass
class Data:
    records: list[ImageRecord]  # trained on: the training images, then the regularization images paired with them
    validation: list[ImageRecord]  # held out for the validation loss
    reg: list[ImageRecord]  # the regularization images as found, with their folders' repeats
    init_lora: Path | None  # --init-lora's file, and its tensors (checked against the config)
    start: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Models:
    """The base model's parts as training uses them; after `_setup_optimizer` the trained ones are accelerate's."""

    base: BaseModel
    modules: dict[str, torch.nn.Module]  # "unet" and the text encoders, by component name
    adapted: list[str]  # the components with adapters
    trained: list[str]  # those and the text encoders whose new words (train.new_tokens) train
    adapters: Adapters
    trainable_parameters: int

    def encoders(self) -> list[torch.nn.Module]:
        return [self.modules[name] for name in component_names(self.base.arch)]

    def unwrapped(self, accelerator: Accelerator, name: str) -> torch.nn.Module:
        return accelerator.unwrap_model(self.modules[name])

    def adapter_tensors(self, accelerator: Accelerator) -> dict[str, torch.Tensor]:
        """Every trainable tensor as "<component>.<parameter name>": what checkpoints hold."""
        return {f"{name}.{key}": value for name in self.trained
                for key, value in trainable_parameters(self.unwrapped(accelerator, name)).items()}


@dataclass
class Caches:
    latents: dict | None  # (record index, flipped) -> encoded image, when data.cache_latents
    text: dict | None  # caption -> (states, pooled), when data.cache_text_encoder_outputs
    validation: list[ValidationItem]  # on the main process only


@dataclass
class Optimization:
    optimizer: AcceleratedOptimizer  # the wrapped optimizer is its .optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    noise_scheduler: object  # diffusers' DDPMScheduler
    prediction_type: str
    params: list[torch.nn.Parameter]  # the trained ones: what is clipped, stepped and averaged
    ema: AdapterEMA | None  # train.ema_decay's average of the adapter weights

    def averaged(self) -> contextlib.AbstractContextManager:
        """The weights files, samples and validation see: the EMA's when there is one, schedule-free AdamW's
        average with that optimizer (the config allows one of the two)."""
        return self.ema.applied() if self.ema is not None else evaluation_weights(self.optimizer.optimizer)


@dataclass
class Position:
    """Where training is: optimizer steps taken, the epoch, and the batch of the epoch to read next."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


@dataclass(frozen=True)
class Due:
    """What is due after a step (`due_after`)."""

    log: bool  # read the loss from the device and log it
    lora_name: str  # the LoRA file to write now ("" for none): the final name, or kohya's per-epoch or per-step name
    checkpoint: bool  # a resumable checkpoint (always written with a LoRA file)
    validate: bool  # the validation loss (when validation images are configured)
    sample: bool  # render the [sample] prompts
    final: bool  # training ends after this step


# --- the recipe ---------------------------------------------------------------------------------------------------


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

    Raises:
        DatasetError, LoraFileError, ModelError, PlanError, TrainingError: one line naming the file or key and the fix.
    """
    run = _setup_accelerator(with_precision(cfg))
    data = _setup_data(run, Path(init_lora) if init_lora else None)
    _setup_class_images(run, data)
    models = _setup_models(run, data)
    caches = _setup_caches(run, data, models)
    opt = _setup_optimizer(run, models)
    position = _restore(run, models, opt, resume)
    _announce(run, data, models, opt)
    history = read_history(run.out, position.step) if resume else []  # validation losses so far
    step_seconds = _loop(run, data, models, caches, opt, position, history, on_step)
    _finish(run, models, step_seconds, history, position.step)
    return run.out / f"{run.cfg.train.output_name}.safetensors"


def _setup_accelerator(cfg: Config) -> Run:
    out = Path(cfg.train.output_dir)
    # Ranks started by torchrun / accelerate launch on a machine without a GPU: accelerate joins them over gloo
    # only when told to use the CPU; otherwise each rank would train alone and they would overwrite each other.
    cpu_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu_ranks,
        mixed_precision=cfg.train.mixed_precision,
        log_with=tracker_names(cfg.train),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ~free speed on Ampere+, fine for training
        torch.backends.cudnn.allow_tf32 = True
    return Run(cfg, accelerator, out, torch_dtype(cfg.train.mixed_precision), time.time())


def _setup_data(run: Run, init_lora: Path | None) -> Data:
    """The images as `sdlora doctor` finds them, and --init-lora's file: anything broken stops the run here, before
    minutes of model loading, as does a config that cannot fit the GPU."""
    cfg = run.cfg
    report = diagnose(cfg.data)
    errors = [f for f in report.findings if f.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise DatasetError(f"{errors[0]}{more}; `sdlora doctor` lists every problem")
    if run.accelerator.is_main_process:
        for finding in report.findings:
            if finding.severity == "warning":
                logging.getLogger(__name__).warning("dataset: %s", finding)
    records, validation = split_records(report.records, cfg)
    data = Data(records + pair_regularization(records, report.reg_records), validation, report.reg_records,
                init_lora, read_init_lora(init_lora, cfg.lora) if init_lora else {})
    if run.device.type == "cuda":  # a run that cannot fit stops here, not with an OOM minutes later
        try:
            warning = check_fits(cfg, torch.cuda.get_device_properties(run.device).total_memory)
        except PlanError as e:
            raise TrainingError(str(e)) from None
        if warning:
            logger.warning(warning)
    return data


def _setup_class_images(run: Run, data: Data) -> None:
    """With data.class_images_per_image: the base model draws the class images it has not drawn before (the main
    process; the others wait), and they join data.reg_dirs' images as regularization images."""
    cfg = run.cfg
    if not cfg.data.class_images_per_image:
        return
    training = [r for r in data.records if not r.is_reg]
    planned = plan_class_images(training, cfg)
    with run.accelerator.main_process_first():
        data.reg = data.reg + draw_class_images(planned, cfg, run.device, run.weight_dtype)
    data.records = training + pair_regularization(training, data.reg)


def _setup_models(run: Run, data: Data) -> Models:
    """The frozen base in the training precision (the VAE in fp32), and the adapters of lora.method on it."""
    cfg, device, dtype = run.cfg, run.device, run.weight_dtype
    base = load_base_model(cfg.model.base_model, cfg.model.vae, cfg.model.allow_unsafe_pickle,
                           cfg.model.prediction_type, cfg.model.clip_skip)
    base.vae.to(device, torch.float32).requires_grad_(False)
    modules = {"unet": base.unet, **dict(zip(component_names(base.arch), base.text_encoders))}
    for name, module in modules.items():
        # The UNet joins the device after the caches are built: caching then has the memory to itself.
        module.requires_grad_(False).to("cpu" if name == "unet" else device, dtype)
    if cfg.model.quantize_base == "nf4":  # before injection: peft then wraps the 4-bit layers in its bnb LoRA layer
        quantize_nf4(base.unet, dtype, device)
    adapted = [n for n in modules
               if (n == "unet" and cfg.lora.train_unet) or (n != "unet" and cfg.lora.train_text_encoder)]
    adapters = adapters_for(cfg.lora, cfg.train.max_train_steps)
    try:  # the file of --init-lora mapped onto the model, each module at its own rank
        start = from_kohya_state_dict(data.start, {name: [n for n, _ in m.named_modules()] for name, m in
                                                   modules.items()}) if data.start else {}
        set_seed(cfg.train.seed)  # LoRA A matrices are initialised from the global RNG
        for name in adapted:
            adapters.inject(modules[name], name, start.get(name))
    except LoraFileError as e:
        raise LoraFileError(f"{data.init_lora}: {e}") from None
    t = cfg.train
    if t.new_tokens:  # after injection, which freezes each whole model
        for encoder, tokenizer in zip(base.text_encoders, base.tokenizers):
            add_trainable_words(encoder, tokenizer, t.new_tokens, t.new_token_vectors, t.new_token_init)
    trained = adapted + [n for n in component_names(base.arch) if t.new_tokens and n not in adapted]
    if cfg.model.quantize_base == "fp8":  # after injection, or peft would create the adapters in fp8 too
        store_fp8(base.unet, dtype)
    if cfg.train.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing(fp8_checkpointing if cfg.model.quantize_base == "fp8" else None)
        for name, encoder in zip(component_names(base.arch), base.text_encoders):
            if name in trained:
                # Non-reentrant: reentrant checkpointing (transformers 4.x's default) gives adapters inside a block
                # no gradient when the block's input needs none, as a frozen embedding's output does.
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_trainable, n_total = count_parameters(list(modules.values()))
    logger.info(f"trainable parameters: {n_trainable:,} of {n_total:,} ({100 * n_trainable / n_total:.3f}%) "
                f"in {', '.join(trained)}", main_process_only=True)
    return Models(base, modules, adapted, trained, adapters, n_trainable)


def _setup_caches(run: Run, data: Data, models: Models) -> Caches:
    """Images and captions encoded once where nothing about them changes between epochs; then the UNet joins the
    device and what nothing needs any more leaves it."""
    cfg, base = run.cfg, models.base
    main = run.accelerator.is_main_process
    validation = prepare_validation(data.validation, base, cfg) if data.validation and main else []
    latents = None
    if cfg.data.cache_latents != "none":
        with run.accelerator.main_process_first():
            latents = build_latent_cache(data.records, base.vae, cfg.data.cache_latents)
    text = build_text_cache(base, data.records, cfg.data) if cfg.data.cache_text_encoder_outputs else None
    if text is not None and cfg.train.preservation_weight:  # frozen encoders: the preservation prompts too
        prompts = cfg.train.preservation_prompts or preservation_prompts(list(text), 0, cfg)
        text |= build_text_cache(base, [], cfg.data, prompts)
    models.modules["unet"].to(run.device)
    _speed_up_unet(base.unet, cfg.train)
    offload_vae, offload_te = offloads(cfg)
    if offload_vae:  # nothing encodes or decodes images any more: free the device memory for activations
        base.vae.to("cpu")
    if offload_te:
        for encoder in models.encoders():
            encoder.to("cpu")
    return Caches(latents, text, validation)


def _setup_optimizer(run: Run, models: Models) -> Optimization:
    """The optimizer over the adapters, the LR schedule, the noise schedule; accelerate wraps the trained models."""
    from diffusers import DDPMScheduler

    cfg, t = run.cfg, run.cfg.train
    optimizer = make_optimizer(t, {name: models.modules[name] for name in models.trained},
                               fused=run.device.type == "cuda", lora=cfg.lora)
    lr_scheduler = make_lr_scheduler(t, optimizer)
    prediction_type = cfg.model.prediction_type or models.base.prediction_type
    noise_scheduler = DDPMScheduler.from_config(
        models.base.scheduler_config, prediction_type=prediction_type, rescale_betas_zero_snr=t.zero_terminal_snr
    )
    prepared = run.accelerator.prepare(*[models.modules[name] for name in models.trained], optimizer)
    models.modules.update(zip(models.trained, prepared[:-1]))
    params = [p for name in models.trained for p in models.modules[name].parameters() if p.requires_grad]
    ema = AdapterEMA(params, t) if t.ema_decay else None
    return Optimization(prepared[-1], lr_scheduler, noise_scheduler, prediction_type, params, ema)


def _restore(run: Run, models: Models, opt: Optimization, resume: str | None) -> Position:
    """With --resume: the adapters, optimizer, schedules, loss scale and position in the data, as they were saved."""
    if not resume:
        return Position()
    folder = ckpt.resolve_resume(resume, run.out)
    adapters, optimizer_state, state = ckpt.load_checkpoint(folder)
    current = models.adapter_tensors(run.accelerator)
    if set(current) != set(adapters):
        raise TrainingError("the checkpoint's adapter does not match this config (lora.rank/targets/train_* changed?)")
    with torch.no_grad():
        for key, param in current.items():
            param.copy_(adapters[key])
    models.adapters.load_state_dict({name: ckpt.load_extra(folder, name) for name in models.adapters.extra_states})
    if opt.ema is not None:
        opt.ema.load_state_dict(ckpt.load_extra(folder, "ema"))
    opt.optimizer.load_state_dict(optimizer_state)
    opt.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if run.accelerator.scaler is not None and state.get("scaler"):
        run.accelerator.scaler.load_state_dict(state["scaler"])
    position = Position(state["global_step"], state["epoch"], state["batch_in_epoch"])
    logger.info(f"resumed from {folder} at step {position.step} (epoch {position.epoch}, batch "
                f"{position.batch_in_epoch})")
    return position


def _announce(run: Run, data: Data, models: Models, opt: Optimization) -> None:
    """diffusers' "Running training" summary; the resolved config beside the run's files; the trackers."""
    cfg, t, accelerator = run.cfg, run.cfg.train, run.accelerator
    batches_per_epoch = len(epoch_batches(data.records, t.batch_size, t.seed, 0))
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / accelerator.num_processes / t.gradient_accumulation_steps))
    logger.info(
        "***** Running training *****\n"
        f"  images: {_counts(data.records)}, buckets: {bucket_summary(data.records)}\n"
        f"  batch size per device: {t.batch_size}, processes: {accelerator.num_processes}, "
        f"accumulation: {t.gradient_accumulation_steps}\n"
        f"  steps: {t.max_train_steps} (~{steps_per_epoch} per epoch), mixed precision: {t.mixed_precision}, "
        f"prediction: {opt.prediction_type}",
        main_process_only=True,
    )
    if accelerator.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
        write_text(run.out / "config.toml", dump_toml(cfg))
        start_trackers(run.accelerator, run.cfg, run.out)


def _loop(run: Run, data: Data, models: Models, caches: Caches, opt: Optimization, position: Position,
          history: list[dict], on_step: Callable[[dict], bool | None] | None) -> list[float]:
    """Train from `position` to train.max_train_steps (or until `on_step` says stop); returns the step times."""
    cfg, t, accelerator, device = run.cfg, run.cfg.train, run.accelerator, run.device
    loss_sum = torch.zeros((), device=device)
    # Steps with a NaN/Inf loss or gradient are skipped. A fused AdamW skips them on the device, and the host reads
    # the flags only at check points; other optimizers (and AdaLoRA's allocator) need each flag before their step.
    on_device = not models.adapters.needs_each_flag and skips_on_device(opt.optimizer.optimizer)
    skipped = SkippedSteps(t.max_nonfinite_steps, lambda streak, step: TrainingError(
        _nonfinite_message(t, streak, step, run.out)))
    clock = StepClock(device)  # data + forward + backward + update, without saving/sampling/validation

    def settle() -> None:  # the host catches up with the device: skipped steps (may stop the run), step times
        clock.settle()
        skipped.settle()

    for name in models.trained:
        models.modules[name].train()
    if caches.validation and position.step == 0:
        _validate(run, data, models, caches, opt, position, history)  # the untrained baseline
    # The with-block closes the bar before an error message is printed, so the message is the last line.
    with tqdm(total=t.max_train_steps, initial=position.step, desc="training", unit="step",
              disable=not accelerator.is_local_main_process) as progress:
        stopped = False
        while position.step < t.max_train_steps and not stopped:
            batches = _shard(epoch_batches(data.records, t.batch_size, t.seed, position.epoch), accelerator)
            loader = epoch_loader(data.records, batches, position.batch_in_epoch, cfg, position.epoch,
                                  caches.latents, models.base.tokenizers, device)
            # One optimizer step per group of micro-batches; the last group of an epoch may be shorter.
            for start in range(position.batch_in_epoch, len(batches), t.gradient_accumulation_steps):
                group = range(start, min(start + t.gradient_accumulation_steps, len(batches)))
                clock.start()
                step_loss = _forward_backward(run, models, caches, opt, loader, group, position.step)
                nonfinite, flag = _guarded_step(run, models, opt, step_loss, position.step, on_device)
                clock.stop()
                opt.optimizer.zero_grad(set_to_none=True)
                opt.lr_scheduler.step()
                position.step += 1
                if opt.ema is not None:
                    opt.ema.after_step(position.step)
                progress.update(1)
                loss_sum += torch.where(nonfinite, 0.0, step_loss)
                skipped.add(position.step, flag, len(group))

                epoch_done = group[-1] + 1 == len(batches)
                due = due_after(position.step, position.epoch, epoch_done, position.step >= t.max_train_steps, cfg)
                if due.log or not on_device or skipped.due():
                    settle()
                mean_loss = None
                if due.log and skipped.finite_micro_batches:
                    mean_loss = accelerator.reduce(loss_sum, reduction="mean").item() / skipped.finite_micro_batches
                    lr = opt.lr_scheduler.get_last_lr()[0]
                    progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                    accelerator.log({"loss": mean_loss, "lr": lr, "skipped_steps": skipped.skipped}, step=position.step)
                    loss_sum.zero_()
                    skipped.finite_micro_batches = 0
                step_info = {"step": position.step, "max_steps": t.max_train_steps, "loss": mean_loss,
                             "lr": opt.lr_scheduler.get_last_lr()[0]}
                if on_step is not None and on_step(step_info) is False:
                    stopped = True  # a stop asked for at this step makes it the last: saved as at the end
                    due = due_after(position.step, position.epoch, epoch_done, True, cfg)
                epoch_after = position.epoch + epoch_done
                after = Position(position.step, epoch_after, 0 if epoch_done else group[-1] + 1)
                if due.checkpoint:
                    settle()  # a run that has to stop for NaN stops before it saves
                    _save(run, data, models, opt, due, after)
                if due.validate and caches.validation:
                    _validate(run, data, models, caches, opt, after, history)
                    if stalled(history, t.early_stopping_patience, t.early_stopping_min_delta):
                        accelerator.set_trigger()
                # Every process asks (only the main one validates), so all of them stop at the same step.
                if due.validate and t.early_stopping_patience and accelerator.check_trigger() and not due.final:
                    logger.info(f"early stopping at step {position.step}: no lower validation loss in the last "
                                f"{t.early_stopping_patience} validations", main_process_only=True)
                    stopped = True
                    due = due_after(position.step, position.epoch, epoch_done, True, cfg)
                    _save(run, data, models, opt, due, after)
                if due.sample and accelerator.is_main_process:
                    with accelerator.autocast(), opt.averaged():
                        samples = render_samples(models.base, models.unwrapped(accelerator, "unet"),
                                                 [accelerator.unwrap_model(m) for m in models.encoders()], cfg.sample,
                                                 cfg.data.largest_resolution(), run.out / "samples",
                                                 f"step{position.step:08d}")
                    log_samples(accelerator, samples, position.step)
                if due.final:
                    break
            position.epoch, position.batch_in_epoch = position.epoch + 1, 0
    return clock.seconds


def due_after(step: int, epoch: int, epoch_done: bool, final: bool, cfg: Config) -> Due:
    """What is due after optimizer step `step` (counted from 1) of epoch `epoch` (from 0): a pure function of the
    position and the config.

    Args:
        epoch_done: the step ended the epoch.
        final: the last step (train.max_train_steps, or a stop asked for): the LoRA under its final name, a
            checkpoint, validation and samples are all due.
    """
    t, s, d = cfg.train, cfg.sample, cfg.data
    if final:
        lora_name = t.output_name
    elif epoch_done and t.save_every_n_epochs and (epoch + 1) % t.save_every_n_epochs == 0:
        lora_name = f"{t.output_name}-{epoch + 1:06d}"  # kohya's per-epoch naming
    elif t.save_every_n_steps and step % t.save_every_n_steps == 0:
        lora_name = f"{t.output_name}-step{step:08d}"
    else:
        lora_name = ""
    validate_now = (t.validate_every_n_steps and step % t.validate_every_n_steps == 0) or (
        not t.validate_every_n_steps and epoch_done)
    sample_now = (s.every_n_steps and step % s.every_n_steps == 0) or (
        epoch_done and s.every_n_epochs and (epoch + 1) % s.every_n_epochs == 0)
    return Due(
        log=step % t.log_every_n_steps == 0 or step >= t.max_train_steps,
        lora_name=lora_name,
        checkpoint=bool(lora_name) or bool(t.checkpoint_every_n_steps and step % t.checkpoint_every_n_steps == 0),
        validate=bool(d.validation_split or d.validation_dirs) and bool(final or validate_now),
        sample=bool(s.prompts) and bool(final or sample_now),
        final=final,
    )


def _forward_backward(run: Run, models: Models, caches: Caches, opt: Optimization, loader, group: range,
                      step: int) -> torch.Tensor:
    """The loss of one optimizer step's micro-batches, summed and detached, with their gradients accumulated.

    All randomness of a micro-batch comes from (seed, step, micro-batch, rank) alone."""
    cfg, accelerator = run.cfg, run.accelerator
    base, unet, encoders = models.base, models.modules["unet"], models.encoders()
    te_grad = any(name != "unet" for name in models.trained)
    step_loss = torch.zeros((), device=run.device)
    for micro, position in enumerate(group):
        seed = _step_seed(cfg.train.seed, step, micro, accelerator.process_index)
        torch.manual_seed(seed)
        batch = next(loader)
        with contextlib.ExitStack() as stack:
            if position != group[-1]:  # gradients are all-reduced only on the group's last micro-batch
                for name in models.trained:
                    stack.enter_context(accelerator.no_sync(models.modules[name]))
            with accelerator.autocast():
                latents = batch["latents"] if "latents" in batch else encode_latents(base.vae, batch["pixels"])
                if caches.text is not None:
                    states, pooled = from_text_cache(caches.text, batch["captions"], run.device)
                else:
                    with torch.set_grad_enabled(te_grad):
                        states, pooled = encode_prompt(base.arch, encoders, batch["input_ids"])
                time_ids = batch["time_ids"] if base.arch == "sdxl" else None
                generator = torch.Generator(run.device).manual_seed(seed)
                loss = compute_loss(unet, opt.noise_scheduler, latents, states, pooled, time_ids, batch.get("mask"),
                                    generator, cfg.train, run.weight_dtype, loss_weights=batch.get("loss_weights"))
                preserve = _preservation(run, models, caches, opt, batch, latents, time_ids, generator, step)
            # AdaLoRA's orthogonality penalty (fp32, no autocast) and the preservation term join the gradient, not
            # the logged loss.
            accelerator.backward((loss + models.adapters.penalty() + preserve) / len(group))
        step_loss += loss.detach()
    return step_loss


def _preservation(run: Run, models: Models, caches: Caches, opt: Optimization, batch: dict, latents: torch.Tensor,
                  time_ids: torch.Tensor | None, generator: torch.Generator, step: int) -> torch.Tensor | float:
    """train.preservation_weight times the distance of the adapted model's prediction from the base model's on the
    batch's preservation prompts (0 when off). Through the unwrapped modules: their gradients join the wrapped
    forward's in the one backward pass, which is what a distributed wrapper all-reduces."""
    cfg, accelerator = run.cfg, run.accelerator
    if not cfg.train.preservation_weight:
        return 0.0
    prompts = preservation_prompts(batch["captions"], step, cfg)
    unet = models.unwrapped(accelerator, "unet")
    trained = [models.unwrapped(accelerator, name) for name in models.trained]
    if caches.text is not None:  # frozen encoders: the base and the adapted states are the same
        adapted = base = from_text_cache(caches.text, prompts, run.device)
    else:
        encoders = [accelerator.unwrap_model(m) for m in models.encoders()]
        ids = tokenize(models.base.tokenizers, prompts, cfg.data.max_token_length)
        with torch.no_grad(), adapters_off(trained):
            base = encode_prompt(models.base.arch, encoders, ids)
        with torch.set_grad_enabled(any(name != "unet" for name in models.trained)):
            adapted = encode_prompt(models.base.arch, encoders, ids)
    return cfg.train.preservation_weight * preservation_loss(unet, opt.noise_scheduler, latents, adapted, base,
                                                             time_ids, generator, run.weight_dtype, trained, cfg.train)


def _guarded_step(run: Run, models: Models, opt: Optimization, step_loss: torch.Tensor, step: int,
                  on_device: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradients and take the optimizer step, unless the loss or a gradient is NaN/Inf: an AdamW update with
    NaN would ruin the adapter for good. Returns (non-finite on the device, the flag `SkippedSteps` reads)."""
    accelerator = run.accelerator
    grad_norm = accelerator.clip_grad_norm_(opt.params, run.cfg.train.max_grad_norm or math.inf)
    nonfinite = ~(torch.isfinite(grad_norm) & torch.isfinite(step_loss))
    if on_device:
        if accelerator.scaler is None:  # under fp16 the GradScaler passes its own flag
            opt.optimizer.optimizer.found_inf = nonfinite.float()
        opt.optimizer.step()
        return nonfinite, nonfinite
    finite = not nonfinite.item()
    if finite or accelerator.scaler is not None:
        opt.optimizer.step()  # under fp16 the GradScaler skips a non-finite step itself
    models.adapters.after_step(step + 1, finite)  # AdaLoRA scores ranks from the (unscaled, clipped) gradients
    return nonfinite, torch.tensor(not finite)  # read already: the check must not wait for the device again


def _save(run: Run, data: Data, models: Models, opt: Optimization, due: Due, after: Position) -> None:
    """A checkpoint to resume from `after`, and the LoRA file `due` names; written by the main process."""
    accelerator, t = run.accelerator, run.cfg.train
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    state = {"global_step": after.step, "epoch": after.epoch, "batch_in_epoch": after.batch_in_epoch,
             "lr_scheduler": opt.lr_scheduler.state_dict(),
             "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}
    ckpt.save_checkpoint(run.out / f"checkpoint-{after.step}", models.adapter_tensors(accelerator),
                         opt.optimizer.state_dict(), state,
                         {**models.adapters.state_dict(), **({"ema": opt.ema.state_dict()} if opt.ema else {})})
    ckpt.prune(ckpt.list_checkpoints(run.out), t.save_last_k)
    if due.lora_name:
        with opt.averaged():
            _export(run, data, models, opt, after, run.out / f"{due.lora_name}.safetensors",
                    keep=0 if due.final else t.save_last_k)


def _export(run: Run, data: Data, models: Models, opt: Optimization, at: Position, path: Path, keep: int) -> None:
    cfg, base = run.cfg, models.base
    layers = {name: models.adapters.layers(name, models.unwrapped(run.accelerator, name)) for name in models.adapted}
    training = [r for r in data.records if not r.is_reg]
    info = RunInfo(steps=at.step, epoch=at.epoch, num_train_images=sum(r.repeats for r in training),
                   training_started_at=run.started_at, training_finished_at=time.time(),
                   tag_frequency=tag_frequency(data.records), dataset_dirs=_dataset_dirs(training),
                   sd_model_name=Path(cfg.model.base_model).name, prediction_type=opt.prediction_type,
                   clip_skip=cfg.model.clip_skip,
                   num_reg_images=sum(r.repeats for r in data.reg), reg_dataset_dirs=_dataset_dirs(data.reg),
                   # as kohya with a --dataset_config: each subset's options
                   extra={"ss_datasets": json.dumps(kohya_datasets(data.records, cfg.train.batch_size))}
                   if cfg.data.subsets else {})
    metadata = build_metadata(cfg, base.arch, info)
    dtype = torch_dtype(cfg.export.dtype)
    words = _trained_words(run, models)
    if "kohya" in cfg.export.formats:
        bundle = bundle_tensors(words, base.arch, dtype) if cfg.export.bundle_embeddings else {}
        save_kohya_state_dict({**to_kohya_state_dict(layers, base.arch, dtype, dict(base.unet.config)), **bundle},
                              path, metadata)
    if words and path.stem in (cfg.train.output_name, _best_path(run).stem):  # not beside intermediate files
        save_embeddings(words, base.arch, _embeddings_dir(run, path.stem))
    if "peft" in cfg.export.formats:
        save_peft_lora(layers, path.with_suffix(""), dtype)
    if keep:
        intermediate = sorted(path.parent.glob(f"{cfg.train.output_name}-*.safetensors"),
                              key=lambda p: p.stat().st_mtime)
        ckpt.prune(intermediate, keep)
    logging.getLogger(__name__).info("saved %s", path)


def _validate(run: Run, data: Data, models: Models, caches: Caches, opt: Optimization, at: Position,
              history: list[dict]) -> None:
    """The validation loss now, appended to validation.csv and logged; with early stopping, a new lowest one saves
    the LoRA as `<output_name>.best.safetensors`, which becomes the final file at the end."""
    accelerator = run.accelerator
    with accelerator.autocast(), opt.averaged():
        value = validation_loss(caches.validation, models.unwrapped(accelerator, "unet"),
                                [accelerator.unwrap_model(m) for m in models.encoders()], models.base.arch,
                                opt.noise_scheduler, run.cfg.train, run.weight_dtype, compute_loss)
    history.append({"step": at.step, "epoch": at.epoch, "val_loss": value})
    write_history(run.out, history)
    accelerator.log({"val_loss": value}, step=at.step)
    if run.cfg.train.early_stopping_patience and best(history) is history[-1]:
        with opt.averaged():
            _export(run, data, models, opt, at, _best_path(run), keep=0)


def _finish(run: Run, models: Models, step_seconds: list[float], history: list[dict], last_step: int) -> None:
    """Speed and memory into train_stats.json, what the adapters report, the best validation step; with early
    stopping, the LoRA of that step becomes the final file."""
    t, accelerator, device, out = run.cfg.train, run.accelerator, run.device, run.out
    lowest = best(history)
    if accelerator.is_main_process:
        stats = speed_stats(step_seconds, t.batch_size * t.gradient_accumulation_steps * accelerator.num_processes,
                            device)
        stats["trainable_parameters"] = models.trainable_parameters
        # UNet and text-encoder weights on the device as stored (model.quantize_base shrinks them), for `sdlora bench`.
        stats["base_weights_gb"] = stored_bytes([accelerator.unwrap_model(m) for m in models.modules.values()],
                                                device) / 1e9
        if t.early_stopping_patience:  # what the report says about the final file
            stats["early_stopping"] = {"patience": t.early_stopping_patience, "last_step": last_step,
                                       "final_lora_step": lowest["step"] if lowest else last_step}
        write_text(out / "train_stats.json", json.dumps(stats, indent=1))
        memory = f", peak memory {stats['peak_allocated_gb']:.2f} GB" if "peak_allocated_gb" in stats else ""
        logger.info(f"speed: {stats['images_per_s']:.2f} images/s, {stats['step_s_median']:.3f} s/step (median "
                    f"after warm-up){memory}", main_process_only=True)
        note = models.adapters.report(out)
        if note:
            logger.info(note, main_process_only=True)
    if lowest:
        logger.info(f"lowest validation loss {lowest['val_loss']:.5f} at step {lowest['step']} (epoch "
                    f"{lowest['epoch']}); every value is in {out / 'validation.csv'}", main_process_only=True)
    if accelerator.is_main_process and _best_path(run).is_file():
        final = out / f"{t.output_name}.safetensors"
        os.replace(_best_path(run), final)  # one rename: the final name always holds a whole file
        if t.new_tokens:
            best_embeddings = _embeddings_dir(run, _best_path(run).stem)
            with atomic_dir(_embeddings_dir(run, t.output_name)) as folder:
                for file in best_embeddings.iterdir():
                    os.replace(file, folder / file.name)
            best_embeddings.rmdir()
        logger.info(f"early stopping: {final.name} is the LoRA of step {lowest['step'] if lowest else 0}, the lowest "
                    "validation loss", main_process_only=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()


# --- helpers ------------------------------------------------------------------------------------------------------


def _counts(records: list[ImageRecord]) -> str:
    """"20 (40 with repeats)", and the regularization images the same way when there are any."""
    parts = []
    for reg in (False, True):
        chosen = [r for r in records if r.is_reg == reg]
        if chosen:
            parts.append(f"{len(chosen)} ({sum(r.repeats for r in chosen)} with repeats)"
                         + (" regularization" if reg else ""))
    return " + ".join(parts)


def _dataset_dirs(records: list[ImageRecord]) -> dict[str, dict[str, int]]:
    """kohya's ss_dataset_dirs / ss_reg_dataset_dirs: {folder: {"n_repeats", "img_count"}}; an image trained at two
    resolutions (a record for each) counts once, as in ss_tag_frequency."""
    dirs: dict[str, dict[str, int]] = {}
    for r in {(r.dataset_dir, r.path): r for r in records}.values():
        entry = dirs.setdefault(r.dataset_dir, {"n_repeats": r.repeats, "img_count": 0})
        entry["img_count"] += 1
    return dirs


def _trained_words(run: Run, models: Models) -> dict[str, dict[str, torch.Tensor]]:
    """{text encoder: {new word: its trained vectors}} (empty without train.new_tokens)."""
    t = run.cfg.train
    if not t.new_tokens:
        return {}
    return {name: split_vectors(trained_vectors(models.unwrapped(run.accelerator, name)), t.new_tokens)
            for name in component_names(models.base.arch)}


def _embeddings_dir(run: Run, lora_stem: str) -> Path:
    """Where the standalone embeddings of the LoRA file `<lora_stem>.safetensors` go."""
    return run.out / "embeddings" / lora_stem


def _best_path(run: Run) -> Path:
    """Where early stopping keeps the LoRA of the lowest validation loss so far."""
    return run.out / f"{run.cfg.train.output_name}.best.safetensors"


def _speed_up_unet(unet: UNet2DConditionModel, t: TrainConfig) -> None:
    if t.compile != "none":
        backends = torch._dynamo.list_backends(exclude_tags=())
        if t.compile_backend not in backends:
            raise TrainingError(f"train.compile_backend: {t.compile_backend!r} is not one of {', '.join(backends)}")
    if t.channels_last:
        # typeshed's functools.wraps does not bind self, and diffusers wraps ModelMixin.to in it.
        unet.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
    mode = None if t.compile_mode == "default" else t.compile_mode
    if t.compile == "regional":
        unet.compile_repeated_blocks(backend=t.compile_backend, mode=mode)
    elif t.compile == "full":
        unet.compile(backend=t.compile_backend, mode=mode)


def _shard(batches: list[list[int]], accelerator) -> list[list[int]]:
    """This process's share of the epoch's batches; the list is cycled so every process gets as many batches."""
    world = accelerator.num_processes
    if world == 1:
        return batches
    padded = batches + batches[: (-len(batches)) % world]
    return padded[accelerator.process_index :: world]


def _step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1009 + micro * 31 + rank) % (2**63)


def _nonfinite_message(t: TrainConfig, streak: int, step: int, out: Path) -> str:
    causes = [f"lower train.learning_rate (now {t.learning_rate:g})"]
    if t.mixed_precision == "fp16":
        causes.append("use mixed_precision = \"bf16\" if the GPU has it (fp16 overflows)")
    if t.max_grad_norm == 0:
        causes.append("set train.max_grad_norm = 1.0")
    return (f"loss or gradients were NaN/Inf for {streak} steps in a row (steps {step - streak + 1}-{step}); "
            f"those updates were skipped, so the weights and the checkpoints in {out} are intact. Likely fix: "
            + ", or ".join(causes))
