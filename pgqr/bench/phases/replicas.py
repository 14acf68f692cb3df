"""One and three `pgqr run` replicas against one database, then three with one SIGKILLed halfway: calls a second,
one call in flight per instance at most, and a dead replica's leased instances taken over when its leases end.

It reads pgqr's scheduling state only through its views (pgqr.instance_health, pgqr.freshness,
pgqr.listeners), so it measures whatever table those columns live in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ...settings import Settings
from ..context import Bench
from ..database import Db
from ..harness import PgqrProcess, SimProcess

REPLICA_LATENCY = 1.0     # seconds per simulated Evolution call: the replicas' CPU is then not the limit
# calls in flight per replica: 150 calls a second for three, so that three replicas, the simulator and PostgreSQL
# fit this 2-core machine's CPU beside its other work (at 100 each, a loaded machine's CPU cut the ratio to 2.7)
REPLICA_CONCURRENCY = 50
REPLICA_INSTANCES = 1_500  # due at once: 30 s of first calls for one replica, 10 s for three
KILL_INSTANCES = 600       # the SIGKILL run: two survivors with slots to spare, as replicas are sized


async def set_status(d: Db, names: Sequence[str], status: str) -> None:
    """The app moves these rows to `status` (through its own table: pgqr's trigger follows)."""
    await d.execute("UPDATE public.evolution_instances SET instance_status = %s WHERE instance_name = ANY(%s)",
                    (status, list(names)))


def lease_seconds(setting: float) -> float:
    """The lease `pgqr run` takes with default settings: the lease_seconds setting, but at least one call's
    timeout twice and 5 s (engine.Engine._lease)."""
    timeout = next(f.default for f in dataclasses.fields(Settings) if f.name == "http_timeout")
    assert isinstance(timeout, float)
    return max(setting, timeout * 2 + 5)


@dataclass
class ReplicaRun:
    replicas: int
    names: list[str]
    served_after: float = 0.0  # seconds from the wake-up to every instance served
    killed: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # the simulator's, for this run's instances

    def first_calls(self) -> list[float]:
        return sorted(min(self.stats[n]["recent_calls"]) for n in self.names if self.stats[n]["recent_calls"])

    def calls_a_second(self) -> float:
        """Calls a second while instances wait for their first call: every call started from the first call's
        start to the last first call's start (retries of instances already served among them), over that span
        and one call's latency (whole rounds of calls, so no round is cut in two)."""
        starts = self.first_calls()
        if not starts:
            return float("nan")
        calls = sum(t <= starts[-1] for n in self.names for t in self.stats[n]["recent_calls"])
        return float(calls / (starts[-1] - starts[0] + REPLICA_LATENCY))

    def most_at_once(self) -> int:
        return max((max(s["max_concurrent_connects"], s["max_concurrent_calls"]) for s in self.stats.values()),
                   default=0)

    def never_called(self) -> int:
        return sum(not self.stats[n]["recent_calls"] for n in self.names)


async def served(d: Db, names: list[str], timeout: float) -> float:
    """Seconds until every one of `names` holds a QR (instance_health.has_qr), checked twice a second."""
    started = time.monotonic()
    while True:
        count = await d.value("SELECT count(*) FROM pgqr.instance_health WHERE instance_name = ANY(%s) AND has_qr",
                              (names,))
        if count == len(names):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"only {count} of {len(names)} instances served after {timeout:.0f} s")
        await asyncio.sleep(0.5)


async def replica_run(bench: Bench, d: Db, sim: SimProcess, count: int, *, kill: bool = False) -> ReplicaRun:
    """`count` replicas, then REPLICA_INSTANCES (KILL_INSTANCES with kill) new waiting instances, all due at once
    and woken by a tick; with kill, the last replica is SIGKILLed when half of them have been polled."""
    procs: list[PgqrProcess] = []
    try:
        for _ in range(count):
            procs.append(await PgqrProcess.start(d.dsn, sim.base_url, bench.workdir,
                                                 concurrency=REPLICA_CONCURRENCY))
        tokens = await sim.bulk(KILL_INSTANCES if kill else REPLICA_INSTANCES, f"rep{count}{'kill' if kill else ''}")
        run = ReplicaRun(count, list(tokens))
        await d.load(tokens)
        started = time.monotonic()
        await d.execute("SELECT pgqr.tick()")
        if kill:
            while sum([await p.refreshes() for p in procs]) < len(run.names) // 2:
                await asyncio.sleep(0.2)
            victim = procs[-1]
            # the owner is host:pid:random (service.owner_id); the leases it holds, read from the view
            async with await d.connect() as conn:
                rows = await (await conn.execute(
                    "SELECT instance_name, extract(epoch FROM lease_expires_at - now())::float8 "
                    "FROM pgqr.instance_health WHERE lease_owner LIKE %s", (f"%:{victim.pid}:%",))).fetchall()
            os.kill(victim.pid, signal.SIGKILL)
            run.killed = {"at": time.monotonic(), "held": [str(n) for n, _ in rows],
                          "lease_left": max((float(left) for _, left in rows), default=0.0)}
            await victim.proc.wait()
        run.served_after = await served(d, run.names, 120 + lease_seconds(30))
        everyone = await sim.stats()
        run.stats = {n: everyone[n] for n in run.names}
        run.killed["wake_up_at"] = started
        return run
    finally:
        for p in procs:
            await p.stop()


async def replicas(bench: Bench) -> None:
    """One and three `pgqr run` against one database, Evolution answering each call in 1 s; then three again
    with one SIGKILLed halfway. The simulator counts the calls each instance has in flight at once."""
    r, section = bench.report, "replicas"
    d = Db.create(bench.server, "bench_replicas")
    sim = await SimProcess.start(qr_ttl=45, latency=REPLICA_LATENCY)
    try:
        lease = lease_seconds(float(await d.value("SELECT pgqr.setting('lease_seconds')::float8")))
        runs: list[ReplicaRun] = []
        for count, kill in ((1, False), (3, False), (3, True)):
            runs.append(await replica_run(bench, d, sim, count, kill=kill))
            # the app moves them on: the next run's replicas poll only their own instances
            await set_status(d, runs[-1].names, "connected")
        one, three, killed = runs
        for run in runs:
            r.raw[f"{section} {run.replicas}{' one killed' if run.killed.get('held') is not None else ''}"] = {
                "calls_a_second": run.calls_a_second(), "served_after": run.served_after,
                "most_at_once": run.most_at_once(), "never_called": run.never_called(),
                "called_more_than_once": sum(s["connect_calls"] > 1 for s in run.stats.values()),
                "killed": {k: v for k, v in run.killed.items() if k != "held"} | {
                    "held": len(run.killed.get("held", []))}}
        n = len(one.names)
        ratio = three.calls_a_second() / one.calls_a_second()
        r.add(section, f"calls a second, one / three replicas ({n:,} instances due at once, Evolution 1 s a call, "
              f"{REPLICA_CONCURRENCY} calls in flight each; until the last first call)",
              f"{one.calls_a_second():.0f} / {three.calls_a_second():.0f}")
        r.add(section, "calls a second with three / with one", f"{ratio:.2f}", ">= 2.7", ratio >= 2.7)
        at_once = max(run.most_at_once() for run in runs)
        r.add(section, "most calls one instance had in flight at once (all runs, the simulator's count)",
              str(at_once), "1", at_once == 1)
        lost = sum(run.never_called() for run in runs)
        r.add(section, "every instance served (one, three, three with one killed: seconds to the last QR)",
              " / ".join(f"{run.served_after:.1f} s" for run in runs) + f"; {lost} never called", "all",
              lost == 0)  # served() raised otherwise
        held, at = killed.killed["held"], killed.killed["at"]
        taken = [min(c for c in killed.stats[name]["recent_calls"] if c > at) - at for name in held
                 if any(c > at for c in killed.stats[name]["recent_calls"])]
        worst = max(taken, default=float("nan"))
        r.raw[f"{section} takeover"] = {"held": len(held), "taken": taken, "lease": lease}
        left = killed.killed["lease_left"]
        r.add(section, f"one of three SIGKILLed halfway ({len(killed.names):,} instances): its {len(held)} leased "
              f"instances called again by another, the last ({len(taken)} of {len(held)} taken over; its leases "
              f"had at most {left:.1f} s left, of one lease: {lease:.0f} s)", f"{worst:.1f} s after the kill",
              "when its lease ends (+ 1 s)", len(taken) == len(held) and left <= lease and worst <= left + 1)
    finally:
        await sim.stop()
        d.drop()
