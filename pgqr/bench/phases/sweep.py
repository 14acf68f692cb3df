"""What keeping Evolution's state of connected rows known costs: the sweep's Evolution calls a minute for 10,000
connected rows at the default sweep_seconds, with the global key (one fetchInstances per server a sweep) and with
instance tokens only (one connectionState per row a sweep). Counted by pgqr's own counter (pgqr_sweep_calls) over
one sweep after a first one has learnt every state: the steady cost, with nothing changing.
"""

from __future__ import annotations

import time

from ... import db
from ...evolution import EvolutionClient
from ...metrics import Metrics
from ...settings import Secret, Settings
from ...sweep import Sweep
from ..context import Bench
from ..database import Db
from ..harness import SimProcess

SWEEP_INSTANCES = 10_000
SIM_API_KEY = "pgqr-simulator-key"  # `pgqr simulate`'s default global key


async def sweep(bench: Bench) -> None:
    sim = await SimProcess.start(qr_ttl=3600, latency=0.002)
    d = Db.create(bench.server, "bench_sweep")
    try:
        await d.load(await sim.bulk(SWEEP_INSTANCES, "swept", state="open"), status="connected")
        period = float(await d.value("SELECT pgqr.setting('sweep_seconds')::float8"))
        for label, key in (("the global key", Secret(SIM_API_KEY)), ("instance tokens only", None)):
            settings = Settings(database_url=Secret(d.dsn), evolution_api_url=Secret(sim.base_url),
                                evolution_api_key=key)
            pool = db.Pool(d.dsn, size=2)
            await pool.open()
            try:
                async with EvolutionClient(timeout=10.0) as client:
                    swept = Sweep(settings, pool, client, "bench", Metrics())
                    await swept.sweep_once()  # learns every state
                    swept.metrics = Metrics()
                    started = time.monotonic()
                    await swept.sweep_once()  # the steady sweep, its reads not spread (spread, it takes `period`)
                    took = time.monotonic() - started
            finally:
                await pool.close()
            calls = swept.calls()
            total = sum(calls.values())
            bench.report.add("sweep", f"Evolution calls a minute, {SWEEP_INSTANCES:,} connected rows, {label}",
                             f"{total / (period / 60):,.1f} ({total:,.0f} a {period:.0f} s sweep: "
                             f"{calls['fetchInstances']:.0f} fetchInstances, {calls['connectionState']:,.0f} "
                             f"connectionState; {took:.1f} s unspread)")
            bench.report.raw[f"sweep {label}"] = {"calls": calls, "period": period, "seconds": took}
    finally:
        await sim.stop()
        d.drop()
