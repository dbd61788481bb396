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
MILVUS_DATA ?= runs/milvus
MILVUS_PORT ?= 19530

.PHONY: setup demo test bench milvus clean

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

# A local Milvus standalone server (the milvus==2.3.5 wheel: embedded etcd, data on disk in
# $(MILVUS_DATA)), in the foreground until Ctrl-C. The launcher would silently take the
# next port when $(MILVUS_PORT) is taken, so that is refused first.
milvus: setup
	@$(BIN)/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', $(MILVUS_PORT)))" 2>/dev/null \
	  || { echo "port $(MILVUS_PORT) is in use (another Milvus?): make milvus MILVUS_PORT=..." >&2; exit 1; }
	@echo "Milvus at http://127.0.0.1:$(MILVUS_PORT), data in $(MILVUS_DATA) (up in ~10-45 s; Ctrl-C stops it)"
	$(BIN)/milvus-server --data $(MILVUS_DATA) --proxy-port $(MILVUS_PORT)

clean:
	rm -rf $(VENV) runs
