# Two commands for a fresh machine (see README):
#   make run    set up .venv, then the main job: data check -> train default -> evaluate on test -> report
#   make test   set up .venv, then the test suite
PY ?= python3
VENV ?= .venv
DATA ?= $(or $(PNEUMOSCOPE_DATA),../shared/data/chest_xray)
OUT ?= out
BIN := $(VENV)/bin

.PHONY: setup run test clean

$(BIN)/pneumoscope: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/pneumoscope

run: setup
	$(BIN)/pneumoscope run --data "$(DATA)" --out "$(OUT)"

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
