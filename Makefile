# dynfuse: `make run` serves the default model the repository ships (store/shapes/1), `make test` runs the whole suite.
# torch==2.13.0 is installed before the project on purpose: that exact release is a CPU build
# that pip finds locally, while any looser spec would pull a multi-GB CUDA build. `make run` needs
# no torch at all: it installs only the serving core (NumPy, Pillow, ONNX Runtime, FastAPI).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STORE  ?= store
HOST   ?= 127.0.0.1
PORT   ?= 8000
GRPC_PORT ?=
TORCH  := torch==2.13.0
# pytest-xdist workers for `make test` (0: one process); tests/conftest.py trains the tiny model once for all.
TEST_WORKERS ?= 2
# Where `make build-default` writes a model built from scratch (the shipped one stays as it is).
BUILD_STORE ?= build/default-store
SHIP_STORE  := build/ship-store
SHIP_WORK   := build/ship-work
# Torch threads for make ship-default: one trains the same on any machine, and on a shared 2-core one it is
# far faster than two (two threads that wait on each other crawl when other jobs hold the cores).
SHIP_THREADS ?= 1

.PHONY: run test test-tools mutation lint build-default ship-default figures clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-train: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[train]'
	touch $@ $(VENV)/.installed-serve

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed-train $(VENV)/.installed-serve

run: $(VENV)/.installed-serve
	$(BIN)/dynfuse serve --store $(STORE) --host $(HOST) --port $(PORT) $(if $(GRPC_PORT),--grpc-port $(GRPC_PORT))

# The whole suite, as CI runs it, in two steps: every file whole on one of TEST_WORKERS workers (a module's fixtures
# are made once), then the tests that start a Ray cluster, one at a time (a cluster starting beside other work on 2
# cores times out). A test whose system tool is missing is skipped here (under CI=true it fails), and each step ends
# by listing each skip and what installs it: `make test-tools`.
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not ray" --durations=25
	$(BIN)/python -m pytest -m ray --durations=10

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

# Synthesize, train and export the default model from scratch, with progress bars, beside the shipped one.
build-default: $(VENV)/.installed-train
	$(BIN)/dynfuse build-default --store $(BUILD_STORE)
	@echo "serve it with: $(BIN)/dynfuse serve --store $(BUILD_STORE)   (make ship-default replaces the shipped model)"

# Rebuild the shipped default model from the checkout's code (ONNX files only), replace store/shapes/1 with it,
# and regenerate every figure the docs show about it. Commit store/, docs/ and bench/ afterwards.
ship-default: $(VENV)/.installed-dev
	rm -rf $(SHIP_STORE) $(SHIP_WORK)
	OMP_NUM_THREADS=$(SHIP_THREADS) $(BIN)/dynfuse build-default --store $(SHIP_STORE) --work $(SHIP_WORK) --formats onnx
	rm -rf $(STORE)/shapes/1
	mkdir -p $(STORE)/shapes
	cp -R $(SHIP_STORE)/shapes/1 $(STORE)/shapes/1
	$(MAKE) figures

# Every table, plot and example output about the default model in README.md, docs/ and bench/BENCHMARKS.md,
# computed from the shipped files (importance's against explain=true on a held-out set: bench/importance.py).
figures: $(VENV)/.installed-dev
	$(BIN)/python -m bench.figures
	$(BIN)/python -m bench.importance --store $(STORE)
	$(BIN)/python -m bench.doc_examples --update

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache
