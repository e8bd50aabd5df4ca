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

# The compiled data plane (workers/dataplane/_core.pyx) builds during the install; when
# it cannot (no C compiler), the install still succeeds with the pure-Python core and
# CHECK_CORE prints one warning line (pip -q hides the build's own output).
BUILD_INPUTS = pyproject.toml setup.py workers/dataplane/_core.pyx
CHECK_CORE = $(PY) -c 'from workers import dataplane as d; d.compiled() or print("WARNING: pacs-receiver: compiled data plane not built; using the pure-Python core")'

$(STAMP): $(BUILD_INPUTS) | $(PY)
	$(PY) -m pip install -q -e .
	@$(CHECK_CORE)
	touch $@

$(TSTAMP): $(BUILD_INPUTS) | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	@$(CHECK_CORE)
	touch $(STAMP) $@

# Debian packages the tests use: DCMTK (echoscu, storescu, storescp, ...) is the
# independent peer of the interop tests; prometheus provides promtool, which checks
# our metrics exposition. policy-rc.d (only while installing, only if none exists)
# keeps the packages from starting services: nothing of theirs may listen here.
# A check may also be a path glob (PostgreSQL's binaries are not on PATH): the index
# tests initdb a throw-away server from the postgresql package. tests/cluster runs a real
# HAProxy (and Prometheus, from the prometheus package) in front of two receivers.
SYSTEM_PACKAGES = storescu:dcmtk promtool:prometheus /usr/lib/postgresql/*/bin/initdb:postgresql haproxy:haproxy
system-deps:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || ls $${pair%%:*} >/dev/null 2>&1 \
	    || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  guard=""; if [ ! -e /usr/sbin/policy-rc.d ]; then guard=1; \
	    printf '#!/bin/sh\nexit 101\n' | $$SUDO tee /usr/sbin/policy-rc.d >/dev/null; \
	    $$SUDO chmod +x /usr/sbin/policy-rc.d; fi; \
	  echo "installing$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	  status=$$?; [ -z "$$guard" ] || $$SUDO rm -f /usr/sbin/policy-rc.d; exit $$status; fi

run: $(STAMP)
	$(VENV)/bin/pacs-receiver

lint: $(TSTAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(TSTAMP)
	$(VENV)/bin/mypy

# The whole suite runs on the compiled data plane (when built); the engine, worker
# (storage included) and fuzz suites run a second time on its pure-Python twin.
PURE_SUITES = tests/engine tests/worker tests/fuzz
pytest: $(TSTAMP) system-deps
	$(PY) -m pytest
	PACSRX_PURE_PYTHON=1 $(PY) -m pytest -m 'not slow' $(PURE_SUITES)

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build
	rm -f workers/dataplane/_core.c workers/dataplane/_core.*.so
