# The two commands of the README: `make demo` and `make test`. Both set up .venv themselves.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTEST_FAST := -m "not slow and not integration"

.PHONY: venv demo test test-fast lint bench clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

venv:  ## create or update .venv (idempotent; seconds when up to date)
	@scripts/ensure-venv.sh

demo: venv  ## run the main job on the embedded default and print where its output is
	$(BIN)/radground demo

test: venv  ## the whole test suite (what CI runs); installs the Debian packages tests need (chromium) when missing
	@scripts/ensure-test-packages.sh
	$(BIN)/python -m pytest

test-fast: venv  ## the inner loop: skips tests marked slow or integration
	$(BIN)/python -m pytest $(PYTEST_FAST) -q

lint: venv  ## ruff over the code
	$(BIN)/ruff check radground tests bench

bench: venv  ## the benchmarks under bench/ (by hand; results land in bench/results/)
	$(BIN)/python bench/run.py

clean:  ## remove .venv and the embedded data dir (the dependency cache stays)
	rm -rf $(VENV) .radground
