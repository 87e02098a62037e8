# The two commands of the README:
#   make bench   set up .venv if needed, build, run the main job (python -m internlm_kernels bench)
#   make test    set up .venv if needed, build, run the correctness suite
# Both create .venv in the repo root from requirements.txt (pinned) when it is missing.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch guesses the toolkit from the first nvcc on PATH; point it at the real one.
CUDA_HOME ?= /usr/local/cuda
MAX_JOBS ?= $(shell nproc)
export CUDA_HOME MAX_JOBS

CSRC := $(shell find csrc -type f 2>/dev/null)

.PHONY: bench test build check clean

bench: $(VENV)/.built
	$(BIN)/python -m internlm_kernels bench $(ARGS)

test: $(VENV)/.built
	$(BIN)/python -m pytest tests benchmarks --benchmark-disable $(PYTEST_ARGS)

check: $(VENV)/.built
	$(BIN)/python -m internlm_kernels check

build: $(VENV)/.built

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

# The package is installed editable without compiling (pip would rebuild everything in a
# temporary folder); the extension is then built in place by ninja under build/, so an
# edit to one .cu recompiles one file.
$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(CSRC)
	INTERNLM_KERNELS_NO_CUDA=1 $(BIN)/pip install --quiet --no-build-isolation --no-deps -e .
	$(BIN)/python setup.py --quiet build_ext --inplace
	touch $@

clean:
	rm -rf build internlm_kernels/_C*.so *.egg-info $(VENV)/.built
