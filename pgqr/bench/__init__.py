"""`pgqr bench`: the figures of the refresh engine, measured end to end with real processes.

Everything runs on this machine: a throwaway PostgreSQL with pg_cron (pgqr.devdb), the Evolution simulator as
its own process (`pgqr simulate`, pre-rendered ~13 KB images, 200 ms per call), and pgqr as child processes:
one reconcile pass (`refresh --once`'s engine) in a child of its own so its peak RSS is pgqr's alone, and
`pgqr run` for wake-ups, webhooks and freshness (also with that child's clock set 20 s ahead and 20 s behind, by
faketime: pgqr takes every time it compares from the database). Figures, not assertions: the tests assert
behaviour. Each figure carries the machine's 1-minute load average when it was taken: a shared machine's other
work lengthens tails. Other phases add the database's own time per poll (pg_stat_statements), 100,000 rows,
replicas and an immediate stop of PostgreSQL; --quick skips the phases in FULL_ONLY.

    pgqr bench [--json PATH] [--instances 2000,10000] [--quick] [--freshness-seconds 180] [--phases a,b]

One job per module: `options` what may be asked (light: the CLI reads it while parsing), `run` the phases in order
and the printed table, `context` what every phase shares, `report` the table and the machine's facts, `harness`
the child processes (the simulator, `pgqr run`, one reconcile pass), `database` a bench database and its WAL,
`load` webhooks at a steady rate, `baseline` the once-a-minute way pgqr replaces, `statements` the database's own
time (pg_stat_statements), and `phases/` one module per phase.
"""

from __future__ import annotations

from .options import FULL_ONLY, PHASES, Options

__all__ = ["FULL_ONLY", "PHASES", "Options", "main"]


def main(options: Options, json_path: str | None = None) -> int:
    """Run the bench and print its table (and write every figure to json_path). Imported on call: the bench
    loads the simulator and the service, which parsing the command line must not."""
    from . import run

    return run.main(options, json_path)
