"""LISTEN on a dedicated autocommit connection: dispatch notifications, prove they arrive, reconnect forever.

At every (re)connect a NOTIFY sent from *another* connection must come back within a couple of seconds, the
way the app's triggers and pg_cron's tick reach us. Through a transaction-mode pooler (PgBouncer, Supabase's
port 6543) it does not: the LISTEN sits on a server connection the pooler hands to someone else between
statements, and a notification that arrives while we are not linked to it is dropped (or handed to another
client). A NOTIFY sent on the listen connection itself would pass there by chance (the pooler tends to give a
lone client the same server again, and a session's own notification is delivered before its statement ends),
hence the other connection. Then the listener says so once, in words, stays `degraded` (the service polls the
database for due work instead, visibly) and tries again later. While idle, a probe proves the LISTEN still works.

Only the probe channel is LISTENed before the self-test passes, and it is UNLISTENed when it fails: the service's
own channels never end up on a pooler's shared server connections, where other clients would receive them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Awaitable, Callable

import psycopg

from . import db
from .settings import describe

log = logging.getLogger("pgqr.listener")

PROBE_CHANNEL = "pgqr_probe"
SELF_TEST_SECONDS = 2.0
PROBE_REPLY_SECONDS = 5.0
DEGRADED_RETRY_SECONDS = 60.0

POOLER_HINT = ("notifications do not arrive on the listen connection: it likely goes through a transaction-mode "
               "pooler (PgBouncer, Supabase's port 6543). Set PGQR_LISTEN_DATABASE_URL to a direct or session-mode "
               "URL; until then pgqr polls the database for due work every second")


class ListenStalled(Exception):
    """Our own probe NOTIFY never came back: the LISTEN is dead though the socket looks alive."""


class Backoff:
    """Capped exponential backoff with full jitter, for reconnects: never a hot loop."""

    def __init__(self, base: float = 0.5, cap: float = 10.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


Send = Callable[[str, str], Awaitable[None]]


class Listener:
    """`handlers` maps a channel to a callback taking the payload; `on_connect` runs after every LISTEN (the
    service catches up then). `listening` is set while notifications are known to arrive; `degraded` is True
    while a connection is up but does not deliver them. `send(channel, payload)` NOTIFYs over a connection other
    than the listen one (the service's work pool); by default a short connection of its own to `dsn`."""

    def __init__(self, dsn: str, handlers: dict[str, Callable[[str], None]], on_connect: Callable[[], None],
                 *, probe_seconds: float = 30.0, on_reconnect: Callable[[], None] = lambda: None,
                 send: Send | None = None) -> None:
        self.dsn = dsn
        self.send = send or self._send_on_own_connection
        self.handlers = handlers
        self.on_connect = on_connect
        self.on_reconnect = on_reconnect
        self.probe_seconds = probe_seconds
        self.listening = asyncio.Event()
        self.degraded = False
        self._probe_token: str | None = None
        self._probe_seen = asyncio.Event()

    async def run_forever(self) -> None:
        backoff = Backoff()
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, application_name="pgqr-listener", **db.CONNECT_OPTIONS,
                ) as conn:
                    await conn.execute(f"LISTEN {PROBE_CHANNEL}")
                    backoff.reset()
                    if not await self._round_trip(conn, SELF_TEST_SECONDS):
                        await self._degrade(conn)
                        continue
                    for channel in self.handlers:
                        await conn.execute(f"LISTEN {channel}")
                    self.degraded = False
                    self.listening.set()
                    log.info("listening", extra={"action": "listen", "channels": ",".join(self.handlers)})
                    self.on_connect()  # LISTEN first, then catch up on whatever we missed
                    await self._receive(conn)
            except Exception as exc:
                # whatever broke (the connection, the probe, a bug), listening stops only with the process
                self.listening.clear()
                self.on_reconnect()
                delay = backoff.next_delay()
                expected = isinstance(exc, psycopg.Error | OSError | ListenStalled | TimeoutError)
                log.log(logging.WARNING if expected else logging.ERROR,
                        "listener connection lost (%s); reconnecting in %.1fs", describe(exc), delay,
                        exc_info=not expected, extra={"action": "reconnect", "delay_s": round(delay, 2)})
                await asyncio.sleep(delay)

    async def _degrade(self, conn: db.AsyncConn) -> None:
        """Connected, but notifications do not come back: say why once, serve by polling, test again later."""
        self.listening.clear()
        with contextlib.suppress(psycopg.Error):
            # best effort: through a transaction pooler this reaches the server that took the LISTEN only when
            # the pooler hands it to us again (it usually does, to a lone client)
            await conn.execute("UNLISTEN *")
        if not self.degraded:
            log.error(POOLER_HINT, extra={"action": "listen_degraded"})
        self.degraded = True
        self.on_connect()
        await asyncio.sleep(DEGRADED_RETRY_SECONDS)

    async def _receive(self, conn: db.AsyncConn) -> None:
        """Dispatch notifications; when idle for probe_seconds, prove the LISTEN still works."""
        while True:
            async for notify in conn.notifies(timeout=self.probe_seconds):
                self._dispatch(notify)
            if not await self._round_trip(conn, PROBE_REPLY_SECONDS):
                raise ListenStalled("probe notification not received")

    async def _round_trip(self, conn: db.AsyncConn, within: float) -> bool:
        token = secrets.token_hex(8)
        self._probe_token = token
        self._probe_seen.clear()
        async with asyncio.timeout(within + 5):
            await self.send(PROBE_CHANNEL, token)
        async for notify in conn.notifies(timeout=within):
            self._dispatch(notify)
            if self._probe_seen.is_set():
                return True
        return self._probe_seen.is_set()

    async def _send_on_own_connection(self, channel: str, payload: str) -> None:
        async with await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, prepare_threshold=None, application_name="pgqr-probe", **db.CONNECT_OPTIONS,
        ) as conn:
            await db.notify(conn, channel, payload)

    def _dispatch(self, notify: psycopg.Notify) -> None:
        if notify.channel == PROBE_CHANNEL:
            if notify.payload == self._probe_token:
                self._probe_seen.set()
            return
        handler = self.handlers.get(notify.channel)
        if handler is not None:
            handler(notify.payload)  # a hint only: anyone with CONNECT can NOTIFY
