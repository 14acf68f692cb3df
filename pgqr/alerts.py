"""Forward `pgqr_alert` notifications to an HTTP endpoint (PGQR_ALERT_WEBHOOK_URL).

The listener calls `submit(notify.payload)` for each notification; delivery happens in the forwarder's own
task, with retries and exponential backoff with jitter, from a bounded queue that drops the oldest alert
when full. So a slow, failing or unreachable alert endpoint costs the refresh loop one deque append, never
a wait. Logs show the endpoint as scheme://host:port only: webhook URLs often carry their secret in the
user info, the path (Slack, Teams) or the query string.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections import deque
from urllib.parse import urlsplit

import aiohttp

__all__ = ["AlertForwarder", "safe_origin"]

logger = logging.getLogger("pgqr.alerts")

# Backoff cap: an endpoint down for minutes should not hold one alert for longer than the next evaluation.
MAX_DELAY = 60.0


def safe_origin(url: str) -> str:
    """scheme://host[:port] of `url`, without user info, path or query: safe to log."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}"


def _body(payload: str) -> tuple[bytes, str]:
    """The JSON body to POST and a short label (rule/state) for logs. Non-JSON text is wrapped, not lost."""
    try:
        parsed = json.loads(payload)
    except ValueError:
        return json.dumps({"payload": payload}).encode(), "unparsed"
    if not isinstance(parsed, dict):
        return payload.encode(), "unlabelled"
    return payload.encode(), f"{parsed.get('rule', '?')}/{parsed.get('state', '?')}"


class AlertForwarder:
    """POST each submitted alert payload as JSON to `url`, in the background.

    Counters: `delivered` (2xx), `failed` (gave up: retries exhausted, a 4xx that retrying will not fix, or
    cut off by close()), `dropped` (never attempted: pushed out of a full queue, or still queued at close).
    """

    def __init__(
        self,
        url: str,
        *,
        max_attempts: int = 5,
        base_delay: float = 1.0,
        timeout: float = 5.0,
        queue_size: int = 100,
    ) -> None:
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("the alert webhook URL must be http(s)")
        if max_attempts < 1 or queue_size < 1 or base_delay < 0 or timeout <= 0:
            raise ValueError("max_attempts and queue_size must be >= 1, base_delay >= 0, timeout > 0")
        self._url = url
        self._origin = safe_origin(url)
        self._max_attempts = max_attempts
        self._base_delay = base_delay
        self._timeout = timeout
        self._queue: deque[str] = deque()
        self._queue_size = queue_size
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing = False
        self.delivered = 0
        self.failed = 0
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Alerts queued and not yet attempted."""
        return len(self._queue)

    def submit(self, payload: str) -> None:
        """Queue one alert. Never blocks, never raises; when the queue is full the oldest alert is dropped."""
        try:
            if self._closing:
                self.dropped += 1
                return
            if len(self._queue) >= self._queue_size:
                self._queue.popleft()
                self.dropped += 1
                # a storm of alerts must not become a storm of log lines (or slow this call down)
                if self.dropped % 100 == 1:
                    logger.warning(
                        "alert queue full, dropping the oldest alerts",
                        extra={"action": "alert_dropped", "target": self._origin, "dropped": self.dropped},
                    )
            self._queue.append(payload)
            self._wakeup.set()
        except Exception:  # the caller is the refresh loop: an alert problem must never reach it
            logger.exception("could not queue an alert", extra={"action": "alert_submit_error"})

    async def start(self) -> None:
        """Start the delivery task (idempotent). Alerts submitted before start() wait in the queue."""
        if self._task is not None:
            return
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        self._task = asyncio.create_task(self._run(), name="pgqr-alert-forwarder")

    async def close(self, grace: float = 5.0) -> None:
        """Stop taking alerts, try to deliver what is queued for up to `grace` seconds, then stop."""
        self._closing = True
        self._wakeup.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=max(grace, 0))
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._queue:
            self.dropped += len(self._queue)
            logger.warning(
                "alert forwarder closed with alerts undelivered",
                extra={"action": "alert_dropped", "target": self._origin, "count": len(self._queue)},
            )
            self._queue.clear()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _run(self) -> None:
        while True:
            while self._queue:
                await self._deliver(self._queue.popleft())
            if self._closing:
                return
            # No await between the emptiness check and clear(): submit() cannot slip in unseen.
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _deliver(self, payload: str) -> None:
        body, label = _body(payload)
        try:
            for attempt in range(1, self._max_attempts + 1):
                reason, retry = await self._post(body)
                if reason is None:
                    self.delivered += 1
                    logger.info(
                        "alert delivered",
                        extra={"action": "alert_delivered", "target": self._origin, "alert": label,
                               "attempt": attempt},
                    )
                    return
                if not retry or attempt == self._max_attempts:
                    break
                delay = min(self._base_delay * 2 ** (attempt - 1), MAX_DELAY) * random.uniform(0.5, 1.0)
                logger.info(
                    "alert delivery failed, retrying",
                    extra={"action": "alert_retry", "target": self._origin, "alert": label,
                           "attempt": attempt, "reason": reason, "delay": round(delay, 2)},
                )
                await asyncio.sleep(delay)
            self.failed += 1
            logger.warning(
                "alert not delivered",
                extra={"action": "alert_failed", "target": self._origin, "alert": label,
                       "attempts": attempt, "reason": reason},
            )
        except asyncio.CancelledError:
            self.failed += 1
            raise

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
