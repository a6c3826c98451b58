# cvmlab: `make smoke` (the main job) and `make test` (the whole suite).
# Both do all set-up first: host packages (ci/setup-host.sh), the Python
# venv, the default guest image. Results land in results/<job>/.

SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cvmlab-installed
RESULTS := results
# TCG guests are CPU bound: two at a time on a 2-core machine.
PARALLEL ?= 2
AVOCADO := $(BIN)/avocado run --job-results-dir $(RESULTS) --disable-sysinfo

.PHONY: smoke test setup host venv image lint unit scenarios scenarios-smoke clean

smoke: setup scenarios-smoke

test: setup lint unit scenarios

setup: host venv image

host:
	@./ci/setup-host.sh

venv: $(STAMP)

$(STAMP): pyproject.toml
	@echo "setup: Python venv in $(VENV)"
	@python3 -m venv $(VENV)
	@$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	@$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

image: venv
	@$(BIN)/cvmlab image build

lint: venv
	$(BIN)/ruff check orchestrator scenarios tests
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q

# Each scenario file runs with its own variants, so one job per file.
scenarios-smoke: venv
	@./ci/run-scenarios.sh smoke $(PARALLEL)

scenarios: venv
	@./ci/run-scenarios.sh all $(PARALLEL)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
