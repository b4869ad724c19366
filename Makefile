# Set-up and entry points. `make run` trains the demo (or whatever the environment configures);
# `make test` runs the test suite. Each creates .venv on first use and reinstalls only when the
# dependency files change.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint
run: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash trainer.sh

test: lint
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/python -m pytest

# ruff.toml's rules and formatting; `$(VENV)/bin/ruff format .` and `ruff check --fix .` fix most findings.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: lint
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/python -m pytest -m "not slow"

# torch==2.13.0 first: the CPU wheel where one is on disk, and a version every range below admits.
$(STAMP): requirements.txt constraints.txt requirements-dev.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)
