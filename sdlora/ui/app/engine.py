"""The engine: one loaded pipeline and its LoRA cache, and `user_errors`, which turns every failure of a handler into
a message in the page."""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time

import torch

from sdlora.errors import USER_ERRORS
from sdlora.generate.pipeline import LoraCache, LoraSpec, default_device, load_pipeline
from sdlora.ui.app.settings import OWN_VAE, AppSettings, resolve_inside, resolve_model, resolve_vae

logger = logging.getLogger(__name__)


class Engine:
    """The loaded base model and its LoRA cache. Switching models frees the old one; LoRAs stay loaded.

    The queue already runs one job at a time; the lock also serialises direct calls (tests, scripts).
    """

    def __init__(self, settings: AppSettings):
        self.settings = settings
        self.model: str | None = None
        self.vae = ""  # "" = the model's own, else the VAE's name in models_dir
        self.pipe = None
        self.loras: LoraCache | None = None
        self.model_seconds = 0.0
        self.lock = threading.Lock()
        self.stop = threading.Event()  # the Train tab's Stop button; checked after every training step
        self.training = False

    def loaded(self, model: str, vae: str | None = None) -> bool:
        """Whether `model` with `vae` is the pipeline now in memory."""
        return (model, "" if vae in (None, OWN_VAE) else vae) == (self.model, self.vae)

    def pipeline(self, model: str, vae: str | None = None):
        """(pipeline, LoraCache) for `model` with `vae` (None or "model's own": its own; else a VAE's name in
        models_dir), loading them if they are not the current pair."""
        vae = "" if vae in (None, OWN_VAE) else vae
        if not self.loaded(model, vae):
            path, vae_path = resolve_model(self.settings, model), resolve_vae(self.settings, vae)
            self.release()
            started = time.perf_counter()
            device, dtype = default_device()
            pipe = load_pipeline(path, device, dtype, vae=vae_path)
            pipe.set_progress_bar_config(disable=True)
            self.pipe, self.loras, self.model, self.vae = pipe, LoraCache(pipe, self.settings.strict), model, vae
            self.model_seconds = time.perf_counter() - started
            logger.info(f"loaded {model}{f' with VAE {vae}' if vae else ''} in {self.model_seconds:.1f} s")
        return self.pipe, self.loras

    def release(self) -> None:
        """Free the loaded model (training loads its own copy; two on one GPU may not fit)."""
        self.pipe = self.loras = self.model = None
        self.vae = ""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def slot_specs(self, slots: tuple) -> list[LoraSpec]:
        """LoraSpecs of the switched-on slots; `slots` is (on, name, weight) per slot, as the UI sends them."""
        specs = []
        for i in range(0, len(slots), 3):
            on, name, weight = slots[i:i + 3]
            if on and name:
                specs.append(LoraSpec(resolve_inside(self.settings.lora_dir, name), float(weight)))
        return specs


@contextlib.contextmanager
def user_errors():
    """Every failure becomes a gr.Error message in the page; the app itself keeps running."""
    import gradio as gr

    try:
        yield
    except gr.Error:
        raise
    except USER_ERRORS as e:
        raise gr.Error(str(e), print_exception=False) from None
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise gr.Error("out of GPU memory: try a smaller size or batch count", print_exception=False) from None
    except Exception as e:
        logger.exception("job failed")  # a bug: say what it was and keep the traceback in the log
        raise gr.Error(f"unexpected {type(e).__name__}: {e}", print_exception=False) from None
