"""Fixtures for the refresh flow: a migrated database beside a running Evolution simulator.

Registered as a plugin by tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import psycopg
import pytest
from conftest import Database, command_env

from pgqr import db
from pgqr.bench.harness import faketime_env
from pgqr.engine import Engine, Summary
from pgqr.evolution import EvolutionClient
from pgqr.service import Service
from pgqr.settings import Secret, Settings
from pgqr.simulator import Mode, Simulator, State


@dataclass
class Env:
    """A migrated database and a simulator; instances are added to both, as an app and Evolution would."""

    db: Database
    sim: Simulator

    def settings(self, **overrides: Any) -> Settings:
        base = Settings(database_url=Secret(self.db.dsn), evolution_api_url=Secret(self.sim.base_url),
                        http_timeout=2.0, heartbeat_seconds=0.5, concurrency=16)
        return replace(base, **overrides)

    def command_env(self, **values: str) -> dict[str, str]:
        """The environment for the real command line against this database and simulator."""
        return command_env(**{"DATABASE_URL": self.db.dsn, "EVOLUTION_API_URL": self.sim.base_url, **values})

    def add(self, name: str, *, sim_state: State | None = "close", mode: Mode = "normal",
            status: str = "connecting", token: str | None = None, triggers: bool = True,
            qr_code: str | None = None) -> str:
        """Create the instance in the simulator (unless sim_state is None) and the app's row; returns the
        token stored on the row. triggers=False inserts the way a bulk load would, with no NOTIFY (the next
        tick's sync picks it up; here, pgqr.sync_instances())."""
        if sim_state is not None:
            token = self.sim.add_instance(name, token, state=sim_state, mode=mode)
        with self.db.connect() as conn:
            if not triggers:
                conn.execute("SET session_replication_role = replica")
            conn.execute(
                "INSERT INTO public.evolution_instances (instance_name, instance_token, instance_status, qr_code, "
                "user_id) VALUES (%s, %s, %s, %s, gen_random_uuid())",
                (name, token or "token-of-" + name, status, qr_code),
            )
            if not triggers:
                conn.execute("SET session_replication_role = origin")
                conn.execute("SELECT pgqr.sync_instances()")
        return token or "token-of-" + name

    def row(self, name: str) -> dict[str, Any]:
        rows = self.db.query(
            "SELECT e.*, s.*, q.* FROM public.evolution_instances e "
            "JOIN pgqr.instance_state s ON s.key = e.id::text LEFT JOIN pgqr.schedule q ON q.key = s.key "
            "WHERE e.instance_name = %s", (name,))
        assert rows, f"no instance {name}"
        return rows[0]

    def has_qr(self, name: str) -> bool:
        """Whether the app's row holds a QR."""
        return self.db.value("SELECT qr_code IS NOT NULL FROM public.evolution_instances WHERE instance_name = %s",
                             (name,)) is True

    def log(self, name: str) -> list[dict[str, Any]]:
        return self.db.query("SELECT * FROM pgqr.refresh_log WHERE instance_name = %s ORDER BY id", (name,))

    def set(self, key: str, value: str) -> None:
        self.db.query("UPDATE pgqr.settings SET value = %s WHERE key = %s", (value, key))

    def make_due(self, *names: str) -> None:
        """Bring the next poll of these instances (all when none named) forward to now."""
        if names:
            self.db.query("UPDATE pgqr.schedule SET due_at = now(), recent_polls = '{}' WHERE key IN "
                          "(SELECT key FROM pgqr.instance_state WHERE waiting AND name = ANY(%s))", (list(names),))
        else:
            self.db.query("UPDATE pgqr.schedule SET due_at = now(), recent_polls = '{}' WHERE due_at IS NOT NULL")

    def tick(self) -> None:
        """What pg_cron runs every minute: sync and NOTIFY pgqr_refresh."""
        self.db.query("SELECT pgqr.tick()")

    async def reconcile(self, owner: str = "test-owner", **overrides: Any) -> Summary:
        """One pass over every due instance, exactly as `pgqr refresh --once` runs it."""
        settings = self.settings(**overrides)
        pool = db.Pool(self.db.dsn, size=3)
        await pool.open()
        try:
            async with EvolutionClient(timeout=settings.http_timeout) as client:
                engine = Engine(settings, pool, client, owner)
                try:
                    return await engine.run_once()
                finally:
                    await engine.close()
        finally:
            await pool.close()


@pytest.fixture
async def env(migrated: Database, simulator: Simulator) -> Env:
    env = Env(migrated, simulator)
    # the simulator's close branch sleeps 50 ms instead of Evolution's 2 s: a connect that slow went through it
    env.set("slow_connect_ms", "40")
    return env


@pytest.fixture
def no_cron_ticks(request: pytest.FixtureRequest) -> None:
    """Pause pg_cron's jobs for the test's database (use it with pytest.mark.usefixtures): a real minute tick
    must not explain a refresh."""
    if "env" in request.fixturenames:
        env: Env = request.getfixturevalue("env")
        env.db.pause_cron()


def metric(service: Service, name: str, **labels: str) -> float:
    """One sample of the service's /metrics (0 when it has not been counted yet)."""
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


async def wait_until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> float:
    """Poll until predicate() is truthy; returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


class ObservedWake(asyncio.Event):
    """The service's wake-up event, which only the engine waits on: `sleeping` counts the engine's waits on it,
    so the engine is asleep, every pass it was asked for run to its end, while it is waited on and not set."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeping = 0

    async def wait(self) -> Literal[True]:
        self.sleeping += 1
        try:
            return await super().wait()
        finally:
            self.sleeping -= 1


def engine_asleep(service: Service) -> bool:
    wake = service.wake
    assert isinstance(wake, ObservedWake), "settled() needs a service started by running_service()"
    return wake.sleeping > 0 and not wake.is_set()


async def settled(service: Service) -> None:
    """Wait until the engine is asleep with no wake-up pending (its start-up catch-up included), no call is in
    flight, and in the database every waiting row is scheduled, none is due now and no lease is held, so no poll
    explains what follows. One look suffices: it blocks the event loop, so the engine cannot move while it looks,
    and a claim or write-back in progress shows as a due row or a held lease until it commits."""
    dsn = service.settings.dsn

    def quiet() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM pgqr.instance_state s LEFT JOIN pgqr.schedule q USING (key) "
                               "WHERE s.waiting AND (q.key IS NULL OR q.due_at <= now() "
                               "OR q.lease_owner IS NOT NULL)").fetchone()
        return row == (0,) and not service.engine.in_flight and engine_asleep(service)

    await wait_until(quiet, 15, "the service to settle")


@asynccontextmanager
async def running_service(settings: Settings) -> AsyncIterator[Service]:
    """A Service in this event loop, listening; stopped (gracefully) on exit."""
    service = Service(settings)
    service.wake = ObservedWake()
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    await wait_until(lambda: service.listener.listening.is_set() or task.done(), 10, "the listener to LISTEN")
    if task.done():
        task.result()
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


MARKER_CHANNEL = "pgqr_test_marker"


@asynccontextmanager
async def notifications(dsn: str, channel: str) -> AsyncIterator[Callable[[], Awaitable[list[dict[str, Any]]]]]:
    """LISTEN on channel; yields `collect()`: the JSON payloads of every notification on it committed before the
    call and not collected yet. collect() NOTIFYs a marker and reads until it arrives: a session gets
    notifications in the order their transactions committed, so all of those came before it."""
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    await conn.execute(f"LISTEN {channel}")
    await conn.execute(f"LISTEN {MARKER_CHANNEL}")

    async def collect(timeout: float = 30.0) -> list[dict[str, Any]]:
        token = secrets.token_hex(8)
        await conn.execute("SELECT pg_notify(%s, %s)", (MARKER_CHANNEL, token))
        payloads: list[dict[str, Any]] = []
        async for n in conn.notifies(timeout=timeout):
            if n.channel == MARKER_CHANNEL and n.payload == token:
                return payloads
            if n.channel == channel:
                payloads.append(json.loads(n.payload))
        raise AssertionError(f"our own marker notification did not come back within {timeout}s")

    try:
        yield collect
    finally:
        await conn.close()


async def caught_up(db: Database, *services: Service) -> None:
    """Wait until each service's listener has handled every notification committed before the call: a NOTIFY
    pgqr_refresh sent now reaches it after them, and counts a wake-up in its /metrics."""
    before = [metric(s, "pgqr_wakeups_total", source="notify") for s in services]
    db.query("SELECT pg_notify('pgqr_refresh', '')")
    await wait_until(lambda: all(metric(s, "pgqr_wakeups_total", source="notify") > b
                                 for s, b in zip(services, before, strict=True)), 10,
                     "every listener to catch up on notifications")


async def start_pgqr(env: dict[str, str], output: Path, *args: str,
                     skew: str | None = None) -> asyncio.subprocess.Process:
    """The real command line (`pgqr *args`) as a child of this event loop, in a process group of its own; its output
    goes to a file, so a chatty child never blocks on a full pipe. `skew` (like "+20s"): its wall clock is that far
    off the database's (libfaketime, preloaded: pgqr.bench.harness.faketime_env)."""
    env = {**env, **faketime_env(skew)} if skew else env
    with output.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pgqr", *args, env=env, start_new_session=True,
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT)


def stop_group(proc: asyncio.subprocess.Process, sig: signal.Signals = signal.SIGTERM) -> None:
    """Signal a child started by start_pgqr and whatever it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@pytest.fixture
async def children() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Subprocesses a test started; killed, with their process groups, if the test left them running."""
    procs: list[asyncio.subprocess.Process] = []
    yield procs
    for proc in procs:
        stop_group(proc, signal.SIGKILL)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def log_records(path: Path) -> list[dict[str, Any]]:
    """A child's JSON log lines; a line that is not JSON (a traceback's) comes back as {"raw": line}."""
    records: list[dict[str, Any]] = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            records.append({"raw": line})
    return records
