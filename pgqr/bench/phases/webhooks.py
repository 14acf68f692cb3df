"""Webhooks at 500 a second into `pgqr run`: alone, during a large reconcile, and each colliding with its
instance's poll as it falls due; latency to the commit, and none lost or refused."""

from __future__ import annotations

import asyncio
import time

from ...db import image_md5
from ..context import Bench
from ..database import Db, polls_counted
from ..harness import PgqrProcess, SimProcess
from ..load import WEBHOOK_RATE, Shot, blast, qr_bodies, qr_image
from ..report import ms, pct

IMAGES_ALONE, IMAGES_DURING, IMAGES_COLLIDING = 0, 10**8, 2 * 10**8  # each webhook phase's first image number
COLLISION_LEAD = 1.0    # seconds between making the polls due and the first of them falling due


async def _hook_rows(d: Db) -> int:
    return int(await d.value("SELECT count(*) FROM pgqr.refresh_log WHERE source = 'webhook'"))


def _hook_figures(bench: Bench, label: str, shots: list[Shot], logged: int) -> None:
    lat = [s.latency for s in shots]
    ok = sum(s.status == 200 for s in shots)
    p99 = pct(lat, 0.99)
    bench.report.raw[f"webhooks {label}"] = {"sent": len(shots), "ok": ok, "logged": logged,
                                             "p50": pct(lat, 0.5), "p99": p99, "max": max(lat, default=0)}
    bench.report.add("webhooks", f"{label}: received -> committed, p50 / p99 ({len(shots):,} at "
                     f"{WEBHOOK_RATE:.0f}/s)", f"{ms(pct(lat, 0.5))} / {ms(p99)}", "p99 <= 50 ms", p99 <= 0.05)
    bench.report.add("webhooks", f"{label}: lost (sent - answered 200 - logged)",
                     f"{len(shots) - ok} not 200, {ok - logged} answered but not logged", "0",
                     len(shots) - ok == 0 and ok == logged)


async def alone(bench: Bench, d: Db, pgqr: PgqrProcess, sim: SimProcess, names: list[str]) -> None:
    seconds = 5.0 if bench.o.quick else 10.0
    before = await _hook_rows(d)
    shots = await blast(pgqr.webhook_url, qr_bodies(names, sim.base_url, IMAGES_ALONE), WEBHOOK_RATE,
                        lambda i, t: t >= seconds)
    await asyncio.sleep(0.5)
    _hook_figures(bench, "alone", shots, await _hook_rows(d) - before)


async def during_reconcile(bench: Bench, d: Db, pgqr: PgqrProcess, sim: SimProcess, names: list[str]) -> None:
    n = max(bench.o.instances)
    tokens = await sim.bulk(n, "big")
    await d.load(tokens)
    polls_before = await pgqr.refreshes()
    hooks_before = await _hook_rows(d)
    window: dict[str, float] = {}

    async def reconcile() -> None:
        await asyncio.sleep(1.0)
        window["start"] = time.perf_counter()
        await d.execute("SELECT pgqr.tick()")
        deadline = time.monotonic() + 600
        while await pgqr.refreshes() < polls_before + n and time.monotonic() < deadline:
            # a scrape is work for the process under measurement: four a second, not twenty (Prometheus
            # scrapes every 15 s); the wall is then known within a quarter of a second
            await asyncio.sleep(0.25)
        window["end"] = time.perf_counter()

    def stop(i: int, t: float) -> bool:
        return "end" in window

    shots, _ = await asyncio.gather(blast(pgqr.webhook_url, qr_bodies(names, sim.base_url, IMAGES_DURING),
                                          WEBHOOK_RATE, stop),
                                    reconcile())
    await asyncio.sleep(0.5)
    during = [s for s in shots if window["start"] <= s.sent_at <= window["end"]]
    _hook_figures(bench, f"during a {n:,}-instance reconcile", during,
                  await _hook_rows(d) - hooks_before - (len(shots) - len(during)))
    wall = window["end"] - window["start"]
    bench.report.add("webhooks", f"that reconcile's wall under webhooks (pgqr run; ideal "
                     f"{n * bench.o.latency / bench.o.concurrency:.0f} s)", f"{wall:.1f} s")


async def colliding(bench: Bench, d: Db, pgqr: PgqrProcess, names: list[str], sim_url: str) -> None:
    """Each instance's qrcode.updated webhook sent at the moment its poll falls due (500 a second, in the
    order they fall due), so the engine claims, calls and writes back the very rows the webhooks write.
    Evolution does not retry a refused webhook for ever: none may be refused, and every one must be applied.
    Each webhook brings an image new to pgqr; each poll one the instance already had (the simulator's, from
    the first poll), so the webhook's image must be the one stored at the end."""
    r, label = bench.report, "colliding with due polls"
    # quiet first: the reconcile's instances fall due again 45 s after their QR (pgqr's lifetime setting)
    await d.wait("SELECT count(*) = 0 FROM pgqr.schedule WHERE lease_owner IS NOT NULL",
                 "the polls in flight", 120)
    await d.execute("UPDATE pgqr.schedule SET due_at = now() + interval '1 hour' WHERE due_at IS NOT NULL")
    log_from = int(await d.value("SELECT coalesce(max(id), 0) FROM pgqr.refresh_log"))
    polls_from = await polls_counted(d)
    # names[i] falls due when the blast sends its webhook: first_due + i / rate. PostgreSQL runs on this
    # machine, so its clock and ours are the same clock.
    first_due = time.time() + COLLISION_LEAD
    await d.execute("UPDATE pgqr.schedule q SET due_at = to_timestamp(%s + (u.n - 1) / %s) "
                    "FROM pgqr.instance_state s, unnest(%s::text[]) WITH ORDINALITY AS u(name, n) "
                    "WHERE s.name = u.name AND q.key = s.key",
                    (first_due, WEBHOOK_RATE, names))
    await d.execute("SELECT pgqr.tick()")  # the wake-up: the engine then sleeps until the first due time
    await asyncio.sleep(max(0.0, first_due - time.time()))
    shots = await blast(pgqr.webhook_url, qr_bodies(names, sim_url, IMAGES_COLLIDING), WEBHOOK_RATE,
                        lambda i, t: i >= len(names))
    await d.wait("SELECT count(*) = 0 FROM pgqr.schedule WHERE lease_owner IS NOT NULL",
                 "the colliding polls", 60)
    await asyncio.sleep(0.5)

    refused = [s for s in shots if not 200 <= s.status < 300]
    recorded = sum(s.status == 200 and '"recorded": true' in s.reply for s in shots)
    async with await d.connect() as conn:
        cur = await conn.execute(
            "SELECT count(*) FILTER (WHERE source = 'webhook' AND written AND qr_updated), "
            "       count(*) FILTER (WHERE source = 'poll' AND qr_updated) "
            "FROM pgqr.refresh_log WHERE id > %s", (log_from,))
        row = await cur.fetchone()
        assert row is not None
        new_qr, polls_new_qr = row
        # the log keeps news only: the polls are counted in refresh_counts
        polls = await polls_counted(d) - polls_from
        # a collision proper: the webhook written after its instance's poll was claimed
        cur = await conn.execute(
            "SELECT count(*) FROM pgqr.refresh_log w JOIN pgqr.schedule q ON q.key = w.instance_key "
            "WHERE w.id > %s AND w.source = 'webhook' AND w.at >= q.last_poll_at", (log_from,))
        row = await cur.fetchone()
        in_flight = row[0] if row else 0
        cur = await conn.execute("SELECT name, qr_md5 FROM pgqr.instance_state WHERE name = ANY(%s)", (names,))
        stored = dict(await cur.fetchall())
    kept = sum(stored.get(name) == image_md5(qr_image(IMAGES_COLLIDING + i)) for i, name in enumerate(names))
    lat = [s.latency for s in shots]
    why = sorted({f"{s.status} {s.reply}" for s in refused})
    r.raw[f"webhooks {label}"] = {"sent": len(shots), "refused": len(refused), "refusals": why,
                                  "recorded": recorded, "new_qr_logged": new_qr, "stored_webhook_image": kept,
                                  "polls": polls, "polls_new_qr": polls_new_qr, "in_flight": in_flight,
                                  "p50": pct(lat, 0.5), "p99": pct(lat, 0.99)}
    r.add("webhooks", f"{label}: received -> committed, p50 / p99 ({len(shots):,} at {WEBHOOK_RATE:.0f}/s, "
          "each as its instance's poll fell due)", f"{ms(pct(lat, 0.5))} / {ms(pct(lat, 0.99))}",
          "p99 <= 50 ms", pct(lat, 0.99) <= 0.05)
    # a webhook written before the engine claims its instance moves that poll out to the safety cadence
    r.add("webhooks", f"{label}: polls made / webhooks written after their instance's poll was claimed",
          f"{polls:,} / {in_flight:,} of {len(shots):,}")
    r.add("webhooks", f"{label}: refused (answered other than 2xx)",
          f"{len(refused)}" + (f" ({'; '.join(why[:3])})" if why else ""), "0", not refused)
    r.add("webhooks", f"{label}: applied (answered recorded / new QR logged / its image stored at the end)",
          f"{recorded:,} / {new_qr:,} / {kept:,} of {len(shots):,}", "all",
          recorded == new_qr == kept == len(shots) == len(names))
