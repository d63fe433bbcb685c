# make test          : set up .venv if needed, build the C++ extension, run the test suite
# make bench         : same setup, then every registered benchmark suite; writes bench-results/report.{md,json}
# make test-sanitize : build the extension again with AddressSanitizer + UndefinedBehaviorSanitizer
#                      (build/sanitize) and run the native kernels' tests against it
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

.PHONY: test bench setup clean test-sanitize

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

# The sanitized build is loaded through FASTMM_NATIVE_LIBRARY (fastmm/_native_library.py); the Python process
# needs the ASan runtime first in its library list, and libstdc++ loaded with it, or ASan's __cxa_throw
# interceptor finds no real __cxa_throw and aborts on the first C++ exception (a refused argument). Leak
# detection is off: CPython and torch keep allocations alive at exit by design. Tests: the files that call the
# native kernels (their triton cases left out: the interpreter runs no C++).
SANITIZE_DIR := build/sanitize
SANITIZE_TESTS := tests/test_native_args.py tests/test_decode_layer.py tests/test_linear.py tests/test_norm.py \
                  tests/test_attention.py tests/test_attention_masking.py tests/test_vq.py tests/test_sampling.py \
                  tests/test_routed_linear.py tests/test_fusion.py tests/test_prune.py tests/test_jacobi.py \
                  tests/test_sanitize.py tests/test_fuzz.py tests/test_thread_safety.py

test-sanitize: setup
	cmake -S . -B $(SANITIZE_DIR) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
		-DCMAKE_BUILD_TYPE=RelWithDebInfo -DFASTMM_SANITIZE=ON -DPython_EXECUTABLE=$(abspath $(PY)) \
		-Dpybind11_DIR=$$($(PY) -m pybind11 --cmakedir) > /dev/null
	cmake --build $(SANITIZE_DIR)
	FASTMM_NATIVE_LIBRARY=$$(ls $(abspath $(SANITIZE_DIR))/_C*.so) \
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		$(PY) -m pytest -n $(PYTEST_WORKERS) -q -p no:cacheprovider -k "not triton" $(SANITIZE_TESTS)

bench: setup
	$(PY) -m fastmm.cli bench all --out bench-results

clean:
	rm -rf build bench-results .pytest_cache
