"""Fixtures for the refresh flow: a migrated database beside a running Evolution simulator.

Registered as a plugin by tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Database, command_env

from pgqr import db
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


async def settled(service: Service) -> None:
    """Wait until nothing is due now, no lease is held and no call is in flight (judged from the database and
    /metrics' gauge source), so no poll explains what follows."""
    dsn = service.settings.dsn

    def quiet() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM pgqr.instance_state JOIN pgqr.schedule USING (key) "
                               "WHERE waiting AND (due_at <= now() OR lease_owner IS NOT NULL)").fetchone()
        return row == (0,) and not service.engine.in_flight

    await wait_until(quiet, 15, "the service to settle")
    await asyncio.sleep(0.2)
    await wait_until(quiet, 15, "the service to settle")


@asynccontextmanager
async def running_service(settings: Settings) -> AsyncIterator[Service]:
    """A Service in this event loop, listening; stopped (gracefully) on exit."""
    service = Service(settings)
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


@asynccontextmanager
async def notifications(dsn: str, channel: str) -> AsyncIterator[Callable[[float], Any]]:
    """LISTEN on channel; yields `collect(timeout)` returning the JSON payloads received so far."""
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    await conn.execute(f"LISTEN {channel}")

    async def collect(timeout: float = 0.5) -> list[dict[str, Any]]:
        return [json.loads(n.payload) async for n in conn.notifies(timeout=timeout)]

    try:
        yield collect
    finally:
        await conn.close()


async def start_pgqr(env: dict[str, str], output: Path, *args: str,
                     skew: str | None = None) -> asyncio.subprocess.Process:
    """The real command line (`pgqr *args`) as a child of this event loop, in a process group of its own; its output
    goes to a file, so a chatty child never blocks on a full pipe. `skew` (like "+20s"): its wall clock is that far
    off the database's (Debian's faketime; monotonic time stays true, so asyncio's timers do)."""
    wrapper = ["faketime", "-f", skew] if skew else []
    env = {**env, "FAKETIME_DONT_FAKE_MONOTONIC": "1"} if skew else env
    with output.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            *wrapper, sys.executable, "-m", "pgqr", *args, env=env, start_new_session=True,
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT)


def stop_group(proc: asyncio.subprocess.Process, sig: signal.Signals = signal.SIGTERM) -> None:
    """Signal a child started by start_pgqr and whatever it started (faketime runs pgqr as its own child)."""
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
