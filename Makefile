# Two commands for a fresh machine:
#   make serve   start dicomflow on the embedded default (SQLite + a folder), installing what it needs
#   make test    run the whole test suite (ruff, mypy --strict, pytest), installing what it needs
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(VENV)/.runtime $@

.PHONY: serve test lint sysdeps bench clean
serve: $(VENV)/.runtime
	$(BIN)/dicomflow serve $(ARGS)

sysdeps:
	bash scripts/install-sysdeps.sh

lint: $(VENV)/.dev
	$(BIN)/ruff check dicomflow tests bench
	$(BIN)/mypy

test: $(VENV)/.dev sysdeps lint
	$(BIN)/pytest

bench: $(VENV)/.dev sysdeps
	$(BIN)/python -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) dicomflow-data .mypy_cache .ruff_cache .pytest_cache
