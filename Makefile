# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
SHELL := /bin/bash

.PHONY: install dev blas demo test lint format bench clean

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	# dev extras pin torch 2.13.0 on Linux: a CPU build (an unpinned torch pulls a CUDA build).
	$(PIP) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev-installed

# MLX's Linux wheel ships a reference BLAS (~5 GFLOP/s); OpenBLAS makes CPU matmuls ~30x faster.
# jobrunner loads it at start-up when present (jobrunner/_blas.py). Best effort: needs root + apt.
blas:
	@if [ "$$(uname -s)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so\.0'; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1)) \
	    || echo "warning: could not install OpenBLAS; MLX on CPU will be slow"; \
	  else echo "warning: OpenBLAS not found (apt-get install libopenblas0-pthread); MLX on CPU will be slow"; fi; \
	fi

demo: install blas
	$(VENV)/bin/jobrunner run jobs/demo.toml --overwrite
	$(VENV)/bin/jobrunner show jobs/demo/out/captions.parquet

test: dev blas
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

format: dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install blas
	$(VENV)/bin/jobrunner bench --preset small

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
