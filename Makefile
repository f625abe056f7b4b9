# Two entry points (see README): `make run` and `make test`. Both set up .venv first.
VENV ?= .venv
PYTHON ?= python3
# The CPU wheel by default; on a GPU machine use e.g. TORCH_SPEC="torch==2.13.0" with the CUDA index.
TORCH_SPEC ?= torch==2.13.0
WORKFLOW ?= examples/invert.json
PYTEST_ARGS ?=

.PHONY: setup run test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/kiln run $(WORKFLOW)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(VENV)/bin/python bench/validation.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
