# make test  : set up .venv if needed, build the C++ extension, run the test suite
# make bench : same setup, then every registered benchmark suite; writes bench-results/report.{md,json}
#
# Setup is incremental: stamps under .venv/ record what is installed, so a second run starts in seconds.
# torch is installed first and pinned (the CPU build on this machine's disk); nothing below may pull another.

PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
DEPS := triton numpy pybind11 scikit-build-core ninja rich typer safetensors \
        pytest pytest-xdist hypothesis transformers pytest-benchmark matplotlib nvidia-ml-py \
        faiss-cpu vector-quantize-pytorch kernels
PYTEST_WORKERS ?= 2

.PHONY: test bench setup clean

$(VENV)/.torch:
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	touch $@

$(VENV)/.deps: $(VENV)/.torch Makefile
	$(PIP) install -q $(DEPS) "torch==$(TORCH_VERSION)"
	touch $@

$(VENV)/.fastmm: $(VENV)/.deps pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.fastmm

test: setup
	$(PY) -m pytest -n $(PYTEST_WORKERS) -q tests

bench: setup
	$(PY) -m fastmm.cli bench all --out bench-results

clean:
	rm -rf build bench-results .pytest_cache
