# Everything a fresh machine needs is installed here: `make test` and `make quickstart` set up .venv themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qlorakit-installed
# A CUDA machine keeps the torch it has; a CPU machine gets the pinned CPU wheel (an unpinned torch pulls CUDA).
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=

.PHONY: setup test quickstart dpo clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(HAS_CUDA),)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0 triton==3.7.1
endif
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,eval]"
	@touch $@

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The replies before and after training: greedy, with a mild repetition penalty over the reply (README: why).
QUICKSTART_DECODING := --repetition-penalty 1.1 --max-new-tokens 128
QUICKSTART_PROMPTS := --prompt "Give three tips for a good night's sleep." \
	--prompt "Is a tomato a fruit or a vegetable? Answer in one sentence." \
	--prompt "Write a haiku about autumn rain."

quickstart: $(STAMP)
	@start=$$(date +%s); \
	$(BIN)/qlorakit demo && \
	$(BIN)/qlorakit train examples/quickstart.yaml $(QUICKSTART_DECODING) $(QUICKSTART_PROMPTS); status=$$?; \
	echo "quickstart: $$(( $$(date +%s) - start )) s (after set-up)"; exit $$status

# Preference tuning after the quickstart (examples/dpo.yaml): pairs sampled from its adapter, then DPO from it.
dpo: $(STAMP)
	@test -f runs/quickstart/adapter/adapter_model.safetensors || { echo "dpo: run make quickstart first"; exit 2; }
	@start=$$(date +%s); \
	$(BIN)/qlorakit pairs --adapter runs/quickstart/adapter --out runs/dpo-pairs.jsonl --max-pairs 64 \
		--max-new-tokens 48 && \
	$(BIN)/qlorakit train examples/dpo.yaml $(QUICKSTART_DECODING) $(QUICKSTART_PROMPTS); status=$$?; \
	echo "dpo: $$(( $$(date +%s) - start )) s (after the quickstart)"; exit $$status

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
