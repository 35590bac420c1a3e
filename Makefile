# Two commands on a fresh machine (Python 3.11+ and make):
#   make quickstart   # creates .venv, installs the trainer, runs examples/quickstart.yaml
#   make test         # creates .venv, installs everything for tests, runs ruff, mypy, builds the
#                     # CRD API server (first time only, minutes) and runs the suite
# torch is pinned to the 2.13.0 CPU wheel here; the package itself accepts torch>=2.4.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: quickstart test lint codegen crds bench images clean-venv system-deps crd-apiserver

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.trainer-installed: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet $(TORCH_PIN)
	$(PIP) install --quiet -e '.[trainer]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/.trainer-installed
	$(PIP) install --quiet -e '.[dev]'
	touch $@

quickstart: $(VENV)/.trainer-installed
	$(BIN)/tolaria run examples/quickstart.yaml --fresh

system-deps:
	@./scripts/system-deps.sh

# The real CRD API server for tests/k8s: built (once, then cached) before pytest, under its own
# time bound (CRD_APISERVER_BUILD_TIMEOUT, default 1200 s), never inside a test; when it cannot
# be built the tests that need it skip naming the reason.
crd-apiserver:
	@./scripts/crd-apiserver.sh

test: $(VENV)/.dev-installed system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	@./scripts/crd-apiserver.sh
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports && $(BIN)/mypy

codegen: $(VENV)/.dev-installed
	$(BIN)/python leyline/run_codegen.py

# The CRDs, into crds/ and the Helm chart's charts/tolaria/files/crds/ (the same bytes).
crds: $(VENV)/.dev-installed
	$(BIN)/python -m leyline.crd --write crds/ charts/tolaria/files/crds/

REGISTRY ?= ghcr.io/tolaria
VERSION ?= 0.1.0
DOCKER ?= docker

images:
	$(DOCKER) build -f trainer_image/Dockerfile -t $(REGISTRY)/trainer:$(VERSION) .
	$(DOCKER) build -f sidecar/Dockerfile -t $(REGISTRY)/sidecar:$(VERSION) .
	$(DOCKER) build -f operator/Dockerfile -t $(REGISTRY)/operator:$(VERSION) .

clean-venv:
	rm -rf $(VENV)
