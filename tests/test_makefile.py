"""The Makefile leaves the machine's services alone (issue 20): it installs only what is missing, says what first,
and never stops, disables or reconfigures a service.

Read from make's own output: `make -n` prints every command a target would run without running any, and
MISSING="..." on the command line forces the install branch whatever this machine has installed.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EVERYTHING = ["postgresql-15", "postgresql-15-cron", "pgbouncer", "chromium", "faketime", "prometheus",
              "python3-venv"]
# a command that starts, stops, enables, disables or reconfigures a system service
SERVICE_COMMAND = re.compile(r"(?<![\w.-])(service|systemctl|update-rc\.d|invoke-rc\.d)(?![\w.-])")
# what `make system` ran before issue 20, as a control that the check finds service commands in make's output
OLD_RECIPE = """\
system:
\t@if [ ! -x /nonexistent/initdb ]; then \\
\t  echo "installing pgbouncer"; \\
\t  apt-get update -qq && apt-get install -y -qq pgbouncer >/dev/null; \\
\t  service pgbouncer stop >/dev/null 2>&1 || true; \\
\t  update-rc.d pgbouncer disable >/dev/null 2>&1 || true; \\
\t  systemctl disable --now pgbouncer >/dev/null 2>&1 || true; \\
\tfi
"""


def make_n(*args: str, makefile: Path | None = None) -> list[str]:
    """The commands `make -n` prints for these targets and variables (nothing is run)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    command = ["make", "--no-print-directory", "-n", *(["-f", str(makefile)] if makefile else []), *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def installs(lines: list[str]) -> list[str]:
    """The packages named on the `apt-get install` line, in order."""
    found = [line.split("apt-get install", 1)[1].split() for line in lines if "apt-get install" in line]
    assert len(found) <= 1, lines
    return [word for word in found[0] if not word.startswith("-")] if found else []


def service_commands(lines: list[str]) -> list[str]:
    return [line for line in lines if SERVICE_COMMAND.search(line)]


def test_the_check_finds_service_commands_in_what_make_would_run(tmp_path: Path) -> None:
    """The control for the tests below: the recipe that stopped and disabled pgbouncer is caught."""
    old = tmp_path / "Makefile"
    old.write_text(OLD_RECIPE)
    found = " ".join(service_commands(make_n("system", makefile=old)))
    assert all(command in found for command in ("service pgbouncer stop", "update-rc.d pgbouncer disable",
                                                "systemctl disable --now pgbouncer"))


def test_an_install_of_everything_runs_no_service_command() -> None:
    missing = " ".join(EVERYTHING)
    # -B: every recipe of every target, the virtualenv's too, as on a fresh machine
    lines = make_n("-B", "test", "demo", "bench", "lint", "system", f"MISSING={missing}")
    assert installs(lines) == EVERYTHING  # the install branch is in what make would run
    assert service_commands(lines) == []


def test_the_packages_are_named_before_anything_is_installed() -> None:
    lines = make_n("system", "MISSING=pgbouncer chromium prometheus")
    said = next(i for i, line in enumerate(lines) if "installing the missing Debian packages: pgbouncer chromium "
                "prometheus" in line)
    first_apt = next(i for i, line in enumerate(lines) if "apt-get" in line)
    assert said < first_apt
    assert any("6432" in line and "left running" in line for line in lines[:first_apt])
    assert any("prometheus starts on port 9090" in line and "left running" in line for line in lines[:first_apt])
    assert installs(lines) == ["pgbouncer", "chromium", "prometheus"]
    # only what is named: prometheus alone recommends node and IPMI exporters, services of their own
    assert "--no-install-recommends" in next(line for line in lines if "apt-get install" in line)


@pytest.fixture
def present(tmp_path: Path) -> Path:
    """A file that shows a package is installed (the Makefile knows each package by one file)."""
    path = tmp_path / "present"
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_only_the_missing_packages_are_installed(present: Path, tmp_path: Path) -> None:
    absent = tmp_path / "absent"
    files = {"INITDB": present, "PG_CRON": present, "PGBOUNCER": absent, "CHROMIUM": present, "FAKETIME": absent,
             "PROMTOOL": present}
    some = make_n("system", *(f"{name}={path}" for name, path in files.items()), "PYTHON=true")
    assert installs(some) == ["pgbouncer", "faketime"]
    assert any("installing the missing Debian packages: pgbouncer faketime" in line for line in some)
    # and python3-venv when this Python cannot make a virtualenv
    assert installs(make_n("system", *(f"{name}={path}" for name, path in files.items()), "PYTHON=false")) == [
        "pgbouncer", "faketime", "python3-venv"]


def test_nothing_is_installed_or_said_when_nothing_is_missing(present: Path) -> None:
    files = [f"{name}={present}" for name in ("INITDB", "PG_CRON", "PGBOUNCER", "CHROMIUM", "FAKETIME", "PROMTOOL")]
    assert installs(make_n("system", *files, "PYTHON=false")) == ["python3-venv"]  # the positive control
    lines = make_n("system", *files, "PYTHON=true")
    assert not [line for line in lines if "apt-get" in line or "installing" in line], lines
