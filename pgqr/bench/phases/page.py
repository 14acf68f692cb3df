"""The live-page phase: webhook-to-page latency and the sidecar's memory per open stream.

Real processes: a throwaway PostgreSQL 15 with pg_cron, `pgqr run` as a child process (webhooks and the live
page on), the Evolution simulator in this process posting its webhooks to the child, and server-sent event
streams read here with aiohttp, exactly as a browser's EventSource reads them.

- latency: from the moment the simulator rotates a QR (its webhook is then sent, received by pgqr, written
  through pgqr.record_results, NOTIFY pgqr_qr_updated, the hub reads the state once and pushes it) to the event
  carrying the new image parsed here; one rotation at a time, round-robin over the instances.
- memory: the child's RSS (VmRSS) before and after opening --streams more streams, divided by their number,
  and its database connections (pg_stat_activity) before and after.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import statistics
import sys
import time
from typing import Any

import aiohttp
import psycopg

from ... import devdb, links
from ...page import read_events
from ...simulator import SimConfig, Simulator
from ..context import Bench
from ..database import Db
from ..report import vm_rss_kib

LINK_SECRET = secrets.token_urlsafe(24)
WEBHOOK_SECRET = secrets.token_urlsafe(16)


class Stream:
    """One SSE stream; `states` gets every state event, with the time it was parsed."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.states: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event, data in read_events(self.response.content):
            if event == "state":
                self.states.put_nowait((time.perf_counter(), json.loads(data)))

    async def until_new(self, old: str | None, timeout: float = 10.0) -> tuple[float, dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while True:
                at, state = await self.states.get()
                if state["qr"] and state["qr"] != old:
                    return at, state

    def close(self) -> None:
        self.task.cancel()
        self.response.close()


async def open_stream(http: aiohttp.ClientSession, page_url: str) -> Stream:
    base, _, query = page_url.partition("?")
    response = await http.get(f"{base}/events?{query}")
    response.raise_for_status()
    return Stream(response)


def connections(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND application_name LIKE 'pgqr%'").fetchone()
    return int(row[0]) if row else 0


def pct(values: list[float], q: float) -> float:
    """The q-quantile at index round(q x (n - 1)): how this phase's figures have always been taken (report.pct,
    by nearest rank, can pick the next value up), so they stay comparable with earlier runs."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(dsn: str, n_instances: int, rounds: int, n_streams: int) -> dict[str, Any]:
    sim = Simulator(SimConfig(qr_ttl=3600, connect_sleep=0.05, first_qr_delay=0.01))
    sim_url = await sim.start()
    port = devdb.free_port()
    public = f"http://127.0.0.1:{port}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PGQR_", "EVOLUTION_", "DATABASE_URL"))},
           "DATABASE_URL": dsn, "EVOLUTION_API_URL": sim_url, "PGQR_HTTP_PORT": str(port),
           "PGQR_WEBHOOK_SECRET": WEBHOOK_SECRET, "PGQR_LINK_SECRET": LINK_SECRET}
    log = open(os.devnull, "wb")  # noqa: SIM115 - the child's whole life
    child = await asyncio.create_subprocess_exec(sys.executable, "-m", "pgqr", "run", "--log-level", "WARNING",
                                                 env=env, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL)
    sim.config.global_webhook_url = f"{public}/webhooks/evolution/{WEBHOOK_SECRET}"
    names = [f"bench-{i:03d}" for i in range(n_instances)]
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            for _ in range(200):
                try:
                    async with http.get(f"{public}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            with psycopg.connect(dsn, autocommit=True) as conn:
                for name in names:
                    token = sim.add_instance(name, state="close")
                    conn.execute("INSERT INTO public.evolution_instances (instance_name, instance_token, "
                                 "instance_status) VALUES (%s, %s, 'connecting')", (name, token))
                keys: dict[str, str] = dict(conn.execute("SELECT name, key FROM pgqr.app_instances").fetchall())
                while conn.execute("SELECT count(*) FROM pgqr.app_instances WHERE qr IS NULL").fetchone() != (0,):
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # the first polls' write-backs and webhooks settle
            streams = {n: await open_stream(http, links.make_link(public, LINK_SECRET, keys[n], 3600)) for n in names}
            current = {n: (await s.until_new(None))[1]["qr"] for n, s in streams.items()}

            latencies = []
            for i in range(rounds):
                name = names[i % len(names)]
                started = time.perf_counter()
                sim.rotate(name)
                at, state = await streams[name].until_new(current[name])
                current[name] = state["qr"]
                latencies.append((at - started) * 1000)
                await asyncio.sleep(0.01)

            # memory: many viewers on every instance, as when a link is shared around
            assert child.pid is not None
            await asyncio.sleep(1.0)
            rss_before, conns_before = vm_rss_kib(child.pid), connections(dsn)
            extra = []
            for i in range(n_streams):
                name = names[i % len(names)]
                extra.append(await open_stream(http, links.make_link(public, LINK_SECRET, keys[name], 3600)))
            for s in extra:
                await s.until_new(None)
            await asyncio.sleep(1.0)
            rss_after, conns_after = vm_rss_kib(child.pid), connections(dsn)
            for s in (*streams.values(), *extra):
                s.close()
    finally:
        child.terminate()
        await child.wait()
        await sim.stop()
    return {
        "instances": n_instances, "rotations": rounds,
        "latency_ms_p50": round(statistics.median(latencies), 1), "latency_ms_p99": round(pct(latencies, 0.99), 1),
        "latency_ms_max": round(max(latencies), 1),
        "streams": n_streams,
        "rss_mib_before": round(rss_before / 1024, 1), "rss_mib_after": round(rss_after / 1024, 1),
        "kib_per_stream": round((rss_after - rss_before) / n_streams, 1),
        "db_connections_before": conns_before, "db_connections_after": conns_after,
    }


async def live_page(bench: Bench) -> None:
    """A webhook's QR on an open live page, and what 1,000 more open pages cost the sidecar."""
    d = Db.create(bench.server, "bench_page")
    try:
        got = await measure(d.dsn, 20, 100 if bench.o.quick else 400, 200 if bench.o.quick else 1000)
    finally:
        d.drop()
    r = bench.report
    r.raw["live page"] = got
    r.add("live page", f"webhook QR -> new image in the page's stream, p50 / p99 ({got['rotations']} rotations)",
          f"{got['latency_ms_p50']} ms / {got['latency_ms_p99']} ms", "p99 <= 250 ms",
          got["latency_ms_p99"] <= 250)
    r.add("live page", f"sidecar memory per open stream ({got['streams']:,} more streams)",
          f"{got['kib_per_stream']} KiB")
    r.add("live page", "sidecar database connections before / after those streams",
          f"{got['db_connections_before']} / {got['db_connections_after']}", "unchanged",
          got["db_connections_before"] == got["db_connections_after"])
