"""The Evolution API client: pooled, bounded HTTP calls whose every reply becomes a typed outcome (replies.py),
never an exception. Secrets (the global API key, instance tokens) are sent only as the `apikey` header and never
appear in an outcome, a log line or an exception message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
from yarl import URL

from .replies import (
    EvolutionState,
    Failure,
    InstanceList,
    NoWebhook,
    Reply,
    WebhookConfig,
    classify_check_reply,
    classify_connect_reply,
    classify_connection_state_reply,
    classify_fetch_instances_reply,
    classify_webhook_reply,
    fail,
)
from .urls import api_base, instance_url

# The events pgqr's receiver acts on: a new QR, and the state that ends the wait
WEBHOOK_EVENTS = ("QRCODE_UPDATED", "CONNECTION_UPDATE")
_CHUNK = 64 * 1024

_T = TypeVar("_T")


class _TooLarge(Exception):
    """Internal signal: the body passed the size cap."""


@dataclass
class _NameLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class EvolutionClient:
    """A pooled, bounded aiohttp client for Evolution API. Never raises for a reply class."""

    def __init__(
        self, *, timeout: float = 8.0, max_reply_bytes: int = 1_048_576, concurrency: int = 16
    ) -> None:
        if timeout <= 0 or max_reply_bytes <= 0 or concurrency <= 0:
            raise ValueError("timeout, max_reply_bytes and concurrency must be positive")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._timeout_s = timeout
        self._max_reply_bytes = max_reply_bytes
        self._concurrency = concurrency
        self._semaphore = asyncio.Semaphore(concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._locks: dict[tuple[str, str], _NameLock] = {}

    async def __aenter__(self) -> EvolutionClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def connect(
        self, base_url: str, instance_name: str, apikey: str, *, number: str | None = None
    ) -> Reply:
        """GET /instance/connect/{name}; `number` asks Evolution for a phone pairing code."""
        url = instance_url(base_url, "instance/connect", instance_name)
        if isinstance(url, Failure):
            return Reply(url, 0.0)
        if number is not None:
            url += f"?number={quote(number, safe='')}"
        # Concurrent connects while `close` each open a WhatsApp socket (section 5): serialise them.
        async with self._serialised(base_url.rstrip("/"), instance_name):
            return Reply(*await self._timed_call("GET", url, apikey, classify_connect_reply))

    async def connection_state(self, base_url: str, instance_name: str, apikey: str) -> EvolutionState | Failure:
        """GET /instance/connectionState/{name}: Evolution's in-memory state, read without side effects."""
        url = instance_url(base_url, "instance/connectionState", instance_name)
        if isinstance(url, Failure):
            return url
        return await self._call("GET", url, apikey, classify_connection_state_reply)

    async def fetch_instances(self, base_url: str, apikey: str) -> InstanceList | Failure:
        """GET /instance/fetchInstances: every instance for the global key, only its own for an instance token."""
        base = api_base(base_url)
        if isinstance(base, Failure):
            return base
        return await self._call("GET", f"{base}/instance/fetchInstances", apikey,
                                lambda s, b: classify_fetch_instances_reply(s, b, apikey))

    async def set_webhook(
        self, base_url: str, instance_name: str, apikey: str, *, url: str, headers: dict[str, str] | None = None,
        events: Sequence[str] = WEBHOOK_EVENTS,
    ) -> WebhookConfig | Failure:
        """POST /webhook/set/{name} with v2's nested body (>= 2.1.0) and an explicit event list: without one
        Evolution 2.3 answers 500, and `[]` would subscribe to every event."""
        target = instance_url(base_url, "webhook/set", instance_name)
        if isinstance(target, Failure):
            return target
        hook: dict[str, Any] = {"enabled": True, "url": url, "byEvents": False, "base64": False,
                                "events": list(events)}
        if headers is not None:
            hook["headers"] = headers
        row = await self._call("POST", target, apikey, classify_webhook_reply, body={"webhook": hook})
        if isinstance(row, NoWebhook):  # set answers the stored row, never null
            return fail("bad_reply", row.http_status, "webhook/set answered null")
        return row

    async def find_webhook(
        self, base_url: str, instance_name: str, apikey: str
    ) -> WebhookConfig | NoWebhook | Failure:
        """GET /webhook/find/{name}: the instance's webhook row, or NoWebhook."""
        url = instance_url(base_url, "webhook/find", instance_name)
        if isinstance(url, Failure):
            return url
        return await self._call("GET", url, apikey, classify_webhook_reply)

    async def check_key(self, base_url: str, apikey: str) -> Reply:
        """GET /instance/fetchInstances: NoQrYet(count=None) means the key is accepted."""
        base = api_base(base_url)
        if isinstance(base, Failure):
            return Reply(base, 0.0)
        return Reply(*await self._timed_call("GET", f"{base}/instance/fetchInstances", apikey, classify_check_reply))

    @asynccontextmanager
    async def _serialised(self, base: str, name: str) -> AsyncIterator[None]:
        key = (base, name)
        entry = self._locks.setdefault(key, _NameLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                # Drop idle locks so a long-running service does not keep one per name forever.
                del self._locks[key]

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._concurrency)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def _call(
        self, method: str, url: str, apikey: str, classify: Callable[[int, bytes], _T], body: Any = None
    ) -> _T | Failure:
        return (await self._timed_call(method, url, apikey, classify, body))[0]

    async def _timed_call(
        self, method: str, url: str, apikey: str, classify: Callable[[int, bytes], _T], body: Any = None
    ) -> tuple[_T | Failure, float]:
        """The outcome and the call's own milliseconds (not the wait for a slot)."""
        async with self._semaphore:
            started = time.perf_counter()
            outcome = await self._fetch(method, url, apikey, classify, body)
            return outcome, (time.perf_counter() - started) * 1000.0

    async def _fetch(
        self, method: str, url: str, apikey: str, classify: Callable[[int, bytes], _T], body: Any
    ) -> _T | Failure:
        session = self._get_session()
        try:
            async with session.request(
                method,
                URL(url, encoded=True),
                headers={"apikey": apikey, "Accept": "application/json"},
                json=body,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                try:
                    raw = await self._read_capped(resp)
                except _TooLarge:
                    return fail("too_large", resp.status, f"reply larger than {self._max_reply_bytes} bytes")
                return classify(resp.status, raw)
        except TimeoutError:
            # Checked before ClientError: aiohttp's timeout errors subclass both.
            return fail("timeout", None, f"no complete reply within {self._timeout_s:g}s")
        except aiohttp.ClientError as exc:
            return fail("network", None, _network_detail(exc))
        except ValueError:
            # yarl/aiohttp reject a malformed base URL (a row's evolution_url, say) only when it is used
            return fail("config", None, "the Evolution base URL is not a valid URL")

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        """Read the body in chunks, stopping as soon as it passes the cap."""
        declared = resp.content_length
        if declared is not None and declared > self._max_reply_bytes:
            raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > self._max_reply_bytes:
                raise _TooLarge
            chunks.append(chunk)
        return b"".join(chunks)


def _network_detail(exc: aiohttp.ClientError) -> str:
    """Name the failure without the exception text, which can echo URLs or headers."""
    reason = ""
    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, OSError) and os_error.strerror:
        reason = f": {os_error.strerror}"
    return f"network error ({type(exc).__name__}){reason}"
