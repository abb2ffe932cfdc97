"""Shared fixtures: tiny models are built once per session into a temporary cache (never a hub)."""

import os
import shutil
from pathlib import Path

import pytest
import torch

import sdlora  # noqa: F401  (first: it hides bitsandbytes from the libraries test modules import; see bnb_import)

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDLORA_CACHE", str(REPO / ".pytest_cache" / "sdlora-models"))


@pytest.fixture(scope="session")
def sd15_path():
    from sdlora.models.tiny import tiny_model_path

    return tiny_model_path("tiny-sd15")


@pytest.fixture(scope="session")
def sdxl_path():
    from sdlora.models.tiny import tiny_model_path

    return tiny_model_path("tiny-sdxl")


@pytest.fixture(scope="module")
def pipe():
    """The tiny SD1 pipeline, progress bars off."""
    from sdlora.generate.pipeline import load_pipeline

    pipe = load_pipeline("tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def cache(pipe):
    """The one LoraCache of `pipe`."""
    from sdlora.generate.pipeline import LoraCache

    return LoraCache(pipe)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Six captioned sample images in a folder of their own, for short training runs."""
    folder = tmp_path_factory.mktemp("data") / "imgs"
    folder.mkdir()
    for src in sorted((REPO / "sample_images").glob("*.png"))[:6]:
        shutil.copy(src, folder / src.name)
        shutil.copy(src.with_suffix(".txt"), folder / src.with_suffix(".txt").name)
    return folder


@pytest.fixture(scope="module")
def single_thread_plain_kernels():
    """For modules of many small tiny-model ops: one thread and the plain CPU conv kernels. With two OpenMP threads
    on a busy 2-core machine every small op can wait for a descheduled thread (measured 5-15x slower), and oneDNN
    builds kernels for every new conv shape on first use. Use with `pytestmark = pytest.mark.usefixtures(...)`."""
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    yield
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = onednn
