"""Benchmark: one reconcile over many connecting instances against the simulator on loopback.

    make bench            (or: .venv/bin/python bench/refresh.py --instances 2000 --latency 0.05)

Prints wall time, instances per second, the write-back's share, and peak memory. Figures, not assertions:
speed targets live here, not in timed tests.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time

import psycopg

from pgqr import devdb, migrations
from pgqr.config import Settings
from pgqr.evolution import EvolutionClient
from pgqr.reconcile import Reconciler
from pgqr.simulator import SimConfig, Simulator


async def bench(dsn: str, instances: int, latency: float, concurrency: int) -> None:
    sim = Simulator(SimConfig(qr_ttl=3600, connect_sleep=0.0, first_qr_delay=0.0, latency=latency))
    base = await sim.start()
    names = [f"bench-{i:05d}" for i in range(instances)]
    rows = [(n, sim.add_instance(n, state="connecting")) for n in names]
    await asyncio.sleep(0.2)  # let every simulated socket emit its first QR
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO public.evolution_instances (instance_name, instance_token) VALUES (%s, %s)", rows)
        await conn.execute("UPDATE pgqr.settings SET value = '0' WHERE key = 'min_refresh_seconds'")
        settings = Settings(database_url=dsn, evolution_api_url=base, concurrency=concurrency)
        for label in ("first (new QR for every instance)", "second (QR unchanged: no image rewrite)"):
            async with EvolutionClient(concurrency=concurrency) as client:
                started = time.perf_counter()
                summary = await Reconciler(settings, client, "bench").run(conn)
                wall = time.perf_counter() - started
            ok = len(summary.results) - summary.failed
            print(f"{label}: {len(summary.results)} instances, {ok} ok, {wall:.2f} s, "
                  f"{len(summary.results) / wall:.0f} instances/s")
        cur2 = await conn.execute("SELECT pg_size_pretty(pg_total_relation_size('public.evolution_instances')), "
                                  "pg_size_pretty(pg_total_relation_size('pgqr.refresh_log'))")
        sizes = await cur2.fetchone()
        print(f"table sizes: evolution_instances {sizes[0]}, refresh_log {sizes[1]}" if sizes else "")
    await sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.05, help="simulated Evolution latency per call (s)")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    print(f"pgqr bench: {args.instances} instances, {args.latency * 1000:.0f} ms simulated latency, "
          f"concurrency {args.concurrency}")
    with devdb.running() as server:
        dsn = server.dsn("postgres")
        migrations.migrate(dsn)
        asyncio.run(bench(dsn, args.instances, args.latency, args.concurrency))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of the benchmark process (simulator included): {peak_mb:.0f} MiB")


if __name__ == "__main__":
    main()
