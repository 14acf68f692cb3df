"""The README's tables are the code's: settings declared once, error classes written once."""

from __future__ import annotations

from pathlib import Path

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
