# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Both create .venv/ at the repo root on first use (Python 3.12 from PATH or pyenv).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@set -e; \
	if [ ! -x "$(PY)" ]; then \
	  PY312=$$(command -v python3.12 || ls -d $$(pyenv root 2>/dev/null || echo $$HOME/.pyenv)/versions/3.12.*/bin/python3.12 2>/dev/null | tail -n1); \
	  if [ -z "$$PY312" ]; then echo "error: Python 3.12 not found (install it, or put python3.12 on PATH)" >&2; exit 1; fi; \
	  "$$PY312" -m venv $(VENV); \
	fi; \
	$(PY) -m pip install -q --upgrade pip >/dev/null; \
	$(PY) -m pip install -q -e ".[dev]"; \
	touch $@

demo: venv
	$(PY) -m mmtrain.demo

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)
