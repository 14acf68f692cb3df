"""The house rules: the README's tables are the code's, and the import boundaries hold."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

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


def test_the_layers_catch_a_runtime_module_that_imports_the_simulator(tmp_path: Path) -> None:
    """The contracts can fail: in a copy of pgqr where the engine (which the composition root imports, and which
    no contract names) imports the simulator, lint-imports reports the chain from pgqr.service."""
    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root / "pgqr", tmp_path / "pgqr", ignore=shutil.ignore_patterns("__pycache__"))
    with (tmp_path / "pgqr" / "engine.py").open("a") as engine:
        engine.write("\nimport pgqr.simulator  # noqa\n")
    result = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache",
                             str(root / "pyproject.toml")], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=120)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "pgqr.service is not allowed to import pgqr.simulator" in result.stdout
    assert "pgqr.service -> pgqr.engine" in result.stdout


def test_no_module_is_over_450_lines() -> None:
    """One job per module: none of pgqr's modules grows past 450 lines (split it by job instead)."""
    package = Path(__file__).resolve().parent.parent / "pgqr"
    sizes = {p.relative_to(package).as_posix(): len(p.read_text().splitlines()) for p in package.rglob("*.py")}
    assert len(sizes) > 40 and max(sizes.values()) > 200  # it sees the modules (the check can fail)
    assert {module: lines for module, lines in sizes.items() if lines > 450} == {}


def import_cycles(package: str) -> list[tuple[str, ...]]:
    """Every import cycle among `package`'s modules, `TYPE_CHECKING` imports included, each once, as the chain
    of modules from its smallest name back to it."""
    graph = grimp.build_graph(package, include_external_packages=False, exclude_type_checking_imports=False,
                              cache_dir=None)
    cycles: set[tuple[str, ...]] = set()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain is not None:
                loop = (module, *chain[:-1])
                start = loop.index(min(loop))
                cycles.add(loop[start:] + loop[:start] + (loop[start],))
    return sorted(cycles)


def test_no_module_of_pgqr_reaches_itself_through_its_imports() -> None:
    """No import cycle, not even one only a type checker follows: a cycle means two modules are one job."""
    cycles = [" -> ".join(cycle) for cycle in import_cycles("pgqr")]
    assert cycles == [], "import cycles (break each with a Protocol or a narrow callable):\n" + "\n".join(cycles)


def test_the_cycle_check_finds_a_type_only_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: a package whose modules import each other, one of them only under TYPE_CHECKING (the
    shape the simulator's server and routes once had), is reported with its chain."""
    package = tmp_path / "cyclic_house"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "server.py").write_text("from . import routes\n")
    (package / "routes.py").write_text("from typing import TYPE_CHECKING\n\n"
                                       "if TYPE_CHECKING:\n    from .server import Server\n")
    (package / "config.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("cyclic_house") == [
        ("cyclic_house.routes", "cyclic_house.server", "cyclic_house.routes"),
    ]
