# Set up, test and run hf-dp-microadam on a fresh machine.
#   make test              create .venv, install the package, run the unit tests
#   make assets            install the offline models and data the recipes use
#   make test-integration  run the tests on real pretrained weights and real data
#   make main              set up, install the assets and run the main job: DP-MicroAdam LoRA
#                          fine-tuning of MiniLM on Rotten Tomatoes at epsilon = 8 (CPU)
#
# TORCH_SPEC picks the torch build: the default is the CPU build; on a GPU machine
# pass e.g. TORCH_SPEC=torch to let pip choose a CUDA build.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.hf_dp_microadam_installed

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_HOME ?= $(CURDIR)/.hf_home

.PHONY: setup assets test test-integration main

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test,recipes]"
	touch $(STAMP)

assets: setup
	$(BIN)/python scripts/install_offline_assets.py

test: setup
	$(BIN)/python -m pytest -m "not integration and not multiprocess" -q

test-integration: assets
	$(BIN)/python -m pytest -m "integration or multiprocess" -q

# Prints the test accuracy and the epsilon spent; outputs go to outputs/text_classification/cpu.
# A second run reports the finished run instead of training again.
main: assets
	$(BIN)/python recipes/text_classification.py configs/text_classification/cpu.yaml
