"""The share of time the stored QR is the one Evolution would accept, polling only and with webhooks, and with
`pgqr run`'s clock skewed (the figure must not move: pgqr dates everything by the database's clock); what that
costs the database, against the once-a-minute Edge Function."""

from __future__ import annotations

import asyncio
import secrets
import time

from ... import devdb
from ..baseline import edge_function_minute
from ..context import Bench
from ..database import Db, cost_point
from ..harness import PgqrProcess, SimProcess, clock_probe


async def check_skew(bench: Bench, section: str, pgqr: PgqrProcess, skew: int) -> None:
    """That the skewed child's clock is off by `skew` (its replies' Date headers), and that asyncio's timers
    keep true time under libfaketime (a probe under the same setting): else the row would measure nothing."""
    offset = await pgqr.clock_offset()
    probe = await clock_probe(skew)
    bench.report.raw[section + " clock"] = {"date_header_offset": offset, **probe}
    bench.report.add(section, "sidecar clock - PostgreSQL's (its HTTP Date / a probe under faketime); "
                     "asyncio.sleep(0.5) there", f"{offset:+.0f} s / {probe['offset']:+.1f} s; "
                     f"{probe['sleep_by_loop']:.2f} s", f"{skew:+d} s; 0.50 s",
                     abs(offset - skew) <= 1.5 and abs(probe["offset"] - skew) <= 0.5
                     and abs(probe["sleep_by_loop"] - 0.5) <= 0.1)


async def freshness(bench: Bench, mode: str, skew: int = 0) -> None:
    """The share of time the stored QR is the one Evolution would accept. skew: `pgqr run`'s wall clock
    that many seconds off (PostgreSQL's and the simulator's stay true): pgqr dates every poll by its claim's
    database time, so the figure must not move."""
    r, o = bench.report, bench.o
    hooked = mode == "with webhooks"
    section = f"freshness, {mode}" + (f", sidecar clock {skew:+d} s" if skew else "")
    dbname = "bench_fresh_" + ("hooks" if hooked else "poll") + {0: "", 1: "_ahead", -1: "_behind"}[
        (skew > 0) - (skew < 0)]
    d = Db.create(bench.server, dbname, cron=True)
    port = devdb.free_port()
    # the simulator needs the service's webhook URL and the service the simulator's: fix both ports first
    sim_port = devdb.free_port()
    pgqr_secret = secrets.token_urlsafe(16)
    hook_url = f"http://127.0.0.1:{port}/webhooks/evolution/{pgqr_secret}" if hooked else None
    sim = await SimProcess.start(qr_ttl=45, latency=o.latency, port=sim_port, webhook_url=hook_url)
    pgqr: PgqrProcess | None = None
    try:
        n = o.freshness_instances
        tokens = await sim.bulk(n, "fresh")
        await d.load(tokens)
        pgqr = await PgqrProcess.start(d.dsn, sim.base_url, bench.workdir, port=port,
                                       secret=pgqr_secret,
                                       concurrency=o.concurrency, clock_skew=skew)
        if skew:
            await check_skew(bench, section, pgqr, skew)
        await d.wait("SELECT count(*) = 0 FROM pgqr.instance_state WHERE waiting AND qr_md5 IS NULL",
                     "every instance's first QR", 120)
        await asyncio.sleep(45)  # one QR lifetime: the schedule has seen every instance rotate once
        calls_before = sum(s["connect_calls"] for s in (await sim.stats()).values())
        cost_from = await cost_point(d)
        started = time.monotonic()
        fresh = total = 0
        async with await d.connect() as conn:
            while time.monotonic() - started < o.freshness_seconds:
                tick = time.monotonic()
                current = await sim.current()
                cur = await conn.execute("SELECT name, qr_md5 FROM pgqr.instance_state WHERE waiting")
                stored = dict(await cur.fetchall())
                for name, now in current.items():
                    if now["state"] == "connecting" and now["md5"]:
                        total += 1
                        fresh += stored.get(name) == now["md5"]
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        minutes = (time.monotonic() - started) / 60
        cost_to = await cost_point(d)
        calls = sum(s["connect_calls"] for s in (await sim.stats()).values()) - calls_before
        share = fresh / total if total else float("nan")
        target = 0.99 if hooked else 0.95
        r.raw[section] = {"fresh": fresh, "samples": total, "calls": calls, "minutes": minutes, "instances": n,
                          "clock_skew": skew}
        measure = (f"stored QR = Evolution's current ({n:,} instances, 45 s rotation, {o.freshness_seconds:.0f} s "
                   "sampled each second)")
        if not skew:
            bench.fresh_share[mode] = share
            r.add(section, measure, f"{share:.1%}", f">= {target:.0%}", share >= target)
        else:  # within one point of the same phase without skew (a point below it at most), and the target
            floor = bench.fresh_share.get(mode, target) - 0.01
            r.add(section, measure, f"{share:.1%}", f">= {target:.0%} and >= {floor:.1%}",
                  share >= target and share >= floor)
        r.add(section, "Evolution calls per instance per minute", f"{calls / n / minutes:.2f}")
        if not skew:
            day = 1000 / n * 1440 / minutes  # this window, scaled to 1,000 waiting instances and a day
            cost = {k: (cost_to[k] - cost_from[k]) * day for k in cost_to}
            r.raw[section + " cost"] = {"window": {k: cost_to[k] - cost_from[k] for k in cost_to},
                                        "per_1000_day": cost}
            r.add(section, "database cost per 1,000 waiting instances a day: WAL / refresh_log rows / "
                  "refresh_counts rows / disk growth",
                  f"{cost['wal'] / 1e9:.2f} GB / {cost['log_rows']:,.0f} / {cost['count_rows']:,.0f} / "
                  f"{cost['bytes'] / 1e6:,.0f} MB")
            if not hooked:
                await pgqr.stop()
                pgqr = None
                wal = await edge_function_minute(d, list(tokens))
                r.raw[section + " edge function"] = {"wal_per_instance_minute": wal}
                r.add(section, "the once-a-minute Edge Function, measured the same way: WAL per 1,000 "
                      "waiting instances a day (it rewrites each row's 13 KB QR every minute, no log)",
                      f"{wal * 1000 * 1440 / 1e9:.2f} GB")
    finally:
        if pgqr is not None:
            await pgqr.stop()
        await sim.stop()
        d.drop()
