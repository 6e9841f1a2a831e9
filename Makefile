# Two entry points, each installing what it needs into a project virtualenv (.venv).
VENV ?= .venv
PY := $(VENV)/bin/python

# PYTHONWARNINGS: setuptools' banner about editable installs says nothing to act on
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	PYTHONWARNINGS=ignore $(PY) -m pip install -q -e ".[test]"
	touch $@

.PHONY: demo lab test test-unit lint
demo: $(VENV)/.installed  ## a real kernel serves the demo model; the openai and anthropic SDKs call it
	$(PY) -m mlx_manager_nb demo

lab: $(VENV)/.installed  ## JupyterLab on the notebooks (with jupyter-server-proxy, as on a hub)
	$(VENV)/bin/jupyter lab notebooks/01_quickstart.ipynb

# -v: one line per test and per notebook cell as it runs; then the ten slowest
test: $(VENV)/.installed  ## the whole suite: unit, server, kernel and notebook tests
	$(PY) -m pytest -v --durations=10

test-unit: $(VENV)/.installed  ## the tests on the tiny model only: no notebooks, no demo model (under a minute)
	$(PY) -m pytest tests -m "not slow"

lint: $(VENV)/.installed  ## ruff (pyflakes, bugbear, pyupgrade, simplify, ruff's own rules) and mypy on the package
	$(PY) -m ruff check .
	$(PY) -m mypy
