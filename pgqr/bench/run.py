"""The bench's run: its phases in order, then the table it prints (and the JSON it may write)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path

from .. import devdb
from .context import Bench
from .harness import SimProcess
from .options import FULL_ONLY, Options
from .phases import crash, freshness, page, reconcile, replicas, scale, service, sweep
from .report import Report

# The full bench's own phases (each minutes long), run last and each on its own
FAIL_SOFT: dict[str, Callable[[Bench], Awaitable[None]]] = {
    "scale": scale.scale, "replicas": replicas.replicas, "crash": crash.crash}


async def run(bench: Bench) -> Report:
    """Every phase the run wants, in PHASES' order; the report with their figures."""
    if bench.o.quick and not bench.o.phases:
        bench.report.machine["skipped"] = list(FULL_ONLY)
        print(f"pgqr bench --quick: skipping the phases {', '.join(FULL_ONLY)} (the skewed-clock freshness, "
              "100,000 rows, replicas and the immediate stop: the full bench runs them); freshness sampled "
              f"{bench.o.freshness_seconds:.0f} s", file=sys.stderr, flush=True)
    if bench.wants("reconcile") or bench.wants("service"):
        sim = await SimProcess.start(qr_ttl=3600, latency=bench.o.latency)
        try:
            for n in bench.o.instances if bench.wants("reconcile") else ():
                await reconcile.reconcile(bench, sim, n)
            if bench.wants("service"):
                await service.service_phases(bench, sim)
        finally:
            await sim.stop()
    if bench.wants("page"):
        await page.live_page(bench)
    if bench.wants("sweep"):
        await sweep.sweep(bench)
    if bench.wants("freshness"):
        await freshness.freshness(bench, "polling only")
    for skew in (20, -20) if bench.wants("skew") else ():  # the same phase with the clock ahead, then behind
        await freshness.freshness(bench, "polling only", skew)
    if bench.wants("freshness"):
        await freshness.freshness(bench, "with webhooks")
    for phase, measure in FAIL_SOFT.items():
        if bench.wants(phase):
            try:
                await measure(bench)
            except Exception as exc:  # one phase's failure must not cost the run's other figures
                bench.report.add(phase, "the phase failed", f"{type(exc).__name__}: {exc}"[:300], "", False)
    bench.report.machine["load_at_end"] = os.getloadavg()
    return bench.report


def main(options: Options, json_path: str | None = None) -> int:
    """On a throwaway PostgreSQL: the run, then its table on stdout (and every figure and sample in json_path)."""
    with devdb.running(cron_database="postgres") as server, tempfile.TemporaryDirectory(prefix="pgqr-bench-") as w:
        started = time.monotonic()
        print(f"pgqr bench: PostgreSQL in {server.base}, {options}", file=sys.stderr, flush=True)
        report = asyncio.run(run(Bench(options, server, Path(w))))
        report.machine["minutes"] = round((time.monotonic() - started) / 60, 1)
    m = report.machine
    print(f"pgqr bench on {m['nproc']} x {m['cpu']}; load average at start {m['load_at_start'][0]:.2f}, at end "
          f"{m['load_at_end'][0]:.2f} (a shared machine: figures taken under load are pessimistic); "
          f"{m['minutes']} minutes" + (f"; skipped: {', '.join(m['skipped'])} (--quick)" if m.get("skipped") else ""))
    print(report.table())
    if json_path:
        doc = {"machine": m, "options": asdict(options), "figures": [asdict(f) for f in report.figures],
               "raw": report.raw}
        Path(json_path).write_text(json.dumps(doc, indent=2, default=str))
    return 0
