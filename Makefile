VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install test test-all train bench lint clean

install:
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'

test:
	$(PY) -m pytest -q

test-all:
	$(PY) -m pytest -q -m ''

train:
	$(PY) -m raymoe train

bench:
	$(PY) -m raymoe bench --out benchmarks/results

lint:
	$(VENV)/bin/ruff check raymoe tests

clean:
	rm -rf runs .pytest_cache
