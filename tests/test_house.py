"""The house rules: the README's tables are the code's, and the import boundaries hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pgqr.cli import exit_status_table
from pgqr.evolution import error_class_table
from pgqr.settings import markdown_table

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def section(name: str) -> str:
    return README.split(f"<!-- {name}:begin -->\n", 1)[1].split(f"\n<!-- {name}:end -->", 1)[0]


def test_the_readme_settings_table_is_the_declaration() -> None:
    assert section("settings") == markdown_table(), "regenerate it: python -c 'from pgqr.settings import " \
                                                    "markdown_table; print(markdown_table())'"


def test_the_readme_error_class_table_is_the_client_table() -> None:
    assert section("error-classes") == error_class_table()


def test_the_readme_exit_status_table_is_the_commands_table() -> None:
    assert section("exit-statuses") == exit_status_table()


def test_the_import_boundaries_hold() -> None:
    """The contracts in pyproject.toml: the runtime never loads the simulator or the composition root, and the
    Evolution client and the database layer stand alone (import-linter, as `make lint` runs it)."""
    result = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def test_no_module_is_over_450_lines() -> None:
    """One job per module: none of pgqr's modules grows past 450 lines (split it by job instead)."""
    package = Path(__file__).resolve().parent.parent / "pgqr"
    sizes = {p.relative_to(package).as_posix(): len(p.read_text().splitlines()) for p in package.rglob("*.py")}
    assert len(sizes) > 40 and max(sizes.values()) > 200  # it sees the modules (the check can fail)
    assert {module: lines for module, lines in sizes.items() if lines > 450} == {}
