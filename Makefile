# The README's commands. `make demo` trains, evaluates, indexes and serves a catalogue (the
# real product photos, DATA=..., or Fashion-MNIST); `make test` sets up and runs the test suite (what CI runs).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# DATA: a Kaggle-layout folder or a manifest CSV. Unset, the demo reads
# ../shared/data/fashion-product-images-small when it exists and falls back to Fashion-MNIST
# otherwise; a DATA that holds no catalogue is an error (never a silent fallback).
DATA ?=
RUN ?= runs/demo
DEMO_ARGS ?=

.PHONY: setup demo test bench clean

$(BIN)/fashionhash: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,milvus]'
	touch $@

setup: $(BIN)/fashionhash

demo: setup
	$(BIN)/fashionhash demo $(if $(DATA),--data '$(DATA)') --run-dir $(RUN) $(DEMO_ARGS)

test: setup
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_index.py

clean:
	rm -rf $(VENV) runs
