# Each entry point installs what it needs into a project virtualenv (.venv): `demo` and `lab` the
# package with its demo extra (a kernel, the SDKs, JupyterLab), the test and lint targets the test
# extra on top (the other clients, pytest, nbval, Playwright, ruff, mypy).
VENV ?= .venv
PY := $(VENV)/bin/python
LAB_DIR ?= lab
LAB_ARGS ?=

# PYTHONWARNINGS: setuptools' banner about editable installs says nothing to act on
$(VENV)/.demo: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	PYTHONWARNINGS=ignore $(PY) -m pip install -q -e ".[demo]"
	touch $@

$(VENV)/.test: $(VENV)/.demo
	PYTHONWARNINGS=ignore $(PY) -m pip install -q -e ".[test]"
	touch $@

# The evaluation harnesses, each in a virtualenv of its own: their pins are not the project's.
.venv-%/.installed: evals/requirements-%.txt
	python3 -m venv .venv-$*
	.venv-$*/bin/python -m pip install -q --upgrade pip
	.venv-$*/bin/python -m pip install -q -r $<
	touch $@

.PHONY: demo lab test test-unit lint evals evals-lmeval evals-inspect
demo: $(VENV)/.demo  ## a real kernel serves the demo model; the openai and anthropic SDKs call it
	$(PY) -m mlx_manager_nb demo

# on working copies in $(LAB_DIR)/, so running the notebooks leaves notebooks/ as committed;
# --allow-root is added for root; LAB_ARGS go to JupyterLab, e.g. make lab LAB_ARGS="--port 8890 --no-browser"
lab: $(VENV)/.demo  ## JupyterLab on the notebooks (with jupyter-server-proxy, as on a hub)
	$(PY) -m mlx_manager_nb lab --dir $(LAB_DIR) $(LAB_ARGS)

# -v: one line per test and per notebook cell as it runs; then the ten slowest
test: $(VENV)/.test  ## the whole suite: unit, server, kernel and notebook tests
	$(PY) -m pytest -v --durations=10

test-unit: $(VENV)/.test  ## the tests on the tiny model only: no notebooks, no demo model (about 3 minutes)
	$(PY) -m pytest tests -m "not slow"

lint: $(VENV)/.test  ## ruff (pyflakes, bugbear, pyupgrade, simplify, ruff's own rules) and mypy on the package
	$(PY) -m ruff check .
	$(PY) -m mypy

# a few minutes on two CPU cores once the harnesses are installed
evals: $(VENV)/.demo .venv-lmeval/.installed .venv-inspect/.installed  ## lm-eval and inspect-ai against a server of the demo model
	$(PY) evals/run.py

evals-lmeval: $(VENV)/.demo .venv-lmeval/.installed  ## lm-eval only: multiple choice by loglikelihood, generation by completions and chat
	$(PY) evals/run.py lmeval

evals-inspect: $(VENV)/.demo .venv-inspect/.installed  ## inspect-ai only, through its OpenAI-compatible provider
	$(PY) evals/run.py inspect
