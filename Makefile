# `make demo` and `make test` work on a fresh machine: each creates .venv and installs sslmed first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
# Where torch comes from: empty uses the configured indexes (and a local wheel directory if pip has one);
# e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build (PyPI's Linux wheel is CUDA).
TORCH_INDEX ?=

.PHONY: venv demo demo-anomaly test bench bench-gpu lint clean

venv: $(VENV)/.installed

# torch first and pinned, so nothing later in the resolve can choose a CUDA build; deepspeed's
# setup imports torch, hence no build isolation for it.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(PIP) --no-build-isolation deepspeed==0.19.8
	$(PIP) -e ".[dev]"
	touch $@

demo: venv
	$(BIN)/sslmed demo

# seed 001's comparison (CAE-residual SSL vs SimCLR/BYOL/SimSiam/SparK) on crops with synthetic lesions
demo-anomaly: venv
	$(BIN)/sslmed demo anomaly

test: venv
	$(BIN)/python -m pytest -q -rs tests

bench: venv
	$(BIN)/sslmed bench loader --quick
	$(BIN)/sslmed bench step --quick
	$(BIN)/sslmed bench scaling --quick
	$(BIN)/sslmed bench pack --quick
	$(BIN)/sslmed bench residual --quick

# every GPU figure (step, loader → GPU augmentation, 1-GPU DeepSpeed run): under 10 minutes on an H100/H200
bench-gpu: venv
	PYTHON=$(BIN)/python benchmarks/gpu.sh

lint: venv
	$(BIN)/ruff check sslmed tests

clean:
	rm -rf $(VENV) demo-out demo-anomaly-out runs
