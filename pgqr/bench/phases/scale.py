"""100,000 rows in the app's table, 10,000 of them waiting: what the tick's sync, each monitoring view,
`pgqr status` and `pgqr doctor` take at that size."""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from typing import Any

import psycopg

from ..context import Bench
from ..database import Db
from ..harness import SimProcess, reconcile_in_child

SCALE_ROWS = 100_000
SCALE_WAITING = 10_000


def ms(seconds: float) -> str:
    """report.ms with thousands grouped, as this phase's figures have always been printed (walls of seconds)."""
    return f"{seconds * 1000:,.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"


async def timed(conn: psycopg.AsyncConnection[Any], sql: str, repeats: int = 3) -> tuple[float, int]:
    """The median wall of running `sql` and fetching every row, and the rows it returned."""
    walls, rows = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        cur = await conn.execute(sql.encode())
        rows = len(await cur.fetchall()) if cur.description else 0
        walls.append(time.perf_counter() - started)
    return statistics.median(walls), rows


async def run_cli(dsn: str, *args: str, **extra: str) -> tuple[float, int, str]:
    """`pgqr ARGS` against dsn (and the settings in `extra`): its wall, exit status and output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGQR_", "EVOLUTION_", "DATABASE_URL"))}
    env.update(DATABASE_URL=dsn, **extra)
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "pgqr", *args, env=env,
                                                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return time.perf_counter() - started, proc.returncode or 0, out.decode(errors="replace")


async def load_scale(d: Db, waiting: dict[str, str], others: int) -> None:
    """The app's table at scale, loaded as a bulk load does it (no trigger): `others` connected rows pgqr only
    keeps track of, and the waiting ones the simulator knows."""
    async with await psycopg.AsyncConnection.connect(d.dsn) as conn:
        await conn.execute("SET session_replication_role = replica")
        async with conn.cursor().copy("COPY public.evolution_instances (instance_name, instance_token, "
                                      "instance_status) FROM STDIN") as copy:
            for i in range(others):
                await copy.write_row((f"done-{i:06d}", f"token-{i:06d}", "connected"))
            for name, token in waiting.items():
                await copy.write_row((name, token, "connecting"))
        await conn.execute("SET session_replication_role = origin")
        await conn.commit()


async def scale(bench: Bench) -> None:
    """100,000 rows in the app's table, 10,000 of them waiting and polled once: what the tick's sync, each
    monitoring view, `pgqr status` and `pgqr doctor` take at that size (the median of three, but one `status
    --json` and one doctor). Evolution answers at once here: doctor asks it about each waiting instance (its
    connectionState, and its webhook when webhooks are on), ten at a time, so a real Evolution adds waiting / 10
    x its latency per question (200 s at 200 ms a call for 10,000 waiting)."""
    r, section = bench.report, f"{SCALE_ROWS:,} rows"
    d = Db.create(bench.server, "bench_scale")
    sim = await SimProcess.start(qr_ttl=3600, latency=0)
    try:
        tokens = await sim.bulk(SCALE_WAITING, "scale")
        await load_scale(d, tokens, SCALE_ROWS - SCALE_WAITING)
        async with await d.connect() as conn:
            first_sync, _ = await timed(conn, "SELECT pgqr.sync_instances()", repeats=1)
        r.add(section, f"the first sync after a bulk load of {SCALE_ROWS:,} rows (pgqr.sync_instances())",
              ms(first_sync))
        # every waiting instance polled once: a QR, a log row and counts each, as after pgqr's first minutes
        done = await reconcile_in_child(d.dsn, sim.base_url, bench.o.concurrency)
        await d.quiesce()  # the statistics autovacuum would have gathered by now
        r.raw[section] = {"reconcile": done}
        async with await d.connect() as conn:
            views = [str(v) for (v,) in await (await conn.execute(
                "SELECT viewname FROM pg_views WHERE schemaname = 'pgqr' AND viewname LIKE 'alert%' "
                "ORDER BY viewname")).fetchall()]
            probes = [("the tick's sync, nothing changed", "SELECT pgqr.sync_instances()"),
                      ("the tick (sync and NOTIFY)", "SELECT pgqr.tick()")]
            probes += [(f"SELECT * FROM pgqr.{v}", f"SELECT * FROM pgqr.{v}") for v in (
                "instance_health", "freshness", "refresh_stats", "listeners", *views)]
            probes += [("pgqr.check_alerts()", "SELECT * FROM pgqr.check_alerts()"),
                       ("pgqr.status(200) (what `pgqr status` reads)", "SELECT pgqr.status(200)"),
                       ("pgqr.status() (what `pgqr status --json` reads)", "SELECT pgqr.status()")]
            for label, sql in probes:
                wall, rows = await timed(conn, sql)
                r.raw[section + " " + label] = {"seconds": wall, "rows": rows}
                r.add(section, f"{label} ({rows:,} row{'s' if rows != 1 else ''})", ms(wall))
        env = {"EVOLUTION_API_URL": sim.base_url, "EVOLUTION_API_KEY": "pgqr-simulator-key"}
        for args, repeats in ((("status",), 3), (("status", "--json"), 1), (("doctor",), 1)):
            walls, out, code = [], "", 0
            for _ in range(repeats):
                wall, code, out = await run_cli(d.dsn, *args, **env)
                walls.append(wall)
            lines = out.splitlines()
            r.raw[section + " pgqr " + " ".join(args)] = {"seconds": walls, "exit": code, "lines": len(lines),
                                                         "bytes": len(out), "tail": lines[-3:]}
            what = (f"{len(lines):,} lines, {len(out) / 1e6:.1f} MB" if args[0] == "status"
                    else lines[-1] if lines else "")
            at_once = "; Evolution answering at once" if args[0] == "doctor" else ""
            r.add(section, f"`pgqr {' '.join(args)}` ({what}; exit {code}{at_once})", ms(statistics.median(walls)))
    finally:
        await sim.stop()
        d.drop()
