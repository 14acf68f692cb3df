"""`pgqr bench`'s live-page phase: webhook-to-page latency and the sidecar's memory per open stream.

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
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from . import links
from .page import read_events
from .simulator import SimConfig, Simulator

LINK_SECRET = secrets.token_urlsafe(24)
WEBHOOK_SECRET = secrets.token_urlsafe(16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


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
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bench(dsn: str, n_instances: int, rounds: int, n_streams: int) -> dict[str, Any]:
    sim = Simulator(SimConfig(qr_ttl=3600, connect_sleep=0.05, first_qr_delay=0.01))
    sim_url = await sim.start()
    port = free_port()
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
            rss_before, conns_before = rss_kib(child.pid), connections(dsn)
            extra = []
            for i in range(n_streams):
                name = names[i % len(names)]
                extra.append(await open_stream(http, links.make_link(public, LINK_SECRET, keys[name], 3600)))
            for s in extra:
                await s.until_new(None)
            await asyncio.sleep(1.0)
            rss_after, conns_after = rss_kib(child.pid), connections(dsn)
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
