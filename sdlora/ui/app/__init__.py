"""The Gradio app (`sdlora app`, `python app.py`): generate with a base model and LoRAs, compare LoRA weights in
an X/Y grid, read the settings back from a PNG, train a LoRA from a preset (live progress, loss curve, samples, a
Stop button) and edit a dataset's captions.

Every image is rendered by `generate.generate_images`, the function `sdlora generate` calls, so the same
settings and seed give the same image in both. The app listens on 127.0.0.1 unless told otherwise, runs one
job at a time, and only opens models and LoRAs inside the folders it was started with.

One module per concern, each importing only those before it: `settings` (folders, safe names), `loras` (the LoRA
browser), `engine` (the loaded model, errors as messages), `generate` (Generate and X/Y grid tabs), `train` (Train
tab), `captions` (the dataset's captions and uploads), `page` (`build_app`, `launch`). Import from those modules:
this file imports nothing, so that importing one of them loads no more than it needs.
"""
