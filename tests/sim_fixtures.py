"""Fixtures for the Evolution API simulator and client: real HTTP on loopback, no mocks.

Registered as a plugin by tests/conftest.py (`pytest_plugins = ["sim_fixtures"]`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import pytest
from aiohttp import web

from pgqr.evolution import EvolutionClient
from pgqr.simulator import SimConfig, Simulator

T = TypeVar("T")


def fast_sim_config() -> SimConfig:
    """Evolution's timings shrunk for tests; QRs rotate only when a test calls rotate()."""
    return SimConfig(qr_ttl=3600, connect_sleep=0.05, first_qr_delay=0.01)


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    sim = Simulator(fast_sim_config())
    await sim.start("127.0.0.1", 0)
    try:
        yield sim
    finally:
        await sim.stop()


@pytest.fixture
async def evolution_client() -> AsyncIterator[EvolutionClient]:
    async with EvolutionClient(timeout=2) as client:
        yield client


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Serve a small aiohttp app on a free loopback port; yields its base URL."""
    runner = web.AppRunner(app, shutdown_timeout=0.2, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def eventually(check: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float = 10.0) -> T:
    """Call `check` until `ok` holds for its result (generous deadline, no wall-clock assertion)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if ok(value) or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(0.02)


def hanging_evolution(entered: asyncio.Event, release: asyncio.Event) -> web.Application:
    """An Evolution whose connect says it was called (`entered`), then answers a QR only once `release` is set:
    a call kept in flight for as long as a test needs."""
    async def connect(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.json_response({"code": "2@x", "base64": "data:image/png;base64,LATE", "count": 1})

    app = web.Application()
    app.router.add_get("/instance/connect/{name}", connect)
    return app
