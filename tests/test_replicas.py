"""Two `pgqr run` replicas against one database: Evolution never sees one instance called by both at once, and
every instance is served. Real processes, the simulator in this process (it counts each instance's calls in
flight), Evolution answering each call in half a second so that calls overlap in time. Conditions are waited
for with generous deadlines: nothing here depends on how fast a loaded machine is."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from service_fixtures import Env, start_pgqr, stop_group, wait_until

INSTANCES = 30
ROUNDS = 3  # calls each instance gets while both replicas compete for it


async def both_listening(env: Env, procs: list[asyncio.subprocess.Process], logs: list[Path]) -> None:
    def live() -> bool:
        assert all(p.returncode is None for p in procs), [log.read_text()[-2000:] for log in logs]
        return env.db.value("SELECT count(*) FROM pgqr.listeners WHERE live") == 2

    await wait_until(live, 60, "both replicas' heartbeats")


def lease_owners(env: Env, seen: set[str]) -> set[str]:
    """The owners holding a lease right now (read from the health view), added to `seen`."""
    seen |= {str(r["lease_owner"]) for r in env.db.query(
        "SELECT DISTINCT lease_owner FROM pgqr.instance_health WHERE lease_owner IS NOT NULL")}
    return seen


def most_at_once(env: Env, names: list[str]) -> dict[str, int]:
    """Instances the simulator saw with more than one call in flight at once (connect and connectionState)."""
    stats = {n: env.sim.stats(n) for n in names}
    return {n: max(s.max_concurrent_connects, s.max_concurrent_calls) for n, s in stats.items()
            if max(s.max_concurrent_connects, s.max_concurrent_calls) > 1}


def served(env: Env, names: list[str]) -> bool:
    return env.db.value("SELECT count(*) FROM public.evolution_instances WHERE instance_name = ANY(%s) "
                        "AND qr_code IS NOT NULL", (names,)) == len(names)


@pytest.fixture
def competing(env: Env) -> list[str]:
    """Instances that fall due again and again: a QR lives 5 s by pgqr's estimate, the simulator's never rotates,
    so after the first poll each one is retried every few seconds, and both replicas keep claiming the same rows."""
    env.sim.config.latency = 0.5
    env.set("slow_connect_ms", "5000")  # a 0.5 s reply still counts as one answered from memory
    env.set("qr_lifetime_seconds", "5")
    return [f"twin-{i:02d}" for i in range(INSTANCES)]


async def test_two_replicas_never_call_one_instance_at_once_and_serve_every_instance(
        env: Env, competing: list[str], tmp_path: Path, children: list[asyncio.subprocess.Process]) -> None:
    logs = [tmp_path / "run-1.log", tmp_path / "run-2.log"]
    for log in logs:
        children.append(await start_pgqr(env.command_env(PGQR_CONCURRENCY="8"), log, "run"))
    await both_listening(env, children, logs)
    for name in competing:  # each INSERT wakes both (the trigger's NOTIFY)
        env.add(name, sim_state="connecting")

    owners: set[str] = set()

    def done() -> bool:
        assert all(p.returncode is None for p in children), [log.read_text()[-2000:] for log in logs]
        lease_owners(env, owners)
        return served(env, competing) and len(owners) == 2 and all(
            env.sim.stats(n).connect_calls >= ROUNDS for n in competing)

    await wait_until(done, 180, f"every instance served and called {ROUNDS} times, with both replicas claiming")
    assert most_at_once(env, competing) == {}
    assert served(env, competing)


async def test_a_sigkilled_replicas_instances_are_served_by_the_other_never_two_calls_at_once(
        env: Env, competing: list[str], tmp_path: Path, children: list[asyncio.subprocess.Process]) -> None:
    # a short lease (the engine's floor is twice the call timeout and 5 s): the survivor takes over in seconds
    env.set("lease_seconds", "5")
    command = env.command_env(PGQR_CONCURRENCY="8", PGQR_HTTP_TIMEOUT="2")
    logs = [tmp_path / "victim.log", tmp_path / "survivor.log"]
    for log in logs:
        children.append(await start_pgqr(command, log, "run"))
    victim, survivor = children
    await both_listening(env, children, logs)
    for name in competing:
        env.add(name, sim_state="connecting")
    owners: set[str] = set()

    def victim_holds_leases() -> bool:
        return any(f":{victim.pid}:" in owner for owner in lease_owners(env, set()))

    await wait_until(victim_holds_leases, 120, "the victim to hold leases")
    held = [str(r["instance_name"]) for r in env.db.query(
        "SELECT instance_name FROM pgqr.instance_health WHERE lease_owner LIKE %s", (f"%:{victim.pid}:%",))]
    calls_before = {n: env.sim.stats(n).connect_calls for n in competing}
    stop_group(victim, signal.SIGKILL)
    assert await asyncio.wait_for(victim.wait(), 10) == -signal.SIGKILL

    def taken_over() -> bool:
        assert survivor.returncode is None, logs[1].read_text()[-2000:]
        lease_owners(env, owners)
        return served(env, competing) and all(env.sim.stats(n).connect_calls > calls_before[n] for n in competing)

    await wait_until(taken_over, 180, "every instance, the victim's leased ones too, called again and served")
    assert held, "the victim held no lease when it was killed"
    assert most_at_once(env, competing) == {}
    survivor_owner = {o for o in owners if f":{survivor.pid}:" in o}
    assert survivor_owner, owners
