# Two commands on a fresh machine: `make bench` (the main job) and `make test`. Each creates .venv and installs
# what it needs first. Where a torch is already importable from $(PYTHON) (a GPU machine's CUDA build), create the
# venv with VENV_FLAGS=--system-site-packages to use it instead of installing $(TORCH_SPEC).
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# Extra options for benchmarks/bench_model.py, e.g. `make bench BENCH_ARGS="--quick --no-save"`.
BENCH_ARGS ?=
STAMP := $(VENV)/.installed
SOURCES := setup.py build_support.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: install browser test bench compile-cuda clean

$(STAMP): $(SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet setuptools wheel ninja pybind11 numpy
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,triton]"
	@touch $@

install: $(STAMP)

# The serve page's test drives Debian's chromium through Selenium and the system chromedriver (no browser download):
# installed here where apt-get can; elsewhere that test is skipped, saying why.
browser:
	@command -v chromedriver >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  chromium chromium-driver >/dev/null) || echo "note: chromium not installed; the browser test will be skipped"

test: install browser
	$(VENV)/bin/ruff check segformer_fast kernels benchmarks tests setup.py build_support.py
	$(VENV)/bin/pytest tests -ra

bench: install
	$(PY) benchmarks/bench_model.py $(BENCH_ARGS)

compile-cuda:
	bash .ci/compile_cuda.sh

clean:
	rm -rf build $(VENV) segformer_fast/_C*.so
