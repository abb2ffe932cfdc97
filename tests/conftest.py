"""Shared fixtures: tiny models are built once per session into a temporary cache (never a hub)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDLORA_CACHE", str(REPO / ".pytest_cache" / "sdlora-models"))


@pytest.fixture(scope="session")
def sd15_path():
    from sdlora.tiny import tiny_model_path

    return tiny_model_path("tiny-sd15")


@pytest.fixture(scope="session")
def sdxl_path():
    from sdlora.tiny import tiny_model_path

    return tiny_model_path("tiny-sdxl")
