"""`pg_ctl stop -m immediate` and a start under a running `pgqr run`: how long until the QRs are valid again, and
until every waiting instance is polled again.

It reads pgqr's scheduling state only through its views (pgqr.instance_health, pgqr.freshness,
pgqr.listeners), so it measures whatever table those columns live in.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg

from ..context import Bench
from ..database import Db
from ..harness import PgqrProcess, SimProcess

CRASH_INSTANCES = 1_000


async def freshness_now(conn: psycopg.AsyncConnection[Any]) -> tuple[int, int]:
    row = await (await conn.execute("SELECT waiting, qr_valid FROM pgqr.freshness")).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def crash(bench: Bench) -> None:
    """`pg_ctl stop -m immediate` and a start under a running `pgqr run` (no pg_cron tick to help): how long
    until every waiting instance's QR is valid again by pgqr.freshness, and until each has been polled again.
    On Evolution's 45 s rotation some QRs are always a second or two past pgqr's expiry estimate, awaiting the
    poll due then (more while an instance's first QRs narrow the estimate): so the range before the crash is
    measured too, and the time until the count is back within it for good."""
    r, section = bench.report, "crash"
    n = 100 if bench.o.quick else CRASH_INSTANCES
    d = Db.create(bench.server, "bench_crash")
    sim = await SimProcess.start(qr_ttl=45, latency=bench.o.latency)
    pgqr: PgqrProcess | None = None
    try:
        tokens = await sim.bulk(n, "crash")
        await d.load(tokens)
        pgqr = await PgqrProcess.start(d.dsn, sim.base_url, bench.workdir, concurrency=bench.o.concurrency)
        await d.execute("SELECT pgqr.tick()")
        await d.wait("SELECT bool_and(has_qr) FROM pgqr.instance_health WHERE waiting", "every first QR", 120)
        await asyncio.sleep(45)  # one QR lifetime: every instance has seen a rotation, its estimate narrowed
        before: list[int] = []
        async with await d.connect() as conn:
            for _ in range(40):  # 10 s of the steady state: how many are valid at a moment
                before.append((await freshness_now(conn))[1])
                await asyncio.sleep(0.25)
        floor = min(before)
        stopped = time.monotonic()
        await asyncio.to_thread(bench.server.stop, "immediate")
        await asyncio.to_thread(bench.server.start)
        up = time.monotonic()
        restarted_at = await d.value("SELECT now()")
        samples: list[tuple[float, int, int]] = []
        all_valid = polled = None
        async with await d.connect() as conn:
            # until every instance is polled again, then 20 s more (for "all valid", which may not come at all)
            while time.monotonic() < up + 120 and not (polled and time.monotonic() > up + polled + 20):
                waiting, valid = await freshness_now(conn)
                samples.append((time.monotonic() - stopped, waiting, valid))
                if all_valid is None and waiting == valid == n:
                    all_valid = time.monotonic() - stopped
                if polled is None and await (await conn.execute(
                        "SELECT count(*) = %s FROM pgqr.instance_health WHERE waiting AND last_attempt_at >= %s",
                        (n, restarted_at))).fetchone() == (True,):
                    polled = time.monotonic() - up
                await asyncio.sleep(0.1)
        alive = pgqr.proc.returncode is None
        lowest = min((v for _, _, v in samples), default=0)
        below = [t for t, _, v in samples if v < floor]  # fewer valid than at any moment before the crash
        back = max(below, default=0.0)
        r.raw[section] = {"valid_before": before, "samples": samples, "restart_seconds": up - stopped,
                          "back_to_floor": back, "all_valid": all_valid, "all_polled": polled, "pgqr_alive": alive}

        def took(value: float | None) -> str:
            return "not within 120 s" if value is None else f"{value:.1f} s"

        r.add(section, f"pg_ctl stop -m immediate, then start ({n:,} waiting, Evolution's 45 s rotation): server "
              "down; pgqr run still running after", f"{up - stopped:.1f} s; {'yes' if alive else 'NO'}", "yes",
              alive)
        r.add(section, f"stop -> QRs valid (pgqr.freshness) back within the range before for good ({floor:,} to "
              f"{max(before):,} of {n:,} in the 10 s before; lowest after: {lowest:,}; the last sample below)",
              f"{back:.1f} s")
        r.add(section, "stop -> every waiting instance's QR valid (qr_valid = waiting)", took(all_valid))
        r.add(section, "start -> every waiting instance polled again (instance_health.last_attempt_at)", took(polled))
    finally:
        if pgqr is not None:
            await pgqr.stop()
        await sim.stop()
        d.drop()
