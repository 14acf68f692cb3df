"""`pgqr demo`, the README's first command, end to end in a subprocess."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import run_pgqr

from pgqr import migrations
from pgqr.demo import HEADER, QR_TTL


def tables(out: str) -> list[dict[str, dict[str, str]]]:
    """Every table the demo printed, as {instance: {column: cell}} (cells hold no spaces)."""
    found: list[dict[str, dict[str, str]]] = []
    for line in out.splitlines():
        cells = line.split()
        if cells[:2] == ["instance", "status"]:
            found.append({})
        elif found and cells and cells[0] in ("acme-store", "bakery-hq", "clinic-front", "ghost-shop"):
            header = [h.replace(" ", "_") for h in HEADER]
            found[-1][cells[0]] = dict(zip(header, cells, strict=True))
    return found


def test_demo_refreshes_and_rotates_qr_codes_shows_a_scan_and_a_missing_instance_then_cleans_up() -> None:
    duration = QR_TTL + 4  # long enough for one rotation
    result = run_pgqr("demo", "--duration", str(duration), "--scan-after", "3", timeout=120)
    server_dir = re.search(r"PostgreSQL in (\S+) on port", result.stdout)
    assert server_dir and not Path(server_dir.group(1)).exists()  # the throwaway server is gone
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for m in migrations.load():
        assert f"applied {m.name}" in out
    assert "bound public.evolution_instances (key id)" in out
    assert "pgqr demo: acme-store was scanned on the phone" in out
    last = tables(out.split("pgqr demo: acme-store was scanned on the phone")[1])[-1]
    assert (last["acme-store"]["status"], last["acme-store"]["QR"]) == ("connected", "-")
    assert (last["bakery-hq"]["status"], last["bakery-hq"]["last_outcome"]) == ("connecting", "qr")
    assert (last["ghost-shop"]["last_outcome"], last["ghost-shop"]["error"]) == ("failed", "not_found")
    # the QR on show rotated: a second one replaced the first
    assert [t["bakery-hq"]["QR"] for t in tables(out) if t["bakery-hq"]["QR"] != "-"][:1] == ["#1"]
    assert last["bakery-hq"]["QR"] == "#2"
    assert out.rstrip().endswith("pgqr demo: stopped; the throwaway database is removed.")
    assert "Traceback" not in result.stderr
