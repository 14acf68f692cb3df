"""Every SQL statement the service runs. The logic behind them lives in sql/ (pgqr.claim, pgqr.record_results)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg.rows import class_row

AsyncConn = psycopg.AsyncConnection[Any]

Source = Literal["poll", "webhook"]
OutcomeName = Literal["qr", "no_qr", "connected", "failed", "event"]


@dataclass(frozen=True)
class Claimed:
    """An instance leased to us for one refresh. The token is for the apikey header only."""

    instance_id: str
    instance_name: str
    user_id: str | None
    instance_token: str | None = field(repr=False)
    evolution_url: str | None
    qr_md5: str | None
    claimed_at: datetime


@dataclass(frozen=True)
class Result:
    """One refresh attempt or webhook event, as pgqr.record_results() takes it. Never holds a token."""

    instance_name: str
    source: Source
    outcome: OutcomeName
    qr: str | None = field(default=None, repr=False)  # the data URL; None when unchanged or absent
    pairing_code: str | None = None
    qr_count: int | None = None
    http_status: int | None = None
    latency_ms: float | None = None
    error_class: str | None = None
    transient: bool | None = None
    claimed_at: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["claimed_at"] = self.claimed_at.isoformat() if self.claimed_at else None
        return doc


def storable(*values: str | None) -> bool:
    """Whether PostgreSQL text can hold these strings: no NUL, no lone surrogate (JSON can carry both, and
    one such string would fail the whole batched write-back)."""
    for value in values:
        if value is None:
            continue
        if "\x00" in value:
            return False
        try:
            value.encode()
        except UnicodeEncodeError:
            return False
    return True


@dataclass(frozen=True)
class Recorded:
    instance_name: str
    applied: bool
    qr_updated: bool
    status: str | None


async def claim(conn: AsyncConn, owner: str, limit: int, attempted_before: datetime) -> list[Claimed]:
    """Lease due instances in one short autocommit statement; HTTP happens after it has committed."""
    async with conn.cursor(row_factory=class_row(Claimed)) as cur:
        await cur.execute("SELECT * FROM pgqr.claim(%s, %s, %s)", (owner, limit, attempted_before))
        return await cur.fetchall()


async def record_results(conn: AsyncConn, owner: str, results: list[Result]) -> list[Recorded]:
    """The one write path: all results in one round trip."""
    if not results:
        return []
    payload = json.dumps([r.as_json() for r in results])
    async with conn.cursor(row_factory=class_row(Recorded)) as cur:
        await cur.execute("SELECT * FROM pgqr.record_results(%s, %s::jsonb)", (owner, payload))
        return await cur.fetchall()


@dataclass(frozen=True)
class ClaimPlan:
    """What one reconcile claims with: its refresh horizon and the claim_batch/lease_seconds settings."""

    horizon: datetime
    claim_batch: int
    lease_seconds: float


async def claim_plan(conn: AsyncConn) -> ClaimPlan:
    async with conn.cursor(row_factory=class_row(ClaimPlan)) as cur:
        await cur.execute(
            "SELECT pgqr.refresh_horizon() AS horizon, pgqr.setting('claim_batch')::integer AS claim_batch,"
            " pgqr.setting('lease_seconds')::float8 AS lease_seconds")
        plan = await cur.fetchone()
    assert plan is not None
    return plan


async def tick_seconds(conn: AsyncConn) -> float:
    """The tick period `pgqr schedule` set, in seconds."""
    cur = await conn.execute("SELECT extract(epoch FROM pgqr.setting('tick_every')::interval)::float8")
    row = await cur.fetchone()
    return float(row[0]) if row and row[0] else 60.0


async def heartbeat(conn: AsyncConn, owner: str, host: str, pid: int, version: str) -> None:
    await conn.execute("SELECT pgqr.heartbeat(%s, %s, %s, %s)", (owner, host, pid, version))


async def release_leases(conn: AsyncConn, owner: str) -> int:
    cur = await conn.execute("SELECT pgqr.release_leases(%s)", (owner,))
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def listener_stopped(conn: AsyncConn, owner: str) -> None:
    await conn.execute("SELECT pgqr.listener_stopped(%s)", (owner,))


async def notify(conn: AsyncConn, channel: str, payload: str) -> None:
    await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


# -- alert deliveries (pgqr.alert_deliveries, sql/0005) ------------------------------------------------

DeliveryOutcome = Literal["delivered", "failed", "released"]


@dataclass(frozen=True)
class Delivery:
    """One claimed transition, as pgqr.claim_alert_deliveries() returns it."""

    id: int
    rule: str
    state: str
    attempts: int
    payload: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.rule}/{self.state}"


async def claim_alert_deliveries(conn: AsyncConn, owner: str, limit: int) -> list[Delivery]:
    async with conn.cursor(row_factory=class_row(Delivery)) as cur:
        await cur.execute("SELECT * FROM pgqr.claim_alert_deliveries(%s, %s)", (owner, limit))
        return await cur.fetchall()


async def finish_alert_delivery(conn: AsyncConn, delivery_id: int, owner: str, outcome: DeliveryOutcome,
                 error: str | None = None) -> bool:
    cur = await conn.execute("SELECT pgqr.finish_alert_delivery(%s, %s, %s, %s)",
                             (delivery_id, owner, outcome, error))
    row = await cur.fetchone()
    return bool(row and row[0])


async def next_alert_delivery_in(conn: AsyncConn) -> float | None:
    cur = await conn.execute("SELECT pgqr.next_alert_delivery_in()")
    row = await cur.fetchone()
    return None if row is None or row[0] is None else float(row[0])
