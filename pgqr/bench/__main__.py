"""`python -m pgqr.bench reconcile DSN URL CONCURRENCY`: the child process harness.reconcile_in_child starts."""

from __future__ import annotations

import sys

from .harness import reconcile_child

if sys.argv[1:2] == ["reconcile"]:
    sys.exit(reconcile_child(sys.argv[2:]))
sys.exit(f"usage: {sys.argv[0]} reconcile DSN URL CONCURRENCY (pgqr bench runs this itself)")
