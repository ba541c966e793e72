# The two commands of the README: `make train` and `make test`. Each creates or reuses .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel pinned (an unpinned torch pulls a multi-GB CUDA build); override for GPU machines,
# e.g. `make TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128 train`.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP_TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
ARGS ?=
PYTEST_ARGS ?=

.PHONY: train test test-quick test-torch-2.11 lint bench clean-venv

# --no-compile: Python compiles the modules it imports on first use, instead of pip compiling every file of
# torch, transformers and triton at install time (about half of a fresh install's time).
PIP_INSTALL := $(PY) -m pip install --quiet --no-compile

$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PIP_INSTALL) $(PIP_TORCH_FLAGS) "$(TORCH_SPEC)"
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PIP_INSTALL) -e '.[dev]'
	touch $@

train: $(VENV)/.runtime
	HF_DATASETS_OFFLINE=1 $(PY) launch/train.py $(ARGS)

test: $(VENV)/.dev
	HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# For development: the suite without its end-to-end modules (tests/conftest.py's SLOW_MODULES), about 2 minutes.
test-quick: $(VENV)/.dev
	HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The suite under the GPU machine's torch (2.11), on this CPU: version differences show up here before GPU
# time is spent. PyPI's torch 2.11 bundles CUDA, so this venv takes about 5 GB; not part of CI.
test-torch-2.11:
	$(MAKE) VENV=.venv-torch2.11 TORCH_SPEC=torch==2.11.0 test

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check haillm launch tests bench

clean-venv:
	rm -rf $(VENV)
