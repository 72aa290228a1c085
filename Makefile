# Two commands on a fresh machine: `make bench` (the main job) and `make test`. Each creates .venv and installs
# what it needs first, at the versions of constraints.txt (the set the tests last passed with; `CONSTRAINTS=` for
# the newest releases instead). Where a torch is already importable from $(PYTHON) (a GPU machine's CUDA build),
# create the venv with VENV_FLAGS=--system-site-packages to use it instead of installing $(TORCH_SPEC).
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# The known-good versions of everything make installs; empty (`make test CONSTRAINTS=`): the newest releases.
CONSTRAINTS ?= constraints.txt
# Extra options for benchmarks/bench_model.py, e.g. `make bench BENCH_ARGS="--quick --no-save"`.
BENCH_ARGS ?=
MODE := $(if $(CONSTRAINTS),pinned,newest)
STAMP := $(VENV)/.installed-$(MODE)
PINS := $(VENV)/constraints.txt
SOURCES := setup.py build_support.py pyproject.toml $(CONSTRAINTS) \
	$(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
# setuptools says this of every editable install of a flat layout; kernels/ is not a package (kernels/README.md)
QUIET_BUILD := PYTHONWARNINGS="ignore:Editable installation"

.PHONY: install browser test bench compile-cuda constraints clean

# The venv's pins: $(CONSTRAINTS) with torch held at the version the venv has. A torch from the system
# (VENV_FLAGS=--system-site-packages) keeps its own triton and CUDA libraries: their pins are dropped. torch's
# warning that numpy is missing (a fresh venv has none yet) is not shown.
$(STAMP): $(SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	@{ if $(PY) -c "import sys, torch; sys.exit(not torch.__file__.startswith(sys.prefix))" 2>/dev/null; \
	   then grep -vE '^torch==' $(or $(CONSTRAINTS),/dev/null); \
	   else grep -viE '^(torch|triton|nvidia-[^=]*|cuda-[^=]*)==' $(or $(CONSTRAINTS),/dev/null); fi; \
	   $(PY) -c "import torch; print(f'torch=={torch.__version__}')" 2>/dev/null; } > $(PINS)
	$(PY) -m pip install --quiet -c $(PINS) --upgrade pip setuptools wheel ninja pybind11 numpy
	$(QUIET_BUILD) $(PY) -m pip install --quiet -c $(PINS) $(if $(CONSTRAINTS),,--upgrade --upgrade-strategy eager) \
	  --no-build-isolation -e ".[test,triton]"
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

# The serve page's test drives Debian's chromium through Selenium and the system chromedriver (no browser download).
# Not part of `make test` (it installs system packages, as root): CI runs it; elsewhere that one test is skipped,
# saying so.
browser:
	@command -v chromedriver >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  chromium chromium-driver >/dev/null) || echo "note: chromium not installed; the browser test will be skipped"

test: install
	$(VENV)/bin/ruff check segformer_fast kernels benchmarks tests setup.py build_support.py
	$(VENV)/bin/pytest tests -ra

bench: install
	$(PY) benchmarks/bench_model.py $(BENCH_ARGS)

# Rewrite constraints.txt from what the venv holds (after `make test CONSTRAINTS=` passed with the newest releases).
constraints: install
	@{ echo "# The versions make installs for the tests and the benchmarks (Python $$($(PY) -c 'import platform; \
	print(platform.python_version())'), Linux x86-64), written by \`make constraints\` from a venv whose \`make test\` passed."; \
	   echo "# \`make test CONSTRAINTS=\` installs the newest releases instead."; \
	   $(PY) -m pip freeze --all --local --exclude-editable | grep -vE '^(-e |segformer-fast)' | LC_ALL=C sort -f; } > constraints.txt.tmp
	@mv constraints.txt.tmp constraints.txt
	@echo "wrote constraints.txt ($$(grep -c '==' constraints.txt) pins)"

compile-cuda:
	bash .ci/compile_cuda.sh

clean:
	rm -rf build $(VENV) segformer_fast/_C*.so
