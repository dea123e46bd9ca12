# The two commands of the README: `make demo` and `make test`. Both set up .venv themselves.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTEST_FAST := -m "not slow and not integration"

.PHONY: venv demo test test-fast lint docs bench mutate clean help

help:  ## list the targets
	@awk -F ':.*## ' '/^[a-z-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

venv:  ## create or update .venv (seconds when up to date; ~4 min when requirements.lock changed)
	@scripts/ensure-venv.sh

demo: venv  ## run the main job on the embedded default and print where its output is (~2-3 min)
	$(BIN)/radground demo

test: venv  ## the whole test suite, what CI runs (~14-17 min on 2 cores from a clean clone, + the first venv install); installs chromium, docker-compose and postgresql-15 when missing
	@scripts/ensure-test-packages.sh
	@# Two pytest-xdist workers, and the training flow tests beside them in a process of their own.
	PYTHON=$(BIN)/python scripts/run-tests.sh

test-fast: venv  ## the inner loop: skips tests marked slow or integration (~2-3 min on 2 cores)
	$(BIN)/python -m pytest $(PYTEST_FAST) -q

lint: venv  ## ruff over the code (seconds)
	$(BIN)/ruff check radground tasks flows models tests bench

docs: venv  ## regenerate docs/settings.md and the table reference in docs/data-path.md from the code (seconds)
	$(BIN)/python -m radground.reference_docs

bench: venv  ## every benchmark under bench/, results in bench/results/ (~10-15 min on 2 cores, estimated)
	$(BIN)/python bench/run.py

mutate: venv  ## mutmut over tasks/{deid,scrub,discover,version,version_stage}.py, each against its own tests; table in bench/results/ (not in make test; ~25 min with MUTATE_ARGS=--focus, hours for every function, on 2 cores)
	$(BIN)/python scripts/mutate.py $(MUTATE_ARGS)

clean:  ## remove .venv and the embedded data dir (the dependency cache stays)
	rm -rf $(VENV) .radground
