"""`pgqr demo`, the README's first command, end to end in a subprocess."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import run_pgqr


def test_demo_refreshes_qr_codes_shows_a_scan_and_a_missing_instance_then_cleans_up() -> None:
    result = run_pgqr("demo", "--duration", "8", "--scan-after", "3", timeout=120)
    server_dir = re.search(r"PostgreSQL in (\S+) on port", result.stdout)
    assert server_dir and not Path(server_dir.group(1)).exists()  # the throwaway server is gone
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "applied 0001_instances.sql" in out
    last_table = out.split("pgqr demo: acme-store was scanned on the phone")[1]
    rows = {line.split()[0]: line.split() for line in last_table.splitlines() if line.startswith(("acme", "bakery",
                                                                                                  "clinic", "ghost"))}
    assert rows["acme-store"][1:3] == ["connected", "-"]
    assert rows["bakery-hq"][1] == "connecting" and rows["bakery-hq"][3] == "qr"
    assert rows["ghost-shop"][3:5] == ["failed", "not_found"]
    assert out.rstrip().endswith("pgqr demo: stopped; the throwaway database is removed.")
    assert "Traceback" not in result.stderr
