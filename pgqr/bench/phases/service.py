"""`pgqr run` under the service's load: the wake-up after an INSERT, a connection.update storm, then the webhook
phases (pgqr.bench.phases.webhooks) on the same process, and its peak RSS after all of them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import psycopg

from ..context import Bench
from ..database import CLEANUP_RECORDS, Db
from ..harness import PgqrProcess, SimProcess
from ..load import WEBHOOK_RATE, blast, state_bodies
from ..report import ms, pct
from . import webhooks

WAKE_INSERTS = 20
STORM_INSTANCES = 100
STORM_REPEATS = 30
HOOK_INSTANCES = 1000   # webhook targets: 500 a second spread over these
HOOK_PHASE = 5.0        # seconds since their sockets started


async def service_phases(bench: Bench, sim: SimProcess) -> None:
    """Wake-up, a connection.update storm, webhooks alone and during a large reconcile: `pgqr run`."""
    r = bench.report
    d = Db.create(bench.server, "bench_service")
    # every socket started a few seconds ago: its first QR is out and, with the bench simulator's hour-long QR
    # life, its next one is an hour away, so a poll in the colliding phase brings the image pgqr already has
    # (on random phases a few of 1,000 rotated mid-phase, and a poll rightly stored their new image)
    hooks = await sim.bulk(HOOK_INSTANCES, "hook", phase=HOOK_PHASE)
    wake = await sim.bulk(WAKE_INSERTS, "wake")
    await d.load(hooks)
    # a heartbeat an hour apart: the storm's WAL figure is then the storm's alone
    pgqr = await PgqrProcess.start(d.dsn, sim.base_url, bench.workdir, concurrency=bench.o.concurrency,
                                   PGQR_HEARTBEAT_SECONDS="3600")
    try:
        await d.execute("SELECT pgqr.tick()")
        await d.wait("SELECT count(*) = 0 FROM pgqr.schedule WHERE last_poll_at IS NULL OR "
                     "lease_owner IS NOT NULL", "the first poll of every webhook target", 120)
        # quiet from here: nothing due for an hour, so only what a phase does explains what it measures
        await d.execute("UPDATE pgqr.schedule SET due_at = now() + interval '1 hour' WHERE due_at IS NOT NULL")
        await wake_up(bench, d, sim, wake)
        # the new instances too: their polls must not write into the storm's WAL window
        await d.wait("SELECT count(*) = 0 FROM pgqr.schedule WHERE lease_owner IS NOT NULL",
                     "the wake-up instances' polls in flight", 60)
        await d.execute("UPDATE pgqr.schedule SET due_at = now() + interval '1 hour' WHERE due_at IS NOT NULL")
        await storm(bench, d, pgqr, list(hooks)[:STORM_INSTANCES])
        # first of the webhook phases: each instance has then had the images a real one would have (its
        # polls' and one webhook's), not the dozens of made-up ones the later phases send, more than the 16 its
        # QR history keeps, after which the simulator's old image would no longer be known as replaced
        await webhooks.colliding(bench, d, pgqr, list(hooks), sim.base_url)
        await webhooks.alone(bench, d, pgqr, sim, list(hooks))
        await webhooks.during_reconcile(bench, d, pgqr, sim, list(hooks))
        r.add("pgqr run", "peak RSS of `pgqr run` (all of the above)", f"{pgqr.peak_rss_mb():.0f} MiB",
              "<= 200 MB", pgqr.peak_rss_mb() * 1.048576 <= 200)
    finally:
        await pgqr.stop()
        d.drop()


async def wake_up(bench: Bench, d: Db, sim: SimProcess, tokens: dict[str, str]) -> None:
    to_call: dict[str, float] = {}
    to_qr: list[float] = []
    inserted: dict[str, float] = {}
    arrived: dict[str, float] = {}

    async def receive(listen: psycopg.AsyncConnection[Any]) -> None:
        async for note in listen.notifies():
            arrived.setdefault(json.loads(note.payload).get("key"), time.monotonic())

    async with await d.connect() as listen, await d.connect() as conn:
        await listen.execute("LISTEN pgqr_qr_updated")
        receiver = asyncio.create_task(receive(listen))
        for name, token in tokens.items():
            cur = await conn.execute(
                "INSERT INTO public.evolution_instances (instance_name, instance_token, instance_status) "
                "VALUES (%s, %s, 'connecting') RETURNING id::text", (name, token))
            row = await cur.fetchone()
            inserted[name] = time.monotonic()  # autocommit: committed when execute returned
            assert row is not None
            deadline = time.monotonic() + 30
            while row[0] not in arrived and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
            if row[0] in arrived:
                to_qr.append(arrived[row[0]] - inserted[name])
            await asyncio.sleep(0.2)
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
    stats = await sim.stats()
    for name in tokens:
        calls = stats[name]["recent_calls"]
        if calls:
            to_call[name] = min(calls) - inserted[name]
    calls_s = list(to_call.values())
    bench.report.raw["wake_up"] = {"to_first_call": calls_s, "to_qr": to_qr}
    bench.report.add("wake-up", f"INSERT -> first Evolution request, p50 / p99 ({len(calls_s)} inserts)",
                     f"{ms(pct(calls_s, 0.5))} / {ms(pct(calls_s, 0.99))}")
    bench.report.add("wake-up", "INSERT -> QR committed (NOTIFY received), p50 / p99",
                     f"{ms(pct(to_qr, 0.5))} / {ms(pct(to_qr, 0.99))}")


async def storm(bench: Bench, d: Db, pgqr: PgqrProcess, names: list[str]) -> None:
    first = await blast(pgqr.webhook_url, state_bodies(names, 1), WEBHOOK_RATE, lambda i, t: i >= len(names))
    await asyncio.sleep(0.5)
    await d.quiesce()
    before, start = await d.wal_lsn(), await d.wal_lsn_text()
    repeats = len(names) * STORM_REPEATS
    shots = await blast(pgqr.webhook_url, state_bodies(names, STORM_REPEATS), WEBHOOK_RATE,
                        lambda i, t: i >= repeats)
    await asyncio.sleep(0.5)
    wal, kinds = await d.wal_lsn() - before, d.wal_by_kind(start, await d.wal_lsn_text(), by="record")
    # what the storm wrote; not the cleanup a read does on a page earlier phases left dead rows on (a
    # prune, a visibility-map bit: PostgreSQL's, whoever reads the page)
    data = sum(v for k, v in kinds.items() if k.split("/")[0] in ("Heap", "Heap2", "Btree", "Hash", "Sequence")
               and k not in CLEANUP_RECORDS)
    ok = sum(s.status == 200 for s in shots)
    bench.report.raw["storm"] = {"first": [s.status for s in first], "wal_bytes": wal, "ok": ok, "kinds": kinds}
    others = ", ".join(f"{k} {v} B" for k, v in sorted(kinds.items()) if v) or "none"
    bench.report.add("webhooks", f"connection.update storm ({len(names)} x {STORM_REPEATS} repeats, {ok} "
                     "answered 200): WAL to tables and indexes per repeated event",
                     f"{data / repeats:.1f} B (all WAL in the window: {others})", "0", data == 0)
