# Two entry points, each installing what it needs into a project virtualenv (.venv).
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed  ## a real kernel serves the demo model; the openai and anthropic SDKs call it
	$(PY) -m mlx_manager_nb demo

test: $(VENV)/.installed  ## the whole suite: unit, server, kernel and notebook tests
	$(PY) -m pytest
