# Every target sets up what it needs on a fresh Debian machine: PostgreSQL 15 with pg_cron, a virtualenv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PG_LIB := /usr/lib/postgresql/15/lib

.PHONY: test demo bench lint system venv clean image-test wheel-check

# two workers, each with its own throwaway PostgreSQL (most tests wait on real processes and timers, not the CPU)
test: system venv
	$(BIN)/python -m pytest -n 2

demo: system venv
	$(BIN)/pgqr demo

bench: system venv
	$(BIN)/pgqr bench

# Build the image (podman, or docker where an engine answers) and check it against a throwaway PostgreSQL with
# pg_cron (deploy/image-test.sh). Without registry access, first run the base-image helper that CONTAINER_BASE
# names, as root (it builds the base images locally; .ci/run does this).
image-test:
	deploy/image-test.sh

# Build the sdist and the wheel (python -m build), twine check --strict them, install the wheel into a fresh
# virtualenv outside the repository and run pgqr --version, migrate and migrate --verify against a throwaway
# PostgreSQL with pg_cron (deploy/wheel-check.sh; everything lives in a temporary folder, removed on exit).
wheel-check: system venv
	PYTHON=$(PYTHON) TOOLS=$(abspath $(BIN)) deploy/wheel-check.sh

lint: venv
	$(BIN)/ruff check pgqr tests
	$(BIN)/mypy pgqr
	$(BIN)/lint-imports

# PostgreSQL 15 + pg_cron 1.4 from Debian (the unprivileged `postgres` account comes with it), Debian's chromium
# for the live page's browser tests (Playwright drives it; `playwright install` is never run), pgbouncer for
# tests/test_pooler.py, faketime for the clock tests and prometheus (promtool and the server) for
# tests/test_prometheus.py. Only what is missing is installed, after a line naming it, and without the packages
# they merely recommend (prometheus's would add node and IPMI exporters, each a service of its own).
# No service is touched: Debian starts its packaged pgbouncer on port 6432 and prometheus on port 9090 when it
# installs them, and those are left as they are (the tests start their own on free ports). Each package is known
# by one file; give MISSING="pkg ..." on the command line to see what an install would run
# (make -n system MISSING=pgbouncer).
INITDB    = /usr/lib/postgresql/15/bin/initdb
PG_CRON   = $(PG_LIB)/pg_cron.so
PGBOUNCER = /usr/sbin/pgbouncer
CHROMIUM  = /usr/bin/chromium
FAKETIME  = /usr/bin/faketime
PROMTOOL  = /usr/bin/promtool
MISSING  := $(strip $(shell [ -x $(INITDB) ] || echo postgresql-15; [ -f $(PG_CRON) ] || echo postgresql-15-cron; \
              [ -x $(PGBOUNCER) ] || echo pgbouncer; [ -x $(CHROMIUM) ] || echo chromium; \
              [ -x $(FAKETIME) ] || echo faketime; [ -x $(PROMTOOL) ] || echo prometheus; \
              $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || echo python3-venv))

system:
ifneq ($(MISSING),)
	@echo "make system: installing the missing Debian packages: $(MISSING)"
	$(if $(filter pgbouncer,$(MISSING)),@echo "make system: Debian's pgbouncer starts on port 6432 and is left running \
	  (the tests start their own on a free port)")
	$(if $(filter prometheus,$(MISSING)),@echo "make system: Debian's prometheus starts on port 9090 and is left \
	  running (the tests start their own on a free port)")
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(MISSING)
endif

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,sim]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
