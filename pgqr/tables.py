"""The one table renderer of the commands (status, demo, bench): left-aligned columns, two spaces apart."""

from __future__ import annotations

from collections.abc import Sequence


def render(rows: Sequence[Sequence[str]]) -> list[str]:
    """One line per row (the first is the header), each column as wide as its widest cell."""
    if not rows:
        return []
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
