# The two quick-start commands: `make demo` (install + the demo run) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TARGET ?= all

.PHONY: install demo test lint clean-demo

$(BIN)/fgvlm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/fgvlm

demo: install
	$(BIN)/snakemake --profile profiles/demo $(TARGET)

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests workflow bench
	$(BIN)/ruff format --check src tests workflow bench
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint --configfile config/demo.yaml

clean-demo:
	rm -rf data results shards models runs logs benchmarks .snakemake
