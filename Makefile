# pairtrace: two commands do everything on a fresh machine.
#   make run    set up .venv, build the built-in organism, run the whole experiment, write the report
#   make test   set up .venv and run the test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
CONFIG  ?= configs/organism.yaml
OUT     ?= runs/organism

.PHONY: run test lint setup clean

$(BIN)/pairtrace: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/pairtrace

setup: $(BIN)/pairtrace

run: setup
	$(BIN)/pairtrace run $(CONFIG) --out $(OUT)

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
