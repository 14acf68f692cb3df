"""`pgqr run`, the composition root: builds the parts and wires them with narrow callables.

    listener (LISTEN, probes) --wake--> engine (claims for free slots, calls, streams write-backs)
    web (health, metrics, webhooks) --record--> the same write path (db.record_results)
    heartbeat, freshness gauges, alert forwarder: small loops beside them

`run(stop)` returns after `stop` is set and the shutdown is over: no new claims, in-flight calls get the grace
period, results are written back, leases released, the listener marked stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from . import __version__, db, page, tokens, web
from .alerts import AlertForwarder
from .engine import Engine, InstanceResult
from .evolution import EvolutionClient
from .listener import Listener
from .metrics import Metrics
from .settings import Settings, describe
from .sweep import Sweep
from .tasks import cancel_and_wait

log = logging.getLogger("pgqr.service")

REFRESH_CHANNEL = "pgqr_refresh"
ALERT_CHANNEL = "pgqr_alert"
FINAL_WRITES_SECONDS = 5.0
DEGRADED_POLL_SECONDS = 1.0
GAUGE_SECONDS = 5.0


def owner_id() -> str:
    """host:pid:random, unique per process start; doubles as the lease owner."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Service:
    """One `pgqr run` process."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.owner = owner_id()
        self.metrics = metrics or Metrics()
        self.pool = db.Pool(settings.dsn, size=8)
        self.client = EvolutionClient(timeout=settings.http_timeout, max_reply_bytes=settings.max_reply_bytes,
                                      concurrency=settings.concurrency)
        self.engine = Engine(settings, self.pool, self.client, self.owner, observe=self._observe)
        self.sweep = Sweep(settings, self.pool, self.client, self.owner, self.metrics)
        # webhooks share the engine's writer, in a lane of their own (never queued behind polls, which give way
        # to them); one that meets a write of the same instance waits for it, up to 2 s
        self.lookup = db.InstanceLookup(self.pool)
        self.wake = asyncio.Event()
        self.alerts = AlertForwarder(settings.alert_webhook_url.reveal(), self.pool, self.owner,
                                     poll_seconds=settings.fallback_seconds) if settings.alert_webhook_url else None
        handlers: dict[str, Callable[[str], None]] = {REFRESH_CHANNEL: self._on_refresh}
        if self.alerts is not None:
            handlers[ALERT_CHANNEL] = lambda payload: self.alerts.wake() if self.alerts else None
        # the live QR page: one more channel on the same LISTEN, fanned out in-process to every open page
        self.page = page.Hub(lambda keys: db.page_states(self.pool, keys)) if settings.link_secret else None
        if self.page is not None:
            handlers[page.QR_CHANNEL] = self.page.notified
        self.listener = Listener(settings.listen_dsn, handlers, self._on_listen, probe_seconds=settings.probe_seconds,
                                 on_reconnect=self.metrics.reconnects.inc,
                                 send=lambda channel, payload: db.send_notify(self.pool, channel, payload))
        # read when /metrics is scraped, so a reconnect shows at once, not at the next gauge round
        self.metrics.listening.set_function(lambda: 1 if self.listener.listening.is_set() else 0)
        self.metrics.listen_degraded.set_function(lambda: 1 if self.listener.degraded else 0)
        self.stopping = False
        self.crashed = False  # a loop died: `pgqr run` exits 1
        self.http_port: int | None = None
        self._runner: Any = None
        self.database_ok: bool | None = None

    # -- wiring -------------------------------------------------------------------------------------------

    def _on_refresh(self, payload: str) -> None:
        self.metrics.wakeups.labels("notify").inc()
        self.wake.set()

    def _on_listen(self) -> None:
        self.wake.set()
        if self.alerts is not None:
            self.alerts.wake()  # alert transitions notified while we were not listening
        if self.page is not None:
            self.page.reconnected()  # and QR changes: open pages get the current state

    def _observe(self, result: InstanceResult) -> None:
        self.metrics.refreshes.labels(result.outcome, result.error_class or "").inc()
        if result.latency_ms:
            self.metrics.api_latency.observe(result.latency_ms / 1000)

    def readiness(self) -> list[str]:
        problems = []
        if not self.listener.listening.is_set() and not self.listener.degraded:
            problems.append("not listening")
        if self.database_ok is False:
            problems.append("database unreachable")
        return problems

    def notes(self) -> list[str]:
        if self.listener.degraded:
            return ["listen degraded: notifications do not arrive (a transaction-mode pooler?); set "
                    "PGQR_LISTEN_DATABASE_URL to a direct or session-mode URL; polling every second meanwhile"]
        return []

    def web_app(self) -> Any:
        app = web.make_app(web.Deps(
            record=self.engine.writer.record,
            find=self.lookup.find,
            readiness=self.readiness, notes=self.notes, metrics=self.metrics,
            auth=tokens.WebhookAuth(self.settings.webhook_secret, self.settings.evolution_api_key,
                                    self.settings.webhook_jwt_key),
            evolution_url=lambda url: self.settings.evolution_for(url, None)[0]))
        if self.page is not None:
            secrets = [s.reveal() for s in (self.settings.link_secret, self.settings.link_secret_previous) if s]
            page.register(app, self.page, secrets)
        return app

    # -- the loops ----------------------------------------------------------------------------------------

    async def work_forever(self) -> None:
        """The engine, restarted after a database error (with a capped delay) and never ended by one."""
        delay = 1.0
        while not self.stopping:
            try:
                await self.engine.run_forever(self.wake, lambda: self.stopping)
            except Exception as exc:
                self.database_ok = False
                log.error("engine stopped: %s; restarting in %.0fs", describe(exc), delay,
                          exc_info=not isinstance(exc, OSError) and "psycopg" not in type(exc).__module__,
                          extra={"action": "engine_error"})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            else:
                delay = 1.0

    async def poll_while_degraded(self) -> None:
        """Without notifications, nobody says a row started waiting: look every second instead."""
        while True:
            await asyncio.sleep(DEGRADED_POLL_SECONDS)
            if self.listener.degraded:
                self.metrics.wakeups.labels("degraded_poll").inc()
                self.wake.set()

    async def heartbeat_forever(self) -> None:
        """Say we are alive, but only while we are: a listener that neither listens nor polls is not."""
        host, pid = socket.gethostname(), os.getpid()
        while True:
            while not (self.listener.listening.is_set() or self.listener.degraded):
                await asyncio.sleep(0.2)
            try:
                await db.heartbeat(self.pool, self.owner, host, pid, __version__, not self.listener.degraded)
                self.database_ok = True
            except Exception as exc:
                self.database_ok = False
                log.warning("heartbeat failed: %s", describe(exc), extra={"action": "heartbeat_error"})
            else:
                await self.analyze_grown()
            await asyncio.sleep(self.settings.heartbeat_seconds)

    async def analyze_grown(self) -> None:
        """An import of many rows is planned for within a heartbeat, not at autovacuum's next round."""
        try:
            for table in await db.analyze_grown(self.pool):
                log.info("statistics of %s refreshed: it had outgrown them", table,
                         extra={"action": "analyze", "table": table})
        except Exception as exc:  # the next heartbeat tries again; autovacuum gets there anyway
            log.warning("refreshing the statistics of pgqr's tables failed: %s", describe(exc),
                        extra={"action": "analyze_error"})

    async def gauges_forever(self) -> None:
        """Freshness, live: how many waiting instances hold a QR within its estimated life."""
        while True:
            with contextlib.suppress(Exception):
                f = await db.freshness(self.pool)
                self.metrics.waiting.set(f.waiting)
                self.metrics.qr_valid.set(f.qr_valid)
                self.metrics.oldest_expired.set(f.oldest_expired_seconds)
                self.metrics.dropped.set(await db.dropped(self.pool))
            self.metrics.in_flight.set(len(self.engine.in_flight))
            await asyncio.sleep(GAUGE_SECONDS)

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def serve_http(self) -> None:
        """Start the HTTP side, first of all: a port in use then fails at once, with nothing else open."""
        if self.settings.http_port is not None and self._runner is None:
            self._runner = await web.start(self.web_app(), self.settings.http_host, self.settings.http_port)
            self.http_port = web.bound_port(self._runner)

    async def stop_http(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def run(self, stop: asyncio.Event) -> None:
        await self.serve_http()
        await self.pool.open()
        if self.alerts is not None:
            await self.alerts.start()
        loops: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = [
            ("listen", self.listener.run_forever), ("heartbeat", self.heartbeat_forever),
            ("gauges", self.gauges_forever), ("degraded", self.poll_while_degraded),
            ("sweep", self.sweep.run_forever), ("drops", self.sweep.confirm_forever)]
        if self.page is not None:
            loops.append(("page", self.page.run_forever))
        background = [asyncio.create_task(fn(), name=name) for name, fn in loops]
        worker = asyncio.create_task(self.work_forever(), name="work")
        for task in (*background, worker):
            task.add_done_callback(lambda t: self._task_ended(t, stop))
        # what is alive now (modules, the pool, aiohttp, the metrics) lives as long as the process: the cyclic
        # collector need not walk it on every collection, which took a tenth of the process's time in a
        # 10,000-instance reconcile (py-spy)
        gc.collect()  # what is garbage now must not be frozen with the rest
        gc.freeze()
        # and the young generation is collected every 20,000 allocations rather than 700: what a request
        # allocates is mostly freed by reference counting before, so each collection walks about as much
        gc.set_threshold(20_000, 20, 20)
        log.info("pgqr %s started as %s", __version__, self.owner, extra={"action": "start"})
        await stop.wait()
        log.info("stopping", extra={"action": "stop"})
        self.stopping = True
        self.wake.set()
        await cancel_and_wait(background)
        try:
            async with asyncio.timeout(2.0):
                await asyncio.shield(worker)
        except TimeoutError:
            await cancel_and_wait([worker])
        await self.engine.drain(self.settings.grace_seconds)
        # webhooks in flight get aiohttp's shutdown timeout, and the writer stays open for them meanwhile
        await self.stop_http()
        await self.engine.close()
        try:  # the leases expire on their own anyway: a database that does not answer must not hold the exit
            async with asyncio.timeout(FINAL_WRITES_SECONDS):
                await asyncio.shield(self._final_writes())
        except TimeoutError:
            log.warning("could not release leases in time", extra={"action": "release_error"})
        await self.client.close()
        if self.alerts is not None:
            await self.alerts.close()
        await self.pool.close()
        log.info("stopped", extra={"action": "stopped"})

    def _task_ended(self, task: asyncio.Task[None], stop: asyncio.Event) -> None:
        """The loops only end when cancelled at shutdown. One that ends otherwise is a bug: rather than
        heartbeat on while refreshing nothing, stop and exit non-zero."""
        if task.cancelled() or self.stopping:
            return
        self.crashed = True
        error = task.exception()
        log.error("%s loop ended unexpectedly: %s", task.get_name(), describe(error) if error else "returned",
                  exc_info=error, extra={"action": "crash"})
        stop.set()

    async def _final_writes(self) -> None:
        try:
            released = await db.release_leases(self.pool, self.owner)
            await db.listener_stopped(self.pool, self.owner)
            log.info("released %d leases", released, extra={"action": "release_leases", "released": released})
        except Exception as exc:
            # the leases expire on their own; another replica picks the instances up then
            log.warning("could not release leases: %s", describe(exc), extra={"action": "release_error"})
