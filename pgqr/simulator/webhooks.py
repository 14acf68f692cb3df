"""Webhook configuration rows and delivery, as Evolution does them (evolution-api.md sections 4 and 9).

Delivery uses a fixed pool of workers, not a task per instance: each instance's events wait in its own queue
and one worker at a time drains it, so they arrive in order (Evolution awaits each post in its emit chain)
while 10,000 instances cost no more tasks than 10.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from .config import SimConfig
from .lifecycle import Instance

__all__ = ["ALL_EVENTS", "GLOBAL_EVENTS", "WebhookDelivery", "Webhooks", "now_iso", "webhook_row"]

# Evolution's event enum (EventController.events, 2.3): the names /webhook/set accepts, and what `events: []`
# stands for.
ALL_EVENTS: tuple[str, ...] = (
    "APPLICATION_STARTUP", "QRCODE_UPDATED", "MESSAGES_SET", "MESSAGES_UPSERT", "MESSAGES_EDITED",
    "MESSAGES_UPDATE", "MESSAGES_DELETE", "SEND_MESSAGE", "SEND_MESSAGE_UPDATE", "CONTACTS_SET",
    "CONTACTS_UPSERT", "CONTACTS_UPDATE", "PRESENCE_UPDATE", "CHATS_SET", "CHATS_UPSERT", "CHATS_UPDATE",
    "CHATS_DELETE", "GROUPS_UPSERT", "GROUP_UPDATE", "GROUP_PARTICIPANTS_UPDATE", "CONNECTION_UPDATE",
    "LABELS_EDIT", "LABELS_ASSOCIATION", "CALL", "TYPEBOT_START", "TYPEBOT_CHANGE_STATUS", "REMOVE_INSTANCE",
    "LOGOUT_INSTANCE", "INSTANCE_CREATE", "INSTANCE_DELETE", "STATUS_INSTANCE",
)
# What .env.example enables for the global webhook (WEBHOOK_EVENTS_*=true).
GLOBAL_EVENTS = frozenset({"QRCODE_UPDATED", "CONNECTION_UPDATE"})


@dataclass(frozen=True)
class WebhookDelivery:
    """One webhook POST attempt; `status` is None when it failed before a reply."""

    url: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int | None
    error: str | None = None


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def webhook_row(old: dict[str, Any] | None, hook: dict[str, Any], *, instance_id: str, new_id: str) -> dict[str, Any]:
    """The row /webhook/set stores (and /webhook/find returns) for a validated `webhook` object."""
    now = now_iso()
    headers = hook.get("headers")
    if not isinstance(headers, dict):
        # null when never given; a later set without headers keeps the old ones (section 9)
        headers = old["headers"] if old is not None else None
    events = hook.get("events") or list(ALL_EVENTS)  # [] subscribes to everything
    return {
        "id": old["id"] if old is not None else new_id,
        "url": hook["url"],
        "headers": headers,
        "enabled": bool(hook.get("enabled", True)),
        "events": [str(e) for e in events],
        "webhookByEvents": bool(hook.get("byEvents", False)),
        "webhookBase64": bool(hook.get("base64", False)),
        "createdAt": old["createdAt"] if old is not None else now,
        "updatedAt": now,
        "instanceId": instance_id,
    }


def _jwt(key: str) -> str:
    """HS256 JWT Evolution sends when a per-instance webhook header has `jwt_key` (2.3.0+)."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    now = int(time.time())
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps({"iat": now, "exp": now + 600, "app": "evolution", "action": "webhook"}).encode())
    sig = hmac.new(key.encode(), f"{head}.{payload}".encode(), hashlib.sha256).digest()
    return f"{head}.{payload}.{b64(sig)}"


def _instance_headers(configured: dict[str, Any] | None) -> dict[str, str]:
    configured = configured or {}
    headers = {k: str(v) for k, v in configured.items() if k != "jwt_key"}
    jwt_key = configured.get("jwt_key")
    if isinstance(jwt_key, str) and jwt_key:
        headers["Authorization"] = f"Bearer {_jwt(jwt_key)}"
    return headers


_Job = tuple[str, dict[str, str], dict[str, Any]]


class Webhooks:
    """Turns an instance's events into posts to its own and the global webhook, and delivers them."""

    def __init__(self, config: SimConfig, server_url: Callable[[], str]) -> None:
        self.config = config
        self._server_url = server_url
        self.deliveries: deque[WebhookDelivery] = deque(maxlen=config.webhook_record_limit)
        self.failures = 0
        self._pending: dict[str, deque[_Job]] = {}
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None

    def wanted(self, inst: Instance) -> bool:
        """Would a qrcode.updated of this instance be posted anywhere?"""
        return bool(self.config.global_webhook_url) or (inst.webhook is not None and inst.webhook["enabled"])

    def emit(self, inst: Instance, event: str, data: dict[str, Any] | None) -> None:
        """Queue one event for every subscribed webhook; never blocks the caller."""
        upper, hyphen = event.upper().replace(".", "_"), event.replace(".", "-")
        targets: list[tuple[str, dict[str, str]]] = []
        hook = inst.webhook
        if hook is not None and hook["enabled"] and upper in hook["events"]:
            url = f"{hook['url']}/{hyphen}" if hook["webhookByEvents"] else hook["url"]
            targets.append((url, _instance_headers(hook["headers"])))
        global_url = self.config.global_webhook_url
        if global_url and upper in GLOBAL_EVENTS:
            url = f"{global_url}/{hyphen}" if self.config.global_webhook_by_events else global_url
            targets.append((url, {}))  # the global webhook sends no custom headers
        if not targets:
            return
        envelope = self._envelope(inst, event, data, hyphen)
        queue = self._pending.get(inst.name)
        if queue is None:
            queue = self._pending[inst.name] = deque()
            self._ready.put_nowait(inst.name)
        queue.extend((url, headers, envelope) for url, headers in targets)

    def _envelope(self, inst: Instance, event: str, data: dict[str, Any] | None, hyphen: str) -> dict[str, Any]:
        hook = inst.webhook
        destination = hook["url"] if hook is not None else f"{self.config.global_webhook_url}/{hyphen}"
        # Evolution formats server-local time with a trailing Z (not true UTC unless TZ=UTC).
        local = datetime.now().isoformat(timespec="milliseconds") + "Z"
        envelope: dict[str, Any] = {
            "event": event, "instance": inst.name, "data": data, "destination": destination, "date_time": local,
        }
        if inst.wuid is not None:
            envelope["sender"] = inst.wuid  # undefined before login, so absent from QR events
        envelope["server_url"] = self._server_url()
        envelope["apikey"] = inst.token if self.config.expose_token_in_webhook else None
        return envelope

    # ---- delivery ----

    def start(self) -> None:
        self._http = aiohttp.ClientSession()
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._work()) for _ in range(max(1, self.config.webhook_workers))]

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        self._pending.clear()
        self._ready = asyncio.Queue()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _work(self) -> None:
        while True:
            name = await self._ready.get()
            queue = self._pending[name]
            while queue:
                await self._deliver(*queue[0])
                queue.popleft()
            del self._pending[name]  # no await since the last check: nothing can have been queued meanwhile

    async def _deliver(self, url: str, headers: dict[str, str], body: dict[str, Any]) -> None:
        status: int | None = None
        error: str | None = None
        try:
            if self._http is None:
                raise RuntimeError("simulator is not started")
            timeout = aiohttp.ClientTimeout(total=self.config.webhook_timeout)
            async with self._http.post(url, json=body, headers=headers, timeout=timeout) as resp:
                status = resp.status
                with contextlib.suppress(aiohttp.ClientError):
                    await resp.read()
        except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError) as exc:
            error = type(exc).__name__
        if status is None or status >= 400:
            self.failures += 1
        self.deliveries.append(WebhookDelivery(url, headers, body, status, error))
