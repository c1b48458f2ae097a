# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Both create .venv/ at the repo root on first use (Python 3.12 from PATH or pyenv).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test sabotage venv
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py mmtrain/packing/_fastpack.c
	@set -e; \
	if [ ! -x "$(PY)" ]; then \
	  PY312=$$(bash launch/find_python312.sh); \
	  "$$PY312" -m venv $(VENV); \
	fi; \
	$(PY) -m pip install -q --upgrade pip >/dev/null; \
	$(PY) -m pip install -q -e ".[dev]"; \
	touch $@

# Tiny VLM on CPU (or the GPU if there is one), packing off and on: the seed table + a bar chart in
# outputs/demo/, and a failure if the per-step losses of the two runs differ (fp32 also on a GPU, where
# precision auto would pick bf16 and its rounding would differ between the two layouts).
demo: venv
	$(PY) -m mmtrain compare model=tiny trainer.max_steps=8 trainer.precision=fp32 --out outputs/demo --check-loss

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Break the code on purpose (tests/sabotage/catalog.py) and check that the tests catch each break.
sabotage: venv
	$(PY) tests/sabotage/run.py $(SABOTAGE_ARGS)
