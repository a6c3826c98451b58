# cvmlab: `make smoke` (the main job) and `make test` (the whole suite).
# Both do all set-up first: host packages (ci/setup-host.sh), the Python
# venv, the default guest image. Results land in results/<job>/.

SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cvmlab-installed
RESULTS := results
# Tests at a time per avocado job: each profile's own (scenarios/profiles.yaml: smoke
# three, the others two) unless PARALLEL=N is given.
PARALLEL ?=
PARALLEL_ARG := $(if $(PARALLEL),--parallel $(PARALLEL),)

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
	$(BIN)/lint-imports

unit: venv
	$(BIN)/pytest -q

# Profiles live in scenarios/profiles.yaml: one avocado job per scenario file,
# each with its own variants; the exact avocado commands are printed first.
scenarios-smoke: venv
	@$(BIN)/cvmlab profile run smoke --results $(RESULTS) $(PARALLEL_ARG)

scenarios: venv
	@$(BIN)/cvmlab profile run full --results $(RESULTS) $(PARALLEL_ARG)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
