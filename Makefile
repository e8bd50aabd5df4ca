# The two commands of the README: `make run` and `make test`.
# Both create .venv when missing, install the project into it (re-installing only
# when pyproject.toml changes) and are safe to run again and again.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

.PHONY: run test lint typecheck pytest system-deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(TSTAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP) $@

# DCMTK (echoscu, storescu, storescp, ...) is the independent peer of the interop tests.
system-deps:
	@command -v storescu >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dcmtk >/dev/null; }

run: $(STAMP)
	$(VENV)/bin/pacs-receiver

lint: $(TSTAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(TSTAMP)
	$(VENV)/bin/mypy

pytest: $(TSTAMP) system-deps
	$(PY) -m pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
