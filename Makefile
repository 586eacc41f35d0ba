# Set-up and checks for vidssl. `make test` and `make demo` do all the set-up on a fresh machine.
# An active virtual environment (or conda env) is used as it is; otherwise .venv is created and
# sees the system's site-packages, so an installed torch is reused rather than downloaded.
PYTHON ?= python3
ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
VENV_PY := python
STAMP := .cache/installed-active-env
else
VENV_PY := .venv/bin/python
STAMP := .venv/.installed
endif
PYTEST_ARGS ?=

.PHONY: install test test-fast lint demo docs clean gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml tools/ensure_torch.py
ifeq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
	test -x .venv/bin/python || $(PYTHON) -m venv --system-site-packages .venv
endif
	$(VENV_PY) tools/ensure_torch.py
	$(VENV_PY) -m pip install -q -e ".[test,dev,docs,plot]"
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

test: install
	$(VENV_PY) -m ruff check .
	$(VENV_PY) -m mkdocs build --strict --quiet --site-dir .cache/site
	$(VENV_PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(VENV_PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV_PY) -m ruff check .

demo: install
	$(VENV_PY) -m vidssl demo

docs: install
	$(VENV_PY) -m mkdocs build --strict

# The GPU table (benchmarks/gpu.py, < 8 min on an H200): gpu.json, gpu.md, gpu.log in GPU_OUT.
# Needs no `make install` (a GPU machine may have no registry): wheels fetched beforehand with
# tools/fetch_gpu_wheels.sh into .cache/gpu-wheels are installed first.
GPU_OUT ?= .cache/gpu-check
gpu-check:
	PYTHON="$(if $(wildcard $(VENV_PY)),$(VENV_PY),$(PYTHON))" bash tools/gpu_check.sh $(GPU_OUT)

clean:
	rm -rf .venv .cache build dist site *.egg-info .pytest_cache .ruff_cache
