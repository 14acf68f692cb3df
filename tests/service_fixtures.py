"""Fixtures for the refresh flow: a migrated database beside a running Evolution simulator.

Registered as a plugin by tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Database

from pgqr.config import Settings
from pgqr.evolution import EvolutionClient
from pgqr.listener import Service, WorkConnection
from pgqr.reconcile import Reconciler, Summary
from pgqr.simulator import Mode, Simulator, State


@dataclass
class Env:
    """A migrated database and a simulator; instances are added to both, as an app and Evolution would."""

    db: Database
    sim: Simulator

    def settings(self, **overrides: Any) -> Settings:
        base = Settings(database_url=self.db.dsn, evolution_api_url=self.sim.base_url, http_timeout=2.0,
                        heartbeat_seconds=0.5)
        return replace(base, **overrides)

    def add(self, name: str, *, sim_state: State | None = "close", mode: Mode = "normal",
            status: str = "connecting", token: str | None = None, triggers: bool = True,
            qr_code: str | None = None) -> str:
        """Create the instance in the simulator (unless sim_state is None) and the app's row; returns the
        token stored on the row. triggers=False inserts the way a bulk load would, with no NOTIFY."""
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
                conn.execute("INSERT INTO pgqr.instance_state (instance_name) VALUES (%s)", (name,))
        return token or "token-of-" + name

    def row(self, name: str) -> dict[str, Any]:
        rows = self.db.query(
            "SELECT e.*, s.* FROM public.evolution_instances e "
            "JOIN pgqr.instance_state s USING (instance_name) WHERE instance_name = %s", (name,))
        assert rows, f"no instance {name}"
        return rows[0]

    def log(self, name: str) -> list[dict[str, Any]]:
        return self.db.query("SELECT * FROM pgqr.refresh_log WHERE instance_name = %s ORDER BY id", (name,))

    def set(self, key: str, value: str) -> None:
        self.db.query("UPDATE pgqr.settings SET value = %s WHERE key = %s", (value, key))

    async def reconcile(self, owner: str = "test-owner", **overrides: Any) -> Summary:
        """One reconcile exactly as the listener runs it."""
        settings = self.settings(**overrides)
        work = WorkConnection(self.db.dsn)  # the listener's own connection settings (lock_timeout, ...)
        try:
            async with EvolutionClient(timeout=settings.http_timeout) as client:
                return await Reconciler(settings, client, owner).run(await work.get())
        finally:
            await work.close()


@pytest.fixture
async def env(migrated: Database, simulator: Simulator) -> Env:
    return Env(migrated, simulator)


async def wait_until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> float:
    """Poll until predicate() is truthy; returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def settled(service: Service) -> int:
    """Wait until the start-up and catch-up reconciles are over, so no poll explains what follows;
    returns the reconcile count."""
    await wait_until(lambda: service.reconciles >= 1 and not service.wake.is_set(), 10, "the start-up reconcile")
    while True:
        before = service.reconciles
        await asyncio.sleep(0.3)
        if service.reconciles == before and not service.wake.is_set():
            return before


@asynccontextmanager
async def running_service(settings: Settings) -> AsyncIterator[Service]:
    """A Service in this event loop, listening; stopped (gracefully) on exit."""
    service = Service(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    await wait_until(lambda: service.listening.is_set() or task.done(), 10, "the listener to LISTEN")
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


async def start_pgqr(env: dict[str, str], output: Path, *args: str) -> asyncio.subprocess.Process:
    """The real command line (`pgqr *args`) as a child of this event loop; its output goes to a file, so a
    chatty child never blocks on a full pipe."""
    with output.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pgqr", *args, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT)


@pytest.fixture
async def children() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Subprocesses a test started; killed if the test left them running."""
    procs: list[asyncio.subprocess.Process] = []
    yield procs
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
