"""Deliver alert transitions from pgqr.alert_deliveries to an HTTP endpoint (PGQR_ALERT_WEBHOOK_URL).

The table is the truth and NOTIFY pgqr_alert only a wake-up: the listener calls `wake()` on each pgqr_alert
notification and after every (re)connect, and the forwarder's own task then claims undelivered transitions
with pgqr.claim_alert_deliveries() (SKIP LOCKED plus a lease: two replicas never both get one), POSTs the
payload stored on the row, with retries and exponential backoff with jitter, and reports back with
pgqr.finish_alert_delivery(). A notification's payload is never sent, so a forged NOTIFY delivers nothing.
It also looks on a timer, so a transition whose NOTIFY nobody heard, or a delivery whose round failed, goes
out later without a wake-up. `wake()` is one Event.set(): a slow, failing or unreachable alert endpoint
costs the refresh loop nothing. Logs show the endpoint as scheme://host:port only: webhook URLs often carry
their secret in the user info, the path (Slack, Teams) or the query string.

Exactly once, with one exception: an endpoint that accepted a POST whose acknowledgement never reached the
database (the connection died right then, for longer than our retries) gets it again when the lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from urllib.parse import urlsplit

import aiohttp
import psycopg

from . import db
from .evolution import display_url
from .tasks import cancel_and_wait

__all__ = ["AlertForwarder", "safe_origin"]

logger = logging.getLogger("pgqr.alerts")

# Backoff cap: an endpoint down for minutes should not hold one alert for longer than the next evaluation.
MAX_DELAY = 60.0
RELEASE_SECONDS = 5.0

def safe_origin(url: str) -> str:
    """scheme://host[:port] of `url`, without user info, path or query: safe to log."""
    return display_url(url, with_path=False)


class AlertForwarder:
    """Claim undelivered alert transitions from `pool` as `owner` and POST them as JSON to `url`.

    Counters: `delivered` (2xx), `failed` (a delivery round that gave up: retries exhausted or a 4xx that
    retrying will not fix; the database schedules the next round, see pgqr.finish_alert_delivery).
    Claims one delivery at a time, so the database lease (alert_delivery_lease, 2 minutes) covers the
    worst case of one round: max_attempts * timeout plus the backoff delays (5 * 5 s + 15 s by default).
    """

    def __init__(
        self,
        url: str,
        pool: db.Pool,
        owner: str,
        *,
        max_attempts: int = 5,
        base_delay: float = 1.0,
        timeout: float = 5.0,
        poll_seconds: float = 90.0,
    ) -> None:
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("the alert webhook URL must be http(s)")
        if max_attempts < 1 or base_delay < 0 or timeout <= 0 or poll_seconds <= 0:
            raise ValueError("max_attempts must be >= 1, base_delay >= 0, timeout and poll_seconds > 0")
        self._url = url
        self._origin = safe_origin(url)
        self._pool = pool
        self._owner = owner
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self._timeout = timeout
        self._poll_seconds = poll_seconds
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing = False
        self._held: db.Delivery | None = None  # claimed, not yet finished
        self._held_outcome: tuple[db.DeliveryOutcome, str | None] = ("released", None)  # what close() reports for it
        self._db_failures = 0
        self._asleep = False  # between passes, waiting for a wake-up or the timer
        self.delivered = 0
        self.failed = 0

    @property
    def idle(self) -> bool:
        """Asleep with no wake-up pending: every pass asked for so far has run to its end."""
        return self._asleep and not self._wakeup.is_set()

    def wake(self) -> None:
        """Look for undelivered alerts soon. Never blocks, never raises; wake-ups coalesce."""
        self._wakeup.set()

    async def start(self) -> None:
        """Start the delivery task (idempotent); it looks once at start."""
        if self._task is not None:
            return
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        self._wakeup.set()
        self._task = asyncio.create_task(self._run(), name="pgqr-alert-forwarder")

    async def close(self, grace: float = 5.0) -> None:
        """Stop claiming; let a delivery in flight finish for up to `grace` seconds, else give its claim back."""
        self._closing = True
        self._wakeup.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                async with asyncio.timeout(max(grace, 0)):
                    await asyncio.shield(task)
            except TimeoutError:
                await cancel_and_wait([task])
        held, self._held = self._held, None
        if held is not None:
            # without this, the delivery would wait for its lease to run out before another replica takes it
            # bounded: a database that does not answer must not hold the exit (the lease expires anyway)
            with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
                async with asyncio.timeout(RELEASE_SECONDS):
                    await self._finish(held, *self._held_outcome)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _run(self) -> None:
        while not self._closing:
            self._wakeup.clear()  # before the pass: a wake-up during it schedules exactly one more
            sleep = await self._pass()
            if self._closing:
                return
            self._asleep = True
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(sleep):
                        await self._wakeup.wait()
            finally:
                self._asleep = False

    async def _pass(self) -> float:
        """Deliver until nothing is claimable; returns how long to sleep before looking again."""
        try:
            if self._held is not None:
                # a delivery whose result could not be reported last time (the database blinked): report it
                # now, or a POST the endpoint already accepted is sent again when its lease runs out
                await self._finish(self._held, *self._held_outcome)
            while not self._closing:
                claimed = await db.claim_alert_deliveries(self._pool, self._owner, 1)
                if not claimed:
                    break
                self._held, self._held_outcome = claimed[0], ("released", None)
                self._held_outcome = await self._deliver(claimed[0])
                await self._finish(claimed[0], *self._held_outcome)
            due = None if self._closing else await db.next_alert_delivery_in(self._pool)
        except (psycopg.Error, OSError) as exc:
            # the database is away: the rows wait there; retry with a capped backoff
            self._db_failures += 1
            delay = min(self._poll_seconds, 0.5 * 2.0 ** min(self._db_failures, 10)) * random.uniform(0.5, 1.0)
            logger.warning(
                "alert delivery could not reach the database (%s); retrying in %.1fs", type(exc).__name__, delay,
                extra={"action": "alert_db_error", "delay_s": round(delay, 2)},
            )
            return delay
        except Exception:
            # a bug must not end alert delivery for good: log it, look again after the poll period
            logger.exception("alert delivery pass failed", extra={"action": "alert_error"})
            return self._poll_seconds
        self._db_failures = 0
        return self._poll_seconds if due is None else min(max(due, 0.05), self._poll_seconds)

    async def _finish(self, delivery: db.Delivery, outcome: db.DeliveryOutcome, reason: str | None) -> None:
        """Report back, retrying briefly: a delivered alert not marked delivered is sent again later."""
        for attempt in range(3):
            try:
                if not await db.finish_alert_delivery(self._pool, delivery.id, self._owner, outcome, reason):
                    logger.warning(
                        "alert delivery lease lost before it was finished",
                        extra={"action": "alert_lease_lost", "alert": delivery.label, "outcome": outcome},
                    )
                if self._held is delivery:
                    self._held = None
                return
            except (psycopg.Error, OSError):
                if attempt == 2:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))

    async def _deliver(self, delivery: db.Delivery) -> tuple[db.DeliveryOutcome, str | None]:
        body = json.dumps(delivery.payload).encode()
        reason: str | None = None
        for attempt in range(1, self.max_attempts + 1):
            reason, retry = await self._post(body)
            if reason is None:
                self.delivered += 1
                logger.info(
                    "alert delivered",
                    extra={"action": "alert_delivered", "target": self._origin, "alert": delivery.label,
                           "attempt": attempt},
                )
                return "delivered", None
            if not retry or attempt == self.max_attempts or self._closing:
                break
            delay = min(self.base_delay * 2 ** (attempt - 1), MAX_DELAY) * random.uniform(0.5, 1.0)
            logger.info(
                "alert delivery failed, retrying",
                extra={"action": "alert_retry", "target": self._origin, "alert": delivery.label,
                       "attempt": attempt, "reason": reason, "delay": round(delay, 2)},
            )
            await asyncio.sleep(delay)
        self.failed += 1
        logger.warning(
            "alert not delivered",
            extra={"action": "alert_failed", "target": self._origin, "alert": delivery.label,
                   "attempts": attempt, "reason": reason, "round": delivery.attempts},
        )
        return "failed", reason

    async def _post(self, body: bytes) -> tuple[str | None, bool]:
        """(None, _) when delivered, else (reason, worth retrying). The reason never holds the URL."""
        assert self._session is not None
        try:
            async with self._session.post(
                self._url, data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return None, False
                # other 4xx: the endpoint rejects this request as such; the same request will not fare better
                return f"HTTP {resp.status}", resp.status >= 500 or resp.status in (408, 425, 429)
        except TimeoutError:
            return "timeout", True
        except aiohttp.ClientError as exc:
            # type name only: aiohttp's messages can quote the URL
            return type(exc).__name__, True
