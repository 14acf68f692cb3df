# Every target sets up what it needs on a fresh Debian machine: PostgreSQL 15 with pg_cron, a virtualenv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PG_LIB := /usr/lib/postgresql/15/lib

.PHONY: test demo bench lint system venv clean image-test

test: system venv
	$(BIN)/python -m pytest

demo: system venv
	$(BIN)/pgqr demo

bench: system venv
	$(BIN)/pgqr bench

# Build the image (podman, or docker where an engine answers) and check it against a throwaway PostgreSQL with
# pg_cron (deploy/image-test.sh). Without registry access, run /work/shared/tools/container-base first (as root).
image-test:
	deploy/image-test.sh

lint: venv
	$(BIN)/ruff check pgqr tests
	$(BIN)/mypy pgqr
	$(BIN)/lint-imports

# PostgreSQL 15 + pg_cron 1.4 from Debian (the unprivileged `postgres` account comes with it), Debian's chromium
# for the live page's browser tests (Playwright drives it; `playwright install` is never run), and pgbouncer for
# tests/test_pooler.py. The tests start their own pgbouncer on a free port: the packaged service is stopped and
# disabled, so nothing listens on 6432 by default (where there is no systemd, invoke-rc.d's start may still run).
system:
	@if [ ! -x /usr/lib/postgresql/15/bin/initdb ] || [ ! -f $(PG_LIB)/pg_cron.so ] || [ ! -x /usr/sbin/pgbouncer ] \
	    || [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/faketime ] \
	    || ! $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null; then \
	  echo "installing postgresql-15 postgresql-15-cron pgbouncer python3-venv chromium faketime"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    postgresql-15 postgresql-15-cron pgbouncer python3-venv chromium faketime >/dev/null; \
	  $(SUDO) service pgbouncer stop >/dev/null 2>&1 || true; \
	  $(SUDO) update-rc.d pgbouncer disable >/dev/null 2>&1 || true; \
	  $(SUDO) systemctl disable --now pgbouncer >/dev/null 2>&1 || true; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,sim]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
