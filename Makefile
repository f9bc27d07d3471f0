# The two quick-start commands: `make demo` (install + the demo run) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TARGET ?= all
# Where `snakemake --profile slurm` looks after ./slurm (platformdirs' user config dir).
PROFILE_DIR ?= $(or $(XDG_CONFIG_HOME),$(HOME)/.config)/snakemake

.PHONY: install demo test lint clean-demo slurm-profile

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

# Links profiles/slurm where `snakemake --profile slurm` finds it: edits to the repo's profile apply.
slurm-profile:
	mkdir -p "$(PROFILE_DIR)"
	@if [ -e "$(PROFILE_DIR)/slurm" ] && [ ! -L "$(PROFILE_DIR)/slurm" ]; then \
		echo "$(PROFILE_DIR)/slurm exists and is not a link: move it away first" >&2; exit 1; fi
	ln -sfn "$(CURDIR)/profiles/slurm" "$(PROFILE_DIR)/slurm"
	@echo "snakemake --profile slurm -> $(CURDIR)/profiles/slurm"
