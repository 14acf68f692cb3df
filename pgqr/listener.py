"""`pgqr run`: the LISTEN loop, its wake-up sources, reconnects with backoff, and a graceful shutdown.

Wake-ups are hints: NOTIFY pgqr_refresh (cron tick, new-instance trigger), start-up, every reconnect
(LISTEN first, then catch up), and a fallback timer a little longer than the cron period. They coalesce
into one asyncio.Event, so a wake-up during a reconcile schedules exactly one more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from typing import Any

import psycopg

from . import __version__, db, http
from .alerts import AlertForwarder
from .config import Settings
from .evolution import EvolutionClient
from .metrics import Metrics
from .reconcile import Reconciler, owner_id

log = logging.getLogger("pgqr.listener")

REFRESH_CHANNEL = "pgqr_refresh"
ALERT_CHANNEL = "pgqr_alert"
PROBE_CHANNEL = "pgqr_probe"
PROBE_REPLY_SECONDS = 5.0
FINAL_WRITES_SECONDS = 5.0
# A half-open TCP connection (peer gone, no RST) must fail in about a minute, not the kernel's ~15: keepalives
# while idle, tcp_user_timeout while a statement's bytes wait for an acknowledgement.
CONNECT_OPTIONS: dict[str, Any] = {
    "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}
# The work connection serves the worker, the heartbeat, webhooks and alerts: an app transaction that keeps an
# instance's row locked must cost that instance one write (pgqr.record_results skips it), not stall them all.
WORK_OPTIONS = "-c lock_timeout=5s -c statement_timeout=60s"


class ListenStalled(Exception):
    """Our own probe NOTIFY never came back: the LISTEN is dead though the socket looks alive."""


class Backoff:
    """Capped exponential backoff with full jitter, for reconnects: never a hot loop."""

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


class WorkConnection:
    """The autocommit connection for claims and write-backs, reopened when it breaks."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: db.AsyncConn | None = None
        # the worker, the heartbeat and webhooks ask at once (start-up, after a break): open one connection,
        # not one each; writers on separate connections can deadlock each other in record_results
        self._opening = asyncio.Lock()

    async def get(self) -> db.AsyncConn:
        async with self._opening:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, application_name="pgqr", options=WORK_OPTIONS, **CONNECT_OPTIONS)
            return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


class Service:
    """One listener process. `run(stop)` returns after `stop` is set and the shutdown has finished."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.owner = owner_id()
        self.metrics = metrics or Metrics()
        self.client = EvolutionClient(
            timeout=settings.http_timeout, max_reply_bytes=settings.max_reply_bytes,
            concurrency=settings.concurrency,
        )
        self.reconciler = Reconciler(settings, self.client, self.owner)
        self.work = WorkConnection(settings.database_url)
        self.wake = asyncio.Event()
        self.listening = asyncio.Event()  # set while a LISTEN connection is healthy
        # delivers from pgqr.alert_deliveries over the work connection, never from a NOTIFY payload
        self.alerts = AlertForwarder(
            settings.alert_webhook_url, self.work.get, self.owner, poll_seconds=settings.fallback_seconds,
        ) if settings.alert_webhook_url else None
        self.reconciles = 0
        self.stopping = False
        self.crashed = False  # a loop died: `pgqr run` exits 1
        self.fallback_seconds = settings.fallback_seconds
        self.http_port: int | None = None
        self.listen_conn: db.AsyncConn | None = None  # the current LISTEN connection, for diagnostics
        self.last_reconcile_ok: bool | None = None
        self._probe_token: str | None = None
        self._probe_seen = asyncio.Event()

    # -- the three loops -------------------------------------------------------------------------

    async def listen_forever(self) -> None:
        """Keep a LISTEN connection alive; reconnect forever with capped backoff and jitter."""
        backoff = Backoff()
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.settings.database_url, autocommit=True, application_name="pgqr-listener",
                    **CONNECT_OPTIONS,
                ) as conn:
                    self.listen_conn = conn
                    for channel in (REFRESH_CHANNEL, ALERT_CHANNEL, PROBE_CHANNEL):
                        await conn.execute(f"LISTEN {channel}")
                    backoff.reset()
                    self.listening.set()
                    self.wake.set()  # LISTEN first, then catch up on whatever we missed
                    if self.alerts is not None:
                        self.alerts.wake()  # alert transitions notified while we were not listening
                    log.info("listening", extra={"action": "listen", "channels": REFRESH_CHANNEL})
                    await self._receive(conn)
            except Exception as exc:
                # whatever broke (the connection, the probe, a bug), listening stops only with the process
                self.listening.clear()
                self.metrics.reconnects.inc()
                delay = backoff.next_delay()
                expected = isinstance(exc, psycopg.Error | OSError | ListenStalled | TimeoutError)
                log.log(
                    logging.WARNING if expected else logging.ERROR,
                    "listener connection lost (%s); reconnecting in %.1fs", _describe(exc), delay,
                    exc_info=not expected, extra={"action": "reconnect", "delay_s": round(delay, 2)},
                )
                await asyncio.sleep(delay)

    async def _receive(self, conn: db.AsyncConn) -> None:
        """Dispatch notifications; when idle for probe_seconds, prove the LISTEN still works."""
        while True:
            async for notify in conn.notifies(timeout=self.settings.probe_seconds):
                self._dispatch(notify)
            await self._probe(conn)

    async def _probe(self, conn: db.AsyncConn) -> None:
        token = secrets.token_hex(8)
        self._probe_token = token
        self._probe_seen.clear()
        await asyncio.wait_for(db.notify(conn, PROBE_CHANNEL, token), PROBE_REPLY_SECONDS)
        async for notify in conn.notifies(timeout=PROBE_REPLY_SECONDS):
            self._dispatch(notify)
            if self._probe_seen.is_set():
                return
        raise ListenStalled("probe notification not received")

    def _dispatch(self, notify: psycopg.Notify) -> None:
        if notify.channel == REFRESH_CHANNEL:
            self.metrics.wakeups.labels("notify").inc()
            self.wake.set()
        elif notify.channel == ALERT_CHANNEL:
            if self.alerts is not None:
                self.alerts.wake()  # the payload is a hint only: anyone with CONNECT can NOTIFY
        elif notify.channel == PROBE_CHANNEL and notify.payload == self._probe_token:
            self._probe_seen.set()

    async def work_forever(self) -> None:
        """Reconcile on every wake-up, or when the fallback timer runs out."""
        backoff = Backoff(base=1.0, cap=self.settings.fallback_seconds)
        self.wake.set()  # start-up
        while not self.stopping:
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=self.fallback_seconds)
            except TimeoutError:
                self.metrics.wakeups.labels("fallback").inc()
            if self.stopping:
                return
            self.wake.clear()
            if await self.reconcile_once():
                backoff.reset()
            elif not self.stopping:
                # retry soon rather than at the next tick; a wake-up meanwhile cuts the wait short
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=backoff.next_delay())
                except TimeoutError:
                    self.wake.set()

    async def reconcile_once(self) -> bool:
        started = time.perf_counter()
        try:
            conn = await self.work.get()
            summary = await self.reconciler.run(conn, should_stop=lambda: self.stopping)
            await self._follow_tick_period(conn)
        except (psycopg.Error, OSError) as exc:
            self.last_reconcile_ok = False
            log.error("reconcile failed: %s", _describe(exc), extra={"action": "reconcile_error"})
            return False
        except Exception:
            # a bug must not stop refreshing for every instance: log it and retry with backoff
            self.last_reconcile_ok = False
            log.exception("reconcile crashed", extra={"action": "reconcile_error"})
            return False
        self.reconciles += 1
        self.last_reconcile_ok = True
        with contextlib.suppress(Exception):  # metrics are a courtesy; they must not stop the worker
            self.metrics.observe(summary, time.perf_counter() - started)
        if summary.results:
            log.info(
                "reconciled %d instances, %d failed", len(summary.results), summary.failed,
                extra={"action": "reconcile", "instances": len(summary.results), "failed": summary.failed},
            )
        return True

    async def _follow_tick_period(self, conn: db.AsyncConn) -> None:
        """Keep the fallback timer a little longer than the cron period, which `pgqr schedule` may change."""
        tick = await db.tick_seconds(conn)
        self.fallback_seconds = max(self.settings.fallback_seconds, 1.5 * tick) if tick > 60 else \
            self.settings.fallback_seconds

    async def heartbeat_forever(self) -> None:
        """Say we are alive, but only while we are: a listener without a working LISTEN is not."""
        host, pid = socket.gethostname(), os.getpid()
        while True:
            await self.listening.wait()
            try:
                await db.heartbeat(await self.work.get(), self.owner, host, pid, __version__)
            except Exception as exc:
                log.warning("heartbeat failed: %s", _describe(exc), extra={"action": "heartbeat_error"})
            await asyncio.sleep(self.settings.heartbeat_seconds)

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; then stop taking work, let in-flight calls finish within the grace
        period, give back our leases and mark this listener stopped."""
        runner = None
        if self.settings.http_port is not None:  # first: a port in use then leaves nothing else open
            runner = await http.start(self, self.settings.http_host, self.settings.http_port)
            self.http_port = http.bound_port(runner)
        if self.alerts is not None:
            await self.alerts.start()
        background = [
            asyncio.create_task(self.listen_forever(), name="listen"),
            asyncio.create_task(self.heartbeat_forever(), name="heartbeat"),
        ]
        worker = asyncio.create_task(self.work_forever(), name="work")
        for task in (*background, worker):
            task.add_done_callback(lambda t: self._task_ended(t, stop))
        log.info("pgqr %s started as %s", __version__, self.owner, extra={"action": "start"})
        await stop.wait()
        log.info("stopping", extra={"action": "stop"})
        for task in background:
            task.cancel()  # stop taking work: no more wake-ups
        await self._drain(worker)
        await asyncio.gather(*background, return_exceptions=True)
        try:  # the leases expire on their own anyway: a database that does not answer must not hold the exit
            await asyncio.wait_for(asyncio.shield(self._final_writes()), FINAL_WRITES_SECONDS)
        except TimeoutError:
            log.warning("could not release leases in time", extra={"action": "release_error"})
        if runner is not None:
            await runner.cleanup()
        await self.client.close()
        if self.alerts is not None:
            await self.alerts.close()
        await self.work.close()
        log.info("stopped", extra={"action": "stopped"})

    def _task_ended(self, task: asyncio.Task[None], stop: asyncio.Event) -> None:
        """The loops only end when cancelled at shutdown (or the worker on `stopping`). One that ends
        otherwise is a bug: rather than heartbeat on while refreshing nothing, stop and exit non-zero."""
        if task.cancelled() or self.stopping:
            return
        self.crashed = True
        error = task.exception()
        log.error("%s loop ended unexpectedly: %s", task.get_name(), _describe(error) if error else "returned",
                  exc_info=error, extra={"action": "crash"})
        stop.set()

    async def _drain(self, worker: asyncio.Task[None]) -> None:
        """Let a running reconcile finish within the grace period (so its results are written back),
        then cancel whatever is still in flight."""
        self.stopping = True
        self.wake.set()  # unblock the worker's wait; it sees `stopping` and returns
        try:
            await asyncio.wait_for(asyncio.shield(worker), timeout=self.settings.grace_seconds)
        except TimeoutError:
            log.warning("grace period over; cancelling in-flight calls", extra={"action": "grace_expired"})
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)

    async def _final_writes(self) -> None:
        try:
            conn = await self.work.get()
            released = await db.release_leases(conn, self.owner)
            await db.listener_stopped(conn, self.owner)
            log.info("released %d leases", released, extra={"action": "release_leases", "released": released})
        except (psycopg.Error, OSError) as exc:
            # the leases expire on their own; another replica picks the instances up then
            log.warning("could not release leases: %s", _describe(exc), extra={"action": "release_error"})


def _describe(exc: BaseException) -> str:
    """First line of an error, for logs. psycopg messages name host and port, never a password."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
