# Two commands on a fresh machine with Python 3.11: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: run test bench chaos fuzz clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt requirements-assets.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-assets.txt
	touch $(STAMP)

$(DEVSTAMP): $(STAMP) requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(DEVSTAMP)

## start the service under uWSGI on 127.0.0.1:8080 (SQLite in var/, pushes in dry-run without credentials)
run: $(STAMP)
	mkdir -p var/run
	@# metric files of processes that are gone (not those of a dispatcher that outlived the last run:
	@# it still writes to its files, and a deleted file would hide its counts until it exits)
	@for f in var/run/metrics/*.db; do [ -e "$$f" ] || continue; pid=$${f##*_}; pid=$${pid%.db}; \
		[ -d "/proc/$$pid" ] || rm -f "$$f"; done
	$(VENV)/bin/uwsgi --ini uwsgi.ini

## check the import layers (.importlinter), then run the whole test suite
test: $(DEVSTAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest

## run the benchmarks; tables on stdout, JSON in bench/results/
bench: $(DEVSTAMP)
	$(PY) -m bench

## seeded random faults (kills, reloads, restarts, provider storms) while messages stream; table + JSON
chaos: $(DEVSTAMP)
	$(PY) -m bench.chaos $(CHAOS_ARGS)

## schemathesis against the running service's /openapi.json under uWSGI, about 10,000 requests
fuzz: $(DEVSTAMP)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-10000} $(PY) -m pytest -p no:cacheprovider tests/test_fuzz.py -q

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
