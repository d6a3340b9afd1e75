# The two commands of the README, and the checks CI runs. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint bench-smoke soak-smoke ci clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# two workers, a test module each at a time: most tests wait on runners booting and calls
# in flight, so two share the 2 cores well (and a module's shared pool stays in one worker)
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples
	$(VENV)/bin/mypy

bench-smoke: $(STAMP)
	$(PY) -m bench --smoke

# chaos: SIGKILL/SIGSTOP runners under load; fails on wrong results, hangs or leaks
soak-smoke: $(STAMP)
	$(PY) -m bench.soak --seconds 60

ci: lint test bench-smoke soak-smoke

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
