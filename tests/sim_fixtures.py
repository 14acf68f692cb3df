"""Fixtures for the Evolution API simulator and client: real HTTP on loopback, no mocks.

Registered as a plugin by tests/conftest.py (`pytest_plugins = ["sim_fixtures"]`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from pgqr.evolution import EvolutionClient
from pgqr.simulator import SimConfig, Simulator


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
