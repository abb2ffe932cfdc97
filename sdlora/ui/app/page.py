"""The page: the gr.Blocks layout that wires each tab's fields to its handlers, and `launch` (127.0.0.1 unless told
otherwise, one job at a time)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from sdlora.config import SAMPLERS
from sdlora.ui.app.captions import add_uploads, load_captions, save_captions
from sdlora.ui.app.engine import Engine
from sdlora.ui.app.generate import (
    SLOTS,
    insert_trigger,
    lora_details,
    read_png_parameters,
    run_generate,
    run_grid,
    slot_switch,
    switch_on,
)
from sdlora.ui.app.loras import LORA_COLUMNS, lora_table
from sdlora.ui.app.settings import OWN_VAE, AppSettings, lora_choices, model_choices, size_for_model, vae_choices
from sdlora.ui.app.train import (
    ADVANCED_KEYS,
    key_choices,
    preset_advanced,
    preset_choices,
    preset_start,
    preset_values,
    resumable_runs,
    run_resume,
    run_train,
    save_preset,
    stop_train,
)


def build_app(settings: AppSettings):
    """The gr.Blocks page (not launched). `launch` adds the queue and the server settings."""
    import gradio as gr

    engine = Engine(settings)
    loras = lora_choices(settings)
    size = size_for_model(settings, settings.model)
    with gr.Blocks(title="sdlora", analytics_enabled=False) as demo:
        demo.sdlora_engine = engine
        with gr.Row(equal_height=True):
            model = gr.Dropdown(model_choices(settings), value=settings.model, label="Base model", elem_id="model",
                                scale=3)
            vae = gr.Dropdown(vae_choices(settings), value=OWN_VAE, label="VAE", elem_id="vae", scale=2,
                              info=f"the model's own, or a VAE file / diffusers VAE folder in {settings.models_dir}")
            gr.Textbox(str(settings.lora_dir), label="LoRA folder", interactive=False, scale=2)
            refresh = gr.Button("Refresh lists", elem_id="refresh", scale=0, min_width=120)
        with gr.Tabs():
            with gr.Tab("Generate"):
                with gr.Row():
                    with gr.Column(scale=3):
                        prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                            placeholder="zkstyle, a boat   (tags like <lora:name:0.8> work too)")
                        negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="negative")
                        slots, names, switches = [], [], []
                        for i in range(SLOTS):
                            with gr.Row(equal_height=True):
                                on = gr.Checkbox(False, label="on", elem_id=f"lora-on-{i}", scale=0, min_width=70)
                                name = gr.Dropdown(loras, value=loras[i] if i < len(loras) else None,
                                                   label=f"LoRA {i + 1}", elem_id=f"lora-name-{i}", scale=3)
                                weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="weight",
                                                   elem_id=f"lora-weight-{i}", scale=2)
                            slots += [on, name, weight]
                            names.append(name)
                            switches.append(on)
                        with gr.Row():
                            sampler = gr.Dropdown(list(SAMPLERS), value="euler", label="Sampler", elem_id="sampler")
                            steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="steps")
                            cfg = gr.Slider(0, 30, value=7.0, step=0.5, label="CFG scale", elem_id="cfg")
                        with gr.Row():
                            width = gr.Slider(64, 2048, value=size, step=8, label="Width", elem_id="width")
                            height = gr.Slider(64, 2048, value=size, step=8, label="Height", elem_id="height")
                        with gr.Row():
                            seed = gr.Number(-1, precision=0, label="Seed (-1 = random)", elem_id="seed")
                            count = gr.Slider(1, 16, value=1, step=1, label="Batch count", elem_id="count")
                            batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size (images per call)",
                                                   elem_id="batch-size")
                        png = gr.File(label="Read parameters from PNG", file_types=[".png"], elem_id="png-file")
                    with gr.Column(scale=2):
                        go = gr.Button("Generate", variant="primary", elem_id="generate")
                        gallery = gr.Gallery(label="Images", columns=2, format="png", elem_id="gallery")
                        used_seed = gr.Number(label="Seed used", precision=0, interactive=False, elem_id="used-seed")
                        info = gr.Markdown(elem_id="info")
            with gr.Tab("LoRAs"):
                gr.Markdown(f"Every LoRA file in {settings.lora_dir}. A file for another model family than the base "
                            "model is marked and cannot be switched on. Pick one (or click its row) to see its "
                            "picture and trigger words.")
                lora_list = gr.Dataframe(lora_table(settings, settings.model), headers=LORA_COLUMNS, type="array",
                                         interactive=False, wrap=True, elem_id="lora-table")
                with gr.Row():
                    with gr.Column(scale=2):
                        with gr.Row(equal_height=True):
                            browse = gr.Dropdown(loras, value=None, label="LoRA", elem_id="browse-lora", scale=3)
                            browse_use = gr.Button("Switch on in a free slot", elem_id="browse-use", scale=1)
                        browse_info = gr.Markdown(elem_id="browse-info")
                        browse_words = gr.Dataset(components=["textbox"], samples=[], type="index",
                                                  label="Trigger words (click one to put it in the prompt)",
                                                  elem_id="browse-words")
                        words = gr.State([])
                    with gr.Column(scale=1):
                        browse_image = gr.Image(label="Picture", type="pil", format="png", interactive=False,
                                                elem_id="browse-preview")
            with gr.Tab("X/Y grid"):
                with gr.Row():
                    with gr.Column(scale=2):
                        gr.Markdown("Prompt, sampler, size and the switched-on LoRA slots come from the Generate "
                                    "tab; the LoRA below takes each weight across the grid.")
                        grid_lora = gr.Dropdown(loras, value=loras[0] if loras else None, label="LoRA (X axis)",
                                                elem_id="grid-lora")
                        grid_weights = gr.Textbox("0, 0.5, 1", label="Weights", elem_id="grid-weights")
                        y_axis = gr.Radio(["seed", "prompt", "LoRA file", "second LoRA weight"], value="seed",
                                          label="Y axis", elem_id="grid-y")
                        y_values = gr.Textbox("1, 2", lines=3, label="Y values",
                                              info="seeds separated by commas; one prompt per line; one LoRA "
                                                   "file per line (e.g. a run's epochs); or for a second LoRA "
                                                   "its name, a colon and its weights",
                                              elem_id="grid-values")
                        grid_go = gr.Button("Make grid", variant="primary", elem_id="grid-generate")
                    with gr.Column(scale=3):
                        grid_image = gr.Image(label="Grid", type="filepath", format="png", interactive=False,
                                              elem_id="grid-image")
                        grid_info = gr.Markdown(elem_id="grid-info")
            with gr.Tab("Train"):
                presets = preset_choices(settings)
                preset = "tiny.toml" if "tiny.toml" in presets else (presets[0] if presets else None)
                start = preset_start(settings, preset)
                with gr.Row():
                    with gr.Column():
                        train_preset = gr.Dropdown(presets, value=preset, label=f"Preset ({settings.configs_dir}/)",
                                                   elem_id="train-preset")
                        train_data = gr.Textbox(start[0], label=f"Dataset folder (inside {settings.data_dir})",
                                                elem_id="train-data")
                        train_name = gr.Textbox("my_lora", label=f"LoRA name (written to {settings.lora_dir}/<name>/)",
                                                elem_id="train-name")
                        train_trigger = gr.Textbox(start[1], label="Trigger word (prepended to every caption)",
                                                   elem_id="train-trigger")
                        with gr.Row():
                            train_rank = gr.Slider(1, 128, value=start[2], step=1, label="Rank", elem_id="train-rank")
                            train_lr = gr.Number(start[3], label="Learning rate", elem_id="train-lr")
                            train_steps = gr.Number(start[4], precision=0, minimum=1, label="Steps",
                                                    elem_id="train-steps")
                            train_method = gr.Dropdown(["lora", "dora", "adalora", "loha", "lokr"], value=start[5],
                                                       label="Method (see the README's adapter methods)",
                                                       elem_id="train-method")
                        with gr.Accordion("Keep what the base model knows (prior preservation)", open=False):
                            train_reg = gr.Textbox(start[6], label=f"Regularization images folder (inside "
                                                   f"{settings.data_dir}; empty = none)", elem_id="train-reg")
                            with gr.Row():
                                train_class_images = gr.Checkbox(start[8], label="Auto class images (the base model "
                                                                 "draws one per training image)",
                                                                 elem_id="train-class-images")
                                train_class_word = gr.Textbox(start[7], label="Class word (replaces the trigger)",
                                                              elem_id="train-class-word")
                            train_preservation = gr.Checkbox(start[9], label="Base-prediction preservation (no "
                                                             "images; slower steps)", elem_id="train-preservation")
                        adv = dict(zip(ADVANCED_KEYS, start[10:]))
                        with gr.Accordion("Advanced (the rest comes from the preset)", open=False):
                            with gr.Row():
                                adv_targets = gr.Dropdown(key_choices("lora.targets"), value=adv["lora.targets"],
                                                          label="Targets (attn, + MLP, + ResNet convs)",
                                                          elem_id="adv-targets")
                                adv_init = gr.Dropdown(key_choices("lora.init"), value=adv["lora.init"],
                                                       label="Init", elem_id="adv-init")
                                adv_quantize = gr.Dropdown(key_choices("model.quantize_base"),
                                                           value=adv["model.quantize_base"],
                                                           label="Quantized base (GPU)", elem_id="adv-quantize")
                            with gr.Row(equal_height=True):
                                adv_te = gr.Checkbox(adv["lora.train_text_encoder"], label="Train the text encoder",
                                                     elem_id="adv-te")
                                adv_te_lr = gr.Number(adv["train.text_encoder_lr"], label="Text encoder LR (empty "
                                                      "or 0: the learning rate)", elem_id="adv-te-lr")
                                adv_loraplus = gr.Number(adv["train.loraplus_lr_ratio"], label="LoRA+ ratio (0: off)",
                                                         elem_id="adv-loraplus")
                            with gr.Row():
                                adv_resolution = gr.Textbox(adv["data.resolution"], label="Resolution (\"512, 768\": "
                                                            "both)", elem_id="adv-resolution")
                                adv_batch = gr.Number(adv["train.batch_size"], precision=0, label="Batch size",
                                                      elem_id="adv-batch")
                                adv_save_epochs = gr.Number(adv["train.save_every_n_epochs"], precision=0,
                                                            label="Save every N epochs (0: off)",
                                                            elem_id="adv-save-epochs")
                                adv_save_steps = gr.Number(adv["train.save_every_n_steps"], precision=0,
                                                           label="Save every N steps (0: off)",
                                                           elem_id="adv-save-steps")
                            adv_prompts = gr.Textbox(adv["sample.prompts"], lines=3, label="Sample prompts (one per "
                                                     "line; --w --h --d --s --l --n as kohya)", elem_id="adv-prompts")
                            adv_sample_every = gr.Number(adv["sample.every_n_steps"], precision=0,
                                                         label="Sample every N steps (0: at the end)",
                                                         elem_id="adv-sample-every")
                            with gr.Row():
                                adv_ema = gr.Number(adv["train.ema_decay"], label="EMA decay (0: off; ~0.999 for "
                                                    "long runs)", elem_id="adv-ema")
                                adv_clip_skip = gr.Number(adv["model.clip_skip"], precision=0, label="Clip skip "
                                                          "(SD1/SD2; empty or 0: none, 2: anime models)",
                                                          elem_id="adv-clip-skip")
                                adv_min_t = gr.Number(adv["train.min_timestep"], precision=0,
                                                      label="Min timestep", elem_id="adv-min-t")
                                adv_max_t = gr.Number(adv["train.max_timestep"], precision=0,
                                                      label="Max timestep (empty or 0: 1000)",
                                                      elem_id="adv-max-t")
                            with gr.Row():
                                adv_words = gr.Textbox(adv["train.new_tokens"], label="New words (pivotal tuning; "
                                                       "comma-separated, put them in the captions)",
                                                       elem_id="adv-new-words")
                                adv_embedding_lr = gr.Number(adv["train.embedding_lr"], label="New words' LR (empty "
                                                             "or 0: the learning rate)", elem_id="adv-embedding-lr")
                            with gr.Row(equal_height=True):
                                preset_name = gr.Textbox(label=f"Preset name (saved in {settings.configs_dir}/)",
                                                         elem_id="preset-name", scale=3)
                                preset_save = gr.Button("Save as preset", elem_id="preset-save", scale=1)
                        advanced = [adv_targets, adv_te, adv_te_lr, adv_resolution, adv_batch, adv_init,
                                    adv_quantize, adv_loraplus, adv_prompts, adv_sample_every, adv_save_epochs,
                                    adv_save_steps, adv_ema, adv_clip_skip, adv_min_t,
                                    adv_max_t, adv_words, adv_embedding_lr]  # in ADVANCED_KEYS order
                        with gr.Row():
                            train_go = gr.Button("Train", variant="primary", elem_id="train")
                            train_stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
                        with gr.Row(equal_height=True):
                            runs = gr.Dropdown(resumable_runs(settings), value=None, label="Stopped runs (with a "
                                               f"checkpoint, in {settings.lora_dir})", elem_id="train-runs", scale=3)
                            resume_go = gr.Button("Resume", elem_id="train-resume", scale=1)
                        with gr.Accordion("Captions of the dataset folder", open=False):
                            uploads = gr.File(file_count="multiple", type="filepath", label="Upload images and "
                                              ".txt captions into the dataset folder", elem_id="uploads")
                            upload_go = gr.Button("Add to the folder", elem_id="upload")
                            with gr.Row():
                                captions_load = gr.Button("Load captions", elem_id="captions-load")
                                captions_save = gr.Button("Save captions", elem_id="captions-save")
                            captions = gr.Dataframe(headers=["image file", "caption"], datatype=["str", "str"],
                                                    # gradio 6 still reads (count, "fixed") here; its column_limits
                                                    # is not implemented yet.
                                                    column_count=(2, "fixed"),  # type: ignore[arg-type]
                                                    type="array", interactive=True,
                                                    wrap=True, elem_id="captions")
                            captions_info = gr.Markdown(elem_id="captions-info")
                    with gr.Column():
                        train_info = gr.Markdown("Training runs here, one job at a time: generation waits until "
                                                 "it is done. The rest of each setting comes from the preset.",
                                                 elem_id="train-info")
                        train_stop_info = gr.Markdown(elem_id="train-stop-info")
                        train_loss = gr.Image(label="Loss", type="pil", format="png", interactive=False,
                                              elem_id="train-loss")
                        train_samples = gr.Gallery(label="Latest samples", columns=2, format="png",
                                                   elem_id="train-samples")

        common = [model, prompt, negative, sampler, steps, cfg, width, height, seed]
        # One queue for everything that runs the model: the queue's limit of 1 applies per concurrency_id.
        def generate(*values):
            *values, vae_name, images_per_call = values
            return run_generate(engine, *values, vae=vae_name, batch_size=images_per_call)

        go.click(generate, [*common, count, *slots, vae, batch_size], [gallery, used_seed, info],
                 api_name="generate", concurrency_id="model")

        def grid(*values, progress=gr.Progress()):
            *values, vae_name = values
            return run_grid(engine, *values, progress=progress, vae=vae_name)

        grid_go.click(grid, [*common, grid_lora, grid_weights, y_axis, y_values, *slots, vae],
                      [grid_image, grid_info], api_name="grid", concurrency_id="model")

        fields = [train_preset, train_data, train_name, train_trigger, train_rank, train_lr, train_steps, train_method,
                  train_reg, train_class_word, train_class_images, train_preservation]

        def train_job(*values, progress=gr.Progress()):
            return run_train(engine, *values[:len(fields)], progress=progress, advanced=values[len(fields):])

        def list_runs():
            return gr.Dropdown(choices=resumable_runs(settings))

        # A stopped run can be resumed: the list follows every run.
        train_go.click(train_job, [*fields, *advanced], [train_info, train_loss, train_samples],
                       api_name="train", concurrency_id="model").then(list_runs, None, runs, api_visibility="private")

        def resume_job(run, progress=gr.Progress()):
            return run_resume(engine, run, progress=progress)

        resume_go.click(resume_job, runs, [train_info, train_loss, train_samples], api_name="resume",
                        concurrency_id="model").then(list_runs, None, runs, api_visibility="private")

        def save_job(name, *values):
            info_line, presets = save_preset(settings, name, *values[:len(fields)], advanced=values[len(fields):])
            return info_line, gr.Dropdown(choices=presets)

        preset_save.click(save_job, [preset_name, *fields, *advanced], [train_info, train_preset],
                          api_name="save_preset", concurrency_id="captions")
        # Not queued: Stop must not wait behind the training it stops.
        train_stop.click(partial(stop_train, engine), None, train_stop_info, api_name="stop_train", queue=False)
        captions_load.click(partial(load_captions, settings), train_data, captions, api_name="load_captions",
                            concurrency_id="captions")
        captions_save.click(partial(save_captions, settings), [train_data, captions], captions_info,
                            api_name="save_captions", concurrency_id="captions")
        upload_go.click(partial(add_uploads, settings), [train_data, uploads], [captions, captions_info],
                        api_name="upload", concurrency_id="captions")
        train_preset.input(lambda p: (*preset_values(settings, p), *preset_advanced(settings, p)), train_preset,
                           [train_data, train_trigger, train_rank, train_lr, train_steps, train_method, train_reg,
                            train_class_word, train_class_images, train_preservation, *advanced],
                           api_visibility="private")
        png.upload(partial(read_png_parameters, settings), png,
                   [model, prompt, negative, sampler, steps, cfg, width, height, seed, batch_size, vae, *slots[0::3],
                    info],
                   api_name="read_parameters")
        model.input(lambda m: (size_for_model(settings, m),) * 2, model, [width, height], api_visibility="private")

        def check_slots(model_name, *slot_names):
            return [slot_switch(settings, model_name, n) for n in slot_names]

        # The base model and the slots' LoRAs decide which slots can be switched on (also when the page opens).
        for trigger in (model.change, demo.load, *(n.change for n in names)):
            trigger(check_slots, [model, *names], switches, api_visibility="private")
        model.change(partial(lora_table, settings), model, lora_list, api_visibility="private")
        def pick_row(evt: gr.SelectData):
            return evt.row_value[0]

        # gradio hands the selection to a parameter annotated gr.SelectData; this module's annotations are strings
        # (from __future__ import annotations) that gradio cannot resolve to the class imported in this function.
        pick_row.__annotations__["evt"] = gr.SelectData

        lora_list.select(pick_row, None, browse, api_visibility="private")
        browse.change(partial(lora_details, settings), [model, browse], [browse_image, browse_info, browse_words,
                                                                          words], api_name="lora_details")
        browse_words.click(insert_trigger, [prompt, browse_words, words], prompt, api_visibility="private")
        pairs = [c for i in range(SLOTS) for c in (switches[i], names[i])]
        browse_use.click(partial(switch_on, settings), [model, browse, *pairs], pairs, api_name="switch_on")

        def refresh_lists(*current):
            *current, model_name = current
            models, files = model_choices(settings), lora_choices(settings)
            updates = [gr.Dropdown(choices=models), gr.Dropdown(choices=vae_choices(settings)),
                       lora_table(settings, model_name), gr.Dropdown(choices=resumable_runs(settings))]
            for value in current:
                updates.append(gr.Dropdown(choices=files, value=value if value in files else None))
            return updates

        refresh.click(refresh_lists, [*names, grid_lora, browse, model],
                      [model, vae, lora_list, runs, *names, grid_lora, browse], api_name="refresh")
    return demo


THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def launch(settings: AppSettings, listen: bool = False, share: bool = False, port: int | None = None,
           block: bool = True):
    """Start the app. Local only (127.0.0.1) unless `listen` (0.0.0.0: your network) or `share` (a public
    gradio.live link); one job at a time. Returns the launched gr.Blocks (with `block=False` it keeps running
    in a background thread: call `.close()`)."""
    import gradio as gr
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one "Loading weights" bar per component otherwise
    demo = build_app(settings).queue(default_concurrency_limit=1)
    demo.launch(
        server_name="0.0.0.0" if listen else "127.0.0.1", server_port=port, share=share,
        allowed_paths=[str(Path(settings.out_dir).resolve())], prevent_thread_lock=not block, ssr_mode=False,
        # system fonts: nothing fetched from the internet
        theme=gr.themes.Default(font=THEME_FONTS["font"], font_mono=THEME_FONTS["font_mono"]),
        quiet=not block,
    )
    return demo
