# dynfuse: `make run` serves the embedded default model, `make test` runs the whole suite.
# torch==2.13.0 is installed before the project on purpose: that exact release is a CPU build
# that pip finds locally, while any looser spec would pull a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STORE  ?= store
HOST   ?= 127.0.0.1
PORT   ?= 8000
TORCH  := torch==2.13.0

.PHONY: run test test-tools mutation lint build-default clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-train: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[train]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed-train

build-default: $(VENV)/.installed-train
	$(BIN)/dynfuse build-default --store $(STORE)

run: build-default
	$(BIN)/dynfuse serve --store $(STORE) --host $(HOST) --port $(PORT)

# The whole suite, as CI runs it. A test whose system tool is missing is skipped here (under CI=true it fails), and
# the run ends by listing each skip and what installs it: `make test-tools`.
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

# Mutation testing of the decision code (tests/mutation/run.py, mutmut under nice -n 10): each module's score and
# surviving mutants, in bench/results/mutation.json; tests/mutation/EQUIVALENT.md lists the survivors reviewed.
# One module: `.venv/bin/python tests/mutation/run.py service/degrade.py`.
mutation: $(VENV)/.installed-dev
	$(BIN)/python tests/mutation/run.py

# The system tools the tests run (Prometheus, docker-compose, chromium and its driver), with apt-get.
test-tools:
	.ci/tools

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache
