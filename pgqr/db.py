"""Every SQL statement the service runs, through one connection pool. The logic behind them lives in sql/
(pgqr.claim, pgqr.record_results, ...); this module knows the binding's canonical names, never the app's.

Work connections assume nothing survives between statements, so they are safe through a transaction-mode
pooler: autocommit, no server-side prepared statements, no session settings, no session advisory locks, no
LISTEN (that is listener.py's own connection).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool

AsyncConn = psycopg.AsyncConnection[Any]

Source = Literal["poll", "webhook"]
OutcomeName = Literal["qr", "no_qr", "connected", "closed", "gave_up", "failed", "event"]

# A half-open TCP connection (peer gone, no RST) must fail in about a minute, not the kernel's ~15: keepalives
# while idle, tcp_user_timeout while a statement's bytes wait for an acknowledgement.
CONNECT_OPTIONS: dict[str, Any] = {
    "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}


class Pool:
    """The work connections: claims, write-backs, webhooks, heartbeats and alerts each take their own, so a
    webhook never queues behind a write-back."""

    def __init__(self, dsn: str, *, size: int = 6, name: str = "pgqr") -> None:
        self._pool = AsyncConnectionPool(
            dsn, min_size=1, max_size=size, open=False, name=name, timeout=30.0,
            kwargs={"autocommit": True, "prepare_threshold": None, "application_name": name, **CONNECT_OPTIONS},
            configure=_ignore_notifications,
        )

    async def open(self) -> None:
        await self._pool.open(wait=False)

    async def close(self) -> None:
        await self._pool.close()

    def connection(self) -> Any:
        return self._pool.connection()

    async def rows(self, cls: type[Any], sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        async with self._pool.connection() as conn, conn.cursor(row_factory=class_row(cls)) as cur:
            await cur.execute(sql, params)
            return await cur.fetchall()

    async def value(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql, params)
            row = await cur.fetchone()
            return row[0] if row else None


async def _ignore_notifications(conn: AsyncConn) -> None:
    """Through a transaction pooler a work connection may be handed a server connection that another client
    LISTENed on; psycopg would keep every such notification in an unbounded backlog. Drop them instead."""
    conn.add_notify_handler(_drop)


def _drop(notify: psycopg.Notify) -> None:
    pass


@dataclass(frozen=True)
class Claimed:
    """An instance leased to us for one call. The token is for the apikey header only."""

    key: str
    name: str
    token: str | None = field(repr=False)
    url: str | None = field(repr=False)
    phone: str | None = field(repr=False)
    qr_md5: str | None
    claimed_at: datetime    # the database's clock: the call's start, as every comparison takes it
    claim_id: int           # the fence: the result of this call writes only while this is the instance's claim
    guarded: bool = False   # read connectionState first: no status column, so a connect must not reopen a closed one


@dataclass(frozen=True)
class Result:
    """One poll or webhook, as pgqr.record_results() takes it. Never holds a token."""

    key: str
    source: Source
    outcome: OutcomeName
    md5: str | None = None
    qr: str | None = field(default=None, repr=False)  # the data URL; None when unchanged or absent
    pairing_code: str | None = field(default=None, repr=False)
    qr_count: int | None = None
    http_status: int | None = None
    latency_ms: float | None = None
    error_class: str | None = None
    evolution_state: str | None = None
    evolution_reason: str | None = None  # why that state: logged_out, deleted, qr_limit, a statusReason
    final: bool = False  # the last hand-in of a result kept busy: logged as not written instead of busy again
    claim_id: int | None = None  # a poll's claim (Claimed.claim_id); a webhook holds none

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Recorded:
    """What pgqr.record_results() did with one result."""

    key: str
    written: bool           # it took effect (pgqr's estimate, and the app's row where the result writes one)
    claim_held: bool        # a poll's claim was still the instance's (a webhook's: the instance was waiting)
    busy: bool              # a lock held elsewhere: hand it in again
    qr_updated: bool
    outcome: str            # as recorded: app_refused when the app's table refused the write
    reason: str | None      # why it was not written (superseded, not_waiting, busy, the app's refusal), or
                            # image_already_replaced


@dataclass(frozen=True)
class Instance:
    """A row a webhook or a link names (pgqr.find_instances)."""

    key: str
    name: str
    token: str | None = field(repr=False)
    url: str | None = field(repr=False)
    waiting: bool


def image_md5(data_url: str) -> str:
    """How pgqr.instance_state.qr_md5 identifies a QR image (polls and webhooks must agree on it)."""
    return hashlib.md5(data_url.encode()).hexdigest()


def storable(*values: str | None) -> bool:
    """Whether PostgreSQL text can hold these strings: no NUL, no lone surrogate (JSON can carry both)."""
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


async def claim(pool: Pool, owner: str, limit: int, lease_seconds: float,
                due_by: datetime | None = None) -> list[Claimed]:
    """Lease up to `limit` instances due by `due_by` (default: now) in one short autocommit statement; HTTP
    happens after it committed."""
    rows: list[Claimed] = await pool.rows(
        Claimed, "SELECT * FROM pgqr.claim(%s, %s, make_interval(secs => %s), coalesce(%s, now()))",
        (owner, limit, lease_seconds, due_by))
    return rows


async def record_results(pool: Pool, owner: str, results: list[Result]) -> list[Recorded]:
    """The one write path: a batch in one round trip."""
    if not results:
        return []
    payload = json.dumps([r.as_json() for r in results])
    # what the results say of Evolution's state, picked out here: the database need not walk the QR images for it
    observations = json.dumps([
        {"key": r.key, "state": r.evolution_state, "reason": r.evolution_reason, "source": r.source,
         "checked": r.source == "poll"} for r in results if r.evolution_state is not None])
    rows: list[Recorded] = await pool.rows(
        Recorded, "SELECT * FROM pgqr.record_results(%s, %s::jsonb, %s::jsonb)", (owner, payload, observations))
    return rows


StateName = Literal["open", "connecting", "close", "not_found"]


@dataclass(frozen=True)
class Observation:
    """What Evolution says of one bound row, for pgqr.observe. `checked`: read from Evolution's memory
    (connectionState), not its database column (fetchInstances) or a webhook."""

    key: str
    state: StateName
    source: Literal["sweep", "webhook", "poll"] = "sweep"
    checked: bool = False
    reason: str | None = None
    # a sweep's read applies only while pgqr still holds the state it was decided on (`expected`)
    expect: bool = False
    expected: str | None = None


@dataclass(frozen=True)
class Target:
    """A bound row as the sweep and the drop confirmations call Evolution for it (the token is for the apikey
    header only)."""

    key: str
    name: str
    token: str | None = field(repr=False)
    url: str | None = field(repr=False)
    evolution_state: str | None = None


async def observe(pool: Pool, owner: str, observations: list[Observation]) -> list[str]:
    """Record Evolution's word on these rows; returns the keys another writer held (hand them in again)."""
    if not observations:
        return []
    payload = json.dumps([asdict(o) for o in observations])
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT k FROM pgqr.observe(%s, %s::jsonb) k", (owner, payload))
        return [str(row[0]) for row in await cur.fetchall()]


async def sweep_rows(pool: Pool) -> list[Target]:
    rows: list[Target] = await pool.rows(Target, "SELECT * FROM pgqr.sweep_rows()")
    return rows


async def drops_to_confirm(pool: Pool, limit: int = 100) -> list[Target]:
    rows: list[Target] = await pool.rows(
        Target, "SELECT * FROM pgqr.drops_to_confirm(%s)", (limit,))
    return rows


async def dropped(pool: Pool) -> int:
    """Connected instances that dropped within the connections_dropped alert's window (what that rule counts)."""
    return int(await pool.value(
        "SELECT count(*) FROM pgqr.instance_state "
        "WHERE dropped_at IS NOT NULL AND dropped_at >= now() - pgqr.setting('alert_dropped_window')::interval")
        or 0)


async def sweep_seconds(pool: Pool) -> float:
    return float(await pool.value("SELECT pgqr.setting('sweep_seconds')::float8") or 300.0)


async def next_due_in(pool: Pool) -> float | None:
    value = await pool.value("SELECT pgqr.next_due_in()")
    return None if value is None else float(value)


async def lease_seconds(pool: Pool) -> float:
    return float(await pool.value("SELECT pgqr.setting('lease_seconds')::float8") or 30.0)


async def tick_seconds(pool: Pool) -> float:
    """The tick period `pgqr schedule` set, in seconds."""
    value = await pool.value("SELECT extract(epoch FROM pgqr.setting('tick_every')::interval)::float8")
    return float(value) if value else 60.0


@dataclass(frozen=True)
class Freshness:
    waiting: int
    qr_valid: int
    oldest_expired_seconds: float


async def freshness(pool: Pool) -> Freshness:
    rows: list[Freshness] = await pool.rows(Freshness, "SELECT * FROM pgqr.freshness")
    return rows[0]


async def find_many(pool: Pool, names: list[str]) -> dict[str, list[Instance]]:
    """pgqr.find_instances for many names in one statement."""
    rows: list[Instance] = await pool.rows(
        Instance, "SELECT f.* FROM unnest(%s::text[]) AS u(name), LATERAL pgqr.find_instances(u.name) AS f",
        (names,))
    found: dict[str, list[Instance]] = {name: [] for name in names}
    for row in rows:
        found[row.name].append(row)
    return found


class InstanceLookup:
    """find_instances for the webhooks, with a group lookup: while one statement is in the database the names
    asked for meanwhile gather and go in the next one. At rest a webhook's lookup is one round trip, as
    before; at 500 webhooks a second many share one, which leaves the database and the event loop the time
    the webhooks wait for (one round trip each took a third of the sidecar's time in a reconcile, py-spy)."""

    MAX_NAMES = 256
    WIDTH = 2  # lookups in the database at once: a slow one does not hold up the names asked after it

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._asked: dict[str, list[asyncio.Future[list[Instance]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def find(self, name: str) -> list[Instance]:
        if not storable(name):  # no row can hold it; and it must not fail the lookup it would share
            return []
        found: asyncio.Future[list[Instance]] = asyncio.get_running_loop().create_future()
        self._asked.setdefault(name, []).append(found)
        if len(self._tasks) < self.WIDTH:
            task = asyncio.create_task(self._look_up(), name="instance lookup")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await found

    async def _look_up(self) -> None:
        while self._asked:
            names = list(self._asked)[:self.MAX_NAMES]
            asked = {name: self._asked.pop(name) for name in names}
            try:
                found = await find_many(self.pool, names)
            except Exception as exc:  # each asker gets the error its own lookup would have raised
                for futures in asked.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                continue
            for name, futures in asked.items():
                for future in futures:
                    if not future.done():
                        future.set_result(found[name])


@dataclass(frozen=True)
class PageState:
    """What the live page of one instance shows (pgqr/page.py turns it into words). Never holds a token."""

    key: str
    name: str
    status: str | None
    waiting: bool
    connected: bool                 # the app's status is the binding's connected value
    qr: str | None = field(repr=False)
    pairing_code: str | None = field(repr=False)
    has_phone: bool
    qr_expires_at: datetime | None
    last_outcome: str | None
    last_error_class: str | None
    db_now: datetime                # the database's clock when read: pages count down on it, not the sidecar's


async def page_states(pool: Pool, keys: list[str]) -> list[PageState]:
    """The page's view of these instances, one statement for all of them (the QR from the app's bound column, or
    pgqr's own copy when the binding has none)."""
    rows: list[PageState] = await pool.rows(PageState, """
        SELECT a.key, a.name, a.status, coalesce(a.waiting, false) AS waiting,
               -- without a status column, Evolution's word
               coalesce(CASE WHEN b.status_column IS NULL THEN s.evolution_state = 'open'
                             ELSE a.status = b.connected_value END, false) AS connected,
               coalesce(a.qr, s.qr) AS qr, coalesce(a.pairing_code, s.pairing_code) AS pairing_code,
               a.phone IS NOT NULL AND a.phone <> '' AS has_phone,
               greatest(s.qr_expires_at, q.qr_alive_at) AS qr_expires_at,  -- as narrowed by polls (0010)
               s.last_outcome::text AS last_outcome, s.last_error_class, now() AS db_now
        FROM pgqr.app_rows(%s::text[]) a
        CROSS JOIN pgqr.binding b
        LEFT JOIN pgqr.instance_state s ON s.key = a.key
        LEFT JOIN pgqr.schedule q ON q.key = a.key""", (keys,))
    return rows


async def heartbeat(pool: Pool, owner: str, host: str, pid: int, version: str, listen_ok: bool) -> None:
    async with pool.connection() as conn:
        await conn.execute("SELECT pgqr.heartbeat(%s, %s, %s, %s, %s)", (owner, host, pid, version, listen_ok))


async def analyze_grown(pool: Pool) -> list[str]:
    """pgqr's tables that had outgrown their statistics, analyzed now (sql/0013_statistics.sql)."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT t::text FROM pgqr.analyze_grown() t")
        return [row[0] for row in await cur.fetchall()]


async def release_leases(pool: Pool, owner: str) -> int:
    return int(await pool.value("SELECT pgqr.release_leases(%s)", (owner,)) or 0)


async def listener_stopped(pool: Pool, owner: str) -> None:
    async with pool.connection() as conn:
        await conn.execute("SELECT pgqr.listener_stopped(%s)", (owner,))


async def notify(conn: AsyncConn, channel: str, payload: str) -> None:
    await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


async def send_notify(pool: Pool, channel: str, payload: str) -> None:
    """NOTIFY from a work connection: the listener's self-test and probe, sent the way a trigger's would be."""
    async with pool.connection() as conn:
        await notify(conn, channel, payload)


# -- alert deliveries (pgqr.alert_deliveries, sql/0007) ------------------------------------------------

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


async def claim_alert_deliveries(pool: Pool, owner: str, limit: int) -> list[Delivery]:
    rows: list[Delivery] = await pool.rows(
        Delivery, "SELECT * FROM pgqr.claim_alert_deliveries(%s, %s)", (owner, limit))
    return rows


async def finish_alert_delivery(pool: Pool, delivery_id: int, owner: str, outcome: DeliveryOutcome,
                                error: str | None = None) -> bool:
    return bool(await pool.value("SELECT pgqr.finish_alert_delivery(%s, %s, %s, %s)",
                                 (delivery_id, owner, outcome, error)))


async def next_alert_delivery_in(pool: Pool) -> float | None:
    value = await pool.value("SELECT pgqr.next_alert_delivery_in()")
    return None if value is None else float(value)
