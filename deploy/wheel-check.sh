#!/usr/bin/env bash
# Check pgqr as a user gets it: build the sdist and the wheel as a release would (`python -m build`: the sdist,
# then the wheel from that sdist, in an isolated build environment), check both with `twine check --strict`,
# install the wheel into a fresh virtualenv outside the repository, and from another folder run `pgqr --version`,
# `pgqr migrate` and `pgqr migrate --verify` against a throwaway PostgreSQL 15 with pg_cron (started by the
# installed package's own pgqr.devdb: as root the server runs as the unprivileged postgres account).
# One PASS line per step; the first failing step prints the tail of its output, then one FAIL line, and exits 1.
# Nothing is written into the repository: the builds, the virtualenv and the server live in one temporary folder,
# removed on exit.
#
#   deploy/wheel-check.sh            (or: make wheel-check, which installs the prerequisites first)
#
# Settings: PYTHON, the interpreter for the fresh virtualenv (default python3); TOOLS, the folder with a python
# that has `build` and `twine` (default .venv/bin: the test extra); KEEP_DIST=DIR copies the built files there.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
PYTHON=${PYTHON:-python3}
TOOLS=${TOOLS:-$root/.venv/bin}

fail() { echo "wheel-check: FAIL $*" >&2; exit 1; }
"$TOOLS/python" -c 'import build, twine' 2>/dev/null || {
    echo "wheel-check: $TOOLS/python has no build and twine: make wheel-check installs them (the test extra)" >&2
    exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/pgqr-wheel-check.XXXXXX") && work=$(cd "$work" && pwd -P) || exit 2
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
venv=$work/venv
elsewhere=$work/elsewhere   # the folder the installed pgqr runs from: nothing of the repository is importable
mkdir "$elsewhere"

# run NAME COMMAND...: run it with its output in $work/out; on failure print the output's tail and stop
run() {
    local name=$1; shift
    "$@" >"$work/out" 2>&1
    local rc=$?
    if [ $rc -ne 0 ]; then
        tail -n 25 "$work/out" | sed 's/^/      /' >&2
        fail "$name (exit $rc): $(grep -v '^[[:space:]]*$' "$work/out" | tail -n 1 | cut -c1-300)"
    fi
}
# The installed package runs with none of the caller's pgqr settings and nothing on PYTHONPATH.
installed() {
    (cd "$elsewhere" && env -u PYTHONPATH -u PYTHONHOME -u VIRTUAL_ENV -u DATABASE_URL "$@")
}

# --- build and check ----------------------------------------------------------------------------------------------
run "python -m build" "$TOOLS/python" -m build --outdir "$work/dist" "$root"
sdists=("$work"/dist/pgqr-*.tar.gz); wheels=("$work"/dist/pgqr-*-py3-none-any.whl)
[ ${#sdists[@]} -eq 1 ] && [ -f "${sdists[0]}" ] && [ ${#wheels[@]} -eq 1 ] && [ -f "${wheels[0]}" ] \
    || fail "python -m build made $(ls "$work/dist" | tr '\n' ' '), not one sdist and one pure-Python wheel"
sdist=${sdists[0]}; wheel=${wheels[0]}
version=$(basename "$wheel"); version=${version#pgqr-}; version=${version%%-*}
echo "PASS  python -m build: $(basename "$sdist"), $(basename "$wheel") (the wheel built from the sdist)"
[ -n "${KEEP_DIST:-}" ] && { mkdir -p "$KEEP_DIST" && cp "$sdist" "$wheel" "$KEEP_DIST"/; }

run "twine check --strict" "$TOOLS/python" -m twine check --strict "$sdist" "$wheel"
echo "PASS  twine check --strict: both files"

# --- install into a fresh virtualenv ------------------------------------------------------------------------------
run "python -m venv" installed "$PYTHON" -m venv "$venv"
run "pip install the wheel" installed "$venv/bin/python" -m pip install -q --no-input "$wheel"
echo "PASS  pip install $(basename "$wheel") into a fresh virtualenv ($("$venv/bin/python" -V))"

run "import pgqr" installed "$venv/bin/python" -c 'import os, pgqr; print(os.path.realpath(pgqr.__file__))'
where=$(cat "$work/out")
case "$where" in "$venv"/*) echo "PASS  pgqr is imported from the virtualenv: ${where#"$work"/}" ;;
                 *) fail "pgqr is imported from $where, not from the fresh virtualenv" ;; esac

run "pgqr --version" installed "$venv/bin/pgqr" --version
[ "$(cat "$work/out")" = "pgqr $version" ] || fail "pgqr --version says '$(cat "$work/out")', not 'pgqr $version'"
echo "PASS  pgqr --version: pgqr $version"

# --- migrate a throwaway PostgreSQL -------------------------------------------------------------------------------
# The installed package starts the server and runs the installed `pgqr` against a new database `app` (pg_cron lives
# in `postgres`, as on most servers), and says what went wrong in one line. The migrations applied must be every
# file of the repository's sql/, so a wheel that lost one fails here even though migrate and verify would agree.
expected=$(cd sql && ls -1 [0-9]*.sql)
run "throwaway PostgreSQL + pgqr migrate" installed env PGQR_BIN="$venv/bin" EXPECTED="$expected" \
    "$venv/bin/python" - <<'PY'
import os
import subprocess
import sys

import psycopg

from pgqr import devdb


def pgqr(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGQR_", "EVOLUTION_", "EXPECTED"))}
    return subprocess.run([os.path.join(os.environ["PGQR_BIN"], "pgqr"), *args], env={**env, "DATABASE_URL": dsn},
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def fail(what: str, result: subprocess.CompletedProcess[str]) -> None:
    print(result.stdout + result.stderr, end="")
    sys.exit(f"{what} (exit {result.returncode})")


with devdb.running(cron_database="postgres") as server:
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE app")
    dsn = server.dsn("app")
    before = pgqr(dsn, "migrate", "--verify")  # the control: verify fails while anything is pending
    if before.returncode != 1 or "pending: " not in before.stdout:
        fail("pgqr migrate --verify on an empty database did not report pending migrations", before)
    print(f"PASS  pgqr migrate --verify before migrating: exit 1, {before.stdout.count('pending: ')} pending")
    migrate = pgqr(dsn, "migrate")
    if migrate.returncode != 0:
        fail("pgqr migrate", migrate)
    applied = [line.removeprefix("applied ") for line in migrate.stdout.splitlines() if line.startswith("applied ")]
    expected = os.environ["EXPECTED"].split()
    if applied != expected:
        fail(f"pgqr migrate applied {applied}, not every file of sql/: {expected}", migrate)
    bound = next((line for line in migrate.stdout.splitlines() if line.startswith("bound ")), "no binding")
    print(f"PASS  pgqr migrate: applied {len(applied)} migrations ({applied[0]} .. {applied[-1]}), {bound}")
    verify = pgqr(dsn, "migrate", "--verify")
    if verify.returncode != 0 or verify.stdout.strip() != "pgqr schema is up to date":
        fail("pgqr migrate --verify", verify)
    print(f"PASS  pgqr migrate --verify: {verify.stdout.strip()}")
PY
cat "$work/out"
echo "wheel-check: the wheel installs and migrates ($(basename "$wheel"))"
