# Quick start: `make demo` and `make test` on a fresh machine (both set up .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedrec-installed

.PHONY: install demo test lint bench clean mutants

install: $(STAMP)

# Re-runs only when the dependency declarations change; a no-op (well under a second) otherwise.
$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt --no-build-isolation -e '.[dev,bench]'
	touch $(STAMP)

# The main job: secure federated DLRM (DP-SGD + encrypted FedAvg) under mpirun -np 2, and its privacy report.
demo: install
	bash scripts/demo.sh runs/demo

lint: install
	$(PY) -m ruff check fedrec privacy scripts tests bench
	$(PY) -m ruff format --check fedrec privacy scripts tests bench
	$(PY) -m mypy fedrec privacy

test: install lint
	$(PY) -m pytest -q -p no:cacheprovider tests

# Mutation check of the privacy code: each mutation in tests/mutants/mutations.yml must be caught by
# its named tests (run on a temporary copy of the tree). MUTANTS_ARGS=--skip-baseline skips the run of
# the named tests on the unmutated copy (CI: make test has just run them).
mutants: install
	$(PY) tests/mutants/run.py $(MUTANTS_ARGS)

bench: install
	$(PY) bench/run_all.py

clean:
	rm -rf runs build *.egg-info
