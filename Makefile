# Two commands for a fresh machine (see README):
#   make run    set up .venv, then the main job: data check -> train default -> evaluate on test -> report
#   make test   set up .venv, then the test suite
PY ?= python3
VENV ?= .venv
DATA ?= $(or $(PNEUMOSCOPE_DATA),../shared/data/chest_xray)
OUT ?= out
BIN := $(VENV)/bin

.PHONY: setup run test bundle clean

$(BIN)/pneumoscope: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/pneumoscope

run: setup
	$(BIN)/pneumoscope run --data "$(DATA)" --out "$(OUT)"

# Re-create the bundled model (src/pneumoscope/weights/default) from the default config.
bundle: setup
	$(BIN)/pneumoscope train --config default --data "$(DATA)" --out runs/bundle-default
	$(BIN)/pneumoscope evaluate runs/bundle-default --data "$(DATA)" --split test
	$(BIN)/pneumoscope bundle runs/bundle-default

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
