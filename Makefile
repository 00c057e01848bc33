# merge-cli developer commands. `make demo` and `make test` set up everything they need.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-fast lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(BIN)/python scripts/make_example_models.py examples/models
	$(BIN)/merge-cli run recipes/examples/linear.yaml --out examples/merged --overwrite
	$(BIN)/merge-cli inspect examples/merged --limit 8
	$(BIN)/merge-cli diff examples/models/math examples/merged --limit 8

# The whole suite, after the lint (style, complexity, import layers).
test: lint
	$(BIN)/python -m pytest

# For development: the suite without the tests marked slow.
test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

lint: venv
	$(BIN)/ruff check merge_cli tests scripts recipes
	$(BIN)/ruff format --check merge_cli tests scripts recipes
	$(BIN)/lint-imports

bench: venv
	$(BIN)/python scripts/bench.py --repeat 3

clean:
	rm -rf $(VENV) examples bench-data
