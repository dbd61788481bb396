# The README's commands. `make demo` trains, evaluates (and later indexes and serves) on the
# real product photos; `make test` sets up and runs the test suite (what CI runs).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/fashion-product-images-small
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
	$(BIN)/fashionhash demo --data $(DATA) --run-dir $(RUN) $(DEMO_ARGS)

test: setup
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_index.py

clean:
	rm -rf $(VENV) runs
