# The README's two commands: `make run` (set up + serve) and `make test` (set up + every check).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
HASH := $(shell cat pyproject.toml app/core/_replay.c | sha1sum | cut -c1-12)
# Stamps keyed on pyproject.toml and the C replay's source: set-up reinstalls (and recompiles) only
# when the dependencies or app/core/_replay.c change.
STAMP := $(VENV)/.installed-$(HASH)
RUN_STAMP := $(VENV)/.runtime-$(HASH)

.PHONY: run test setup setup-test lint typecheck pytest browser-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools

$(STAMP): pyproject.toml app/core/_replay.c | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

$(RUN_STAMP): pyproject.toml app/core/_replay.c | $(BIN)/python
	$(BIN)/pip install -q -e .
	rm -f $(VENV)/.runtime-*
	touch $(RUN_STAMP)

setup: $(RUN_STAMP)

setup-test: $(STAMP) browser-deps

# Debian's Chromium for the browser tests (Playwright drives /usr/bin/chromium; no browser download).
browser-deps:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "chromium could not be installed: browser tests will skip (or fail under TUNEFIT_REQUIRE_ALL=1)"; \
	  else echo "no /usr/bin/chromium and no root apt-get: browser tests will skip"; fi; \
	fi

run: setup
	$(BIN)/tunefit serve --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check app tests scripts migrations

typecheck: $(STAMP)
	$(BIN)/mypy app scripts

pytest: setup-test
	$(BIN)/pytest -q

test: setup-test lint typecheck pytest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
