# Two commands do all set-up on a fresh machine:
#   make demo   - venv + install, train a LoRA on sample_images/ with the tiny model, export, render samples
#   make test   - venv + install, run the whole test suite
#   make lint   - venv + install, ruff (lint and import order) and mypy (the sdlora package's types)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install clean smoke-newest smoke-oldest

$(BIN)/sdlora: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU-only machine: take the CPU wheel of torch first so pip does not pull a multi-GB CUDA build.
	# GPU users keep whatever torch their CUDA setup needs.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q torch==2.13.0; fi
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,lint]"
	touch $(BIN)/sdlora

install: $(BIN)/sdlora

demo: install
	$(BIN)/sdlora demo

test: install
	# open-clip-torch is only the reference the tokenizer test compares against (no runtime dependency).
	$(BIN)/python -m pip install -q --no-deps open-clip-torch==3.3.0
	$(BIN)/python -m pytest

lint: install
	$(BIN)/python -m ruff check sdlora tests benchmarks scripts
	$(BIN)/python -m mypy

# The smoke tests (pytest -m smoke: train with the text encoder, export, generate, diffusers loads the file, the app
# starts, an NF4 base) in a fresh .venv-newest with the newest versions pyproject allows, or .venv-oldest with its
# lower bounds (constraints-oldest.txt). CI runs both after `make test`. torch is the CPU wheel, as above. These
# environments are thrown away after one run, so nothing is byte-compiled ahead (400 MB less on disk each).
$(VENV)-%/bin/sdlora: pyproject.toml constraints-oldest.txt
	rm -rf $(VENV)-$*
	$(PYTHON) -m venv $(VENV)-$*
	$(VENV)-$*/bin/python -m pip install -q --upgrade pip
	$(VENV)-$*/bin/python -m pip install -q --no-compile torch==2.13.0
	$(VENV)-$*/bin/python -m pip install -q --no-compile $(if $(filter oldest,$*),-c constraints-oldest.txt) -e ".[test]"
	touch $@

.PRECIOUS: $(VENV)-%/bin/sdlora

smoke-newest smoke-oldest: smoke-%: $(VENV)-%/bin/sdlora
	$(VENV)-$*/bin/python -m pip list --format=freeze | grep -iE '^(torch|diffusers|transformers|peft|accelerate|gradio|pillow|numpy)='
	SDLORA_CACHE=$(VENV)-$*/models $(VENV)-$*/bin/python -m pytest -m smoke -p no:cacheprovider

clean:
	rm -rf $(VENV) $(VENV)-newest $(VENV)-oldest outputs
