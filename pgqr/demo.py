"""`pgqr demo`: the whole flow on this machine, with nothing to set up and nothing left behind.

A throwaway PostgreSQL with pg_cron, pgqr's migrations, the Evolution simulator, a few instances and the
listener (with webhooks), and a live table as ticks and webhooks land. One instance gets "scanned".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import signal
import sys
import time

import psycopg

from . import devdb, links, logs, migrations, tables
from .service import Service
from .settings import Secret, Settings
from .simulator import SimConfig, Simulator

# Three instances live on the simulator; the fourth exists only in the database, so Evolution answers 404.
INSTANCES = ["acme-store", "bakery-hq", "clinic-front"]
MISSING = "ghost-shop"
QR_TTL = 10.0  # faster than Evolution's 45 s, so rotations show within half a minute
LINK_TTL = 3600  # the live pages' links work for an hour

# What a psql user sees: the monitoring view, trimmed to what changes during the demo, and how many QR codes
# pgqr has stored for each instance (the number goes up with each rotation).
TABLE_SQL = """
SELECT h.instance_name, h.status,
       CASE WHEN h.waiting AND h.has_qr THEN (SELECT count(*) FROM pgqr.refresh_log l
                                               WHERE l.instance_key = h.instance_key AND l.qr_updated) END,
       CASE WHEN h.waiting THEN extract(epoch FROM h.qr_age)::integer END AS qr_age,
       CASE WHEN h.qr_valid THEN ceil(extract(epoch FROM h.qr_expires_at - now()))::integer END AS valid_for,
       CASE WHEN h.waiting THEN h.qr_source::text END AS qr_from,
       h.last_outcome, h.last_error_class, h.consecutive_failures
FROM pgqr.instance_health h
ORDER BY h.instance_name
"""
HEADER = ("instance", "status", "QR", "QR age", "valid for", "QR from", "last outcome", "error", "failures")
TICKING = (3, 4)  # the columns that change every second (left out when deciding whether to print again)


def main(args: argparse.Namespace) -> int:
    logs.setup("text", "WARNING")
    print("pgqr demo: starting a throwaway PostgreSQL 15 with pg_cron ...", flush=True)
    with devdb.running(cron_database="postgres") as server:
        dsn = server.dsn("postgres")
        print(f"pgqr demo: PostgreSQL in {server.base} on port {server.port}", flush=True)
        for line in migrations.migrate(dsn):
            print(f"  {line}")
        try:
            return asyncio.run(_demo(dsn, args.duration, args.scan_after))
        finally:
            print("pgqr demo: stopped; the throwaway database is removed.", flush=True)


async def _demo(dsn: str, duration: float | None, scan_after: float) -> int:
    sim = Simulator(SimConfig(qr_ttl=QR_TTL, connect_sleep=0.5, first_qr_delay=0.3))
    base_url = await sim.start()
    with psycopg.connect(dsn, autocommit=True) as setup:  # pgqr told how long this Evolution keeps a QR
        setup.execute("UPDATE pgqr.settings SET value = %s WHERE key = 'qr_lifetime_seconds'", (str(QR_TTL),))
    tokens = {name: sim.add_instance(name) for name in INSTANCES}
    secret = secrets.token_urlsafe(16)
    link_secret = secrets.token_urlsafe(24)  # the live QR pages' links (a new secret per demo)
    service = Service(Settings(database_url=Secret(dsn), evolution_api_url=Secret(base_url), http_port=0,
                               webhook_secret=Secret(secret), link_secret=Secret(link_secret)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(service.run(stop))
    try:
        while service.http_port is None and not runner.done():
            await asyncio.sleep(0.05)
        # Evolution's global webhook: new QR codes reach pgqr within a second, not at the next tick
        sim.config.global_webhook_url = f"http://127.0.0.1:{service.http_port}/webhooks/evolution/{secret}"
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for name, token in [*tokens.items(), (MISSING, "no-such-token")]:
                await conn.execute(
                    "INSERT INTO public.evolution_instances (instance_name, instance_token, instance_status) "
                    "VALUES (%s, %s, 'connecting')", (name, token),
                )
            print(f"pgqr demo: simulator at {base_url}; {len(INSTANCES) + 1} instances inserted as 'connecting'.")
            public_url = f"http://127.0.0.1:{service.http_port}"  # the demo's PGQR_PUBLIC_URL
            cur = await conn.execute("SELECT key, name FROM pgqr.app_instances ORDER BY name")
            pages = "live QR pages (open one in a browser; `pgqr link NAME` makes these):\n" + "\n".join(
                f"  {name}  {links.make_link(public_url, link_secret, str(key), LINK_TTL)}"
                for key, name in await cur.fetchall())
            print(f"pgqr demo: {pages}", flush=True)
            await _show(conn, stop, duration, scan_after, sim, pages)
    finally:
        stop.set()
        await runner
        await sim.stop()
    return 0


async def _show(conn: psycopg.AsyncConnection[tuple[object, ...]], stop: asyncio.Event,
                duration: float | None, scan_after: float, sim: Simulator, pages: str) -> None:
    started = time.monotonic()
    scanned = False
    last: list[tuple[object, ...]] = []
    tty = sys.stdout.isatty()
    while not stop.is_set():
        elapsed = time.monotonic() - started
        if duration is not None and elapsed >= duration:
            return
        if not scanned and elapsed >= scan_after:
            sim.scan(INSTANCES[0])
            scanned = True
            print(f"pgqr demo: {INSTANCES[0]} was scanned on the phone", flush=True)
        cur = await conn.execute(TABLE_SQL)
        rows = await cur.fetchall()
        if tty:
            print("\x1b[H\x1b[2J" + f"pgqr demo ({elapsed:.0f}s; Ctrl-C stops and removes everything)\n"
                  + _render(rows) + "\n\n" + pages, flush=True)
        elif _without_ages(rows) != last:
            # not a terminal (a log, a pipe): print the table only when something besides the ages changed
            print(f"[{elapsed:.0f}s]\n{_render(rows)}", flush=True)
        last = _without_ages(rows)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await stop.wait()


def _render(rows: list[tuple[object, ...]]) -> str:
    def cell(value: object, unit: str = "") -> str:
        return "-" if value is None else f"{value}{unit}"

    cells = [HEADER] + [
        (str(name), str(status), cell(None if number is None else f"#{number}"), cell(age, "s"), cell(valid, "s"),
         cell(source), cell(outcome), cell(error), str(failures))
        for name, status, number, age, valid, source, outcome, error, failures in rows
    ]
    return "\n".join(tables.render(cells))


def _without_ages(rows: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    """What counts as a change: everything but the ticking columns (a rotation changes the QR number)."""
    return [tuple(v for i, v in enumerate(row) if i not in TICKING) for row in rows]
