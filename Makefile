# The README's two commands: `make run` and `make test`.
# TORCH is what pip installs for torch before the project: a CPU build by default;
# on a GPU machine use e.g. `make run TORCH=torch`.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: run test install install-dev lint clean-venv

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

lint: install-dev
	$(BIN)/ruff check src stages tests bench flows
	$(BIN)/ruff format --check src stages tests bench flows

clean-venv:
	rm -rf $(VENV)
