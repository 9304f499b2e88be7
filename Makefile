# One command for each thing a newcomer wants: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# Where pip finds torch; e.g. https://download.pytorch.org/whl/cpu for the CPU build (PyPI's Linux
# wheel carries CUDA). Empty: pip's own configuration.
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

$(BIN)/brain3d: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so that peft does not pull another build.
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/brain3d  ## create .venv and install the project

demo: setup  ## run the end-to-end demo on embedded defaults (no services)
	$(BIN)/brain3d demo

test: setup  ## install the DICOM tools, start PostgreSQL and Redis where needed, run every test
	scripts/test-prerequisites.sh
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf var .pytest_cache .ruff_cache
