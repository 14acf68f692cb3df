"""Evolution API client: every reply becomes a typed outcome value, never an exception.

The reply classes and their meaning come from docs evolution-api.md (sections 1 and 2).
Secrets (the global API key, instance tokens) are sent only as the `apikey` header and never
appear in an outcome, a log line or an exception message.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
from yarl import URL

__all__ = [
    "Connected",
    "ErrorClass",
    "EvolutionClient",
    "Failure",
    "NoQrYet",
    "Outcome",
    "QrCode",
    "Reply",
    "classify_connect_reply",
]

ErrorClass = Literal[
    "not_found",
    "unauthorized",
    "api_error",
    "empty_reply",
    "bad_reply",
    "not_activated",
    "http_error",
    "too_large",
    "server_error",
    "timeout",
    "network",
    # an instance that cannot be called: no or a malformed base URL, no key
    "config",
    # never returned by the client: the reconcile loop's class for a bug it caught around one call
    "internal",
]


@dataclass(frozen=True)
class QrCode:
    """A QR to show: `code` is the raw string, `base64` the data-URL PNG Evolution rendered."""

    code: str
    base64: str
    pairing_code: str | None
    count: int | None
    http_status: int = 200


@dataclass(frozen=True)
class NoQrYet:
    """A successful reply without a new QR (`{"count":0}`, or a socket still starting)."""

    count: int | None
    http_status: int = 200


@dataclass(frozen=True)
class Connected:
    """The instance is `open`: the user has scanned, there is nothing to refresh."""

    http_status: int = 200


@dataclass(frozen=True)
class Failure:
    """A reply that carries no QR. `detail` is short, human and never holds a secret."""

    error_class: ErrorClass
    transient: bool
    http_status: int | None
    detail: str


Outcome = QrCode | NoQrYet | Connected | Failure


@dataclass(frozen=True)
class Reply:
    outcome: Outcome
    latency_ms: float


# Keys that only the connect reply's QR getter produces; a 2xx dict with none of them is not
# something Evolution sends, so it is reported as bad_reply instead of silently "no QR".
_QR_KEYS = frozenset({"code", "base64", "count", "pairingCode"})
_CHUNK = 64 * 1024


def _fail(error_class: ErrorClass, status: int | None, what: str, *, transient: bool = False) -> Failure:
    prefix = f"HTTP {status}: " if status is not None else ""
    return Failure(error_class, transient, status, prefix + what)


def _parse_json(body: bytes) -> Any:
    """The decoded JSON value, or a sentinel `_NOT_JSON` when the body is not JSON."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _NOT_JSON


_NOT_JSON = object()


def _classify_error_status(status: int, body: bytes) -> Failure:
    """Map a non-2xx status to a Failure (evolution-api.md section 1)."""
    if status == 404:
        parsed = _parse_json(body)
        # An unknown route also answers 404 ("Cannot GET /..."): usually a wrong base URL.
        if isinstance(parsed, dict) and "Cannot " in str(parsed.get("response", "")):
            return _fail("not_found", status, "route not found (check the base URL)")
        return _fail("not_found", status, "instance does not exist")
    if status == 401:
        return _fail("unauthorized", status, "API key or instance token rejected")
    if status == 503:
        parsed = _parse_json(body)
        if isinstance(parsed, dict) and parsed.get("code") == "LICENSE_REQUIRED":
            return _fail("not_activated", status, "Evolution API is not activated (LICENSE_REQUIRED)")
    if status >= 500:
        return _fail("server_error", status, "server error", transient=True)
    # Evolution itself never sends 408/429 (no rate limiting), but a proxy in front of it may,
    # and both mean "try again later".
    if status in (408, 429):
        return _fail("http_error", status, "request throttled or timed out by a proxy", transient=True)
    if 300 <= status < 400:
        # Redirects are not followed so the apikey header never travels to another host.
        return _fail("http_error", status, "unexpected redirect (check the base URL)")
    return _fail("http_error", status, "unexpected client error")


def _classify_qr_body(status: int, parsed: dict[str, Any]) -> Outcome:
    """Map a 2xx JSON object from /instance/connect to an outcome."""
    if parsed.get("error") is True:
        # Evolution's controller catch: instance row exists but is not loaded in memory.
        return _fail("api_error", status, "Evolution returned an error object (instance not loaded?)")
    instance = parsed.get("instance")
    if isinstance(instance, dict):
        if instance.get("state") == "open":
            return Connected(http_status=status)
        return NoQrYet(count=None, http_status=status)
    if not _QR_KEYS & parsed.keys():
        return _fail("bad_reply", status, "reply has an unexpected shape")
    count = parsed.get("count")
    pairing = parsed.get("pairingCode")
    if (count is not None and (not isinstance(count, int) or isinstance(count, bool))) or (
        pairing is not None and not isinstance(pairing, str)
    ):
        return _fail("bad_reply", status, "reply fields have unexpected types")
    code, b64 = parsed.get("code"), parsed.get("base64")
    if isinstance(code, str) and code and isinstance(b64, str) and b64:
        return QrCode(code=code, base64=b64, pairing_code=pairing, count=count, http_status=status)
    return NoQrYet(count=count, http_status=status)


def classify_connect_reply(status: int, body: bytes) -> Outcome:
    """Pure mapping of one /instance/connect HTTP reply to an outcome."""
    if not 200 <= status < 300:
        return _classify_error_status(status, body)
    if not body.strip():
        return _fail("empty_reply", status, "empty reply body (Evolution v1.8 controller error)")
    parsed = _parse_json(body)
    if parsed is _NOT_JSON:
        return _fail("bad_reply", status, "reply is not JSON")
    if not isinstance(parsed, dict):
        return _fail("bad_reply", status, "reply has an unexpected shape")
    return _classify_qr_body(status, parsed)


def _classify_check_reply(status: int, body: bytes) -> Outcome:
    """fetchInstances for `doctor`: any 2xx means the key works."""
    if 200 <= status < 300:
        return NoQrYet(count=None, http_status=status)
    return _classify_error_status(status, body)


_Classifier = Callable[[int, bytes], Outcome]


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
        base = base_url.rstrip("/")
        url = f"{base}/instance/connect/{quote(instance_name, safe='')}"
        if number is not None:
            url += f"?number={quote(number, safe='')}"
        # Concurrent connects while `close` each open a WhatsApp socket (section 5): serialise them.
        async with self._serialised(base, instance_name):
            return await self._call(url, apikey, classify_connect_reply)

    async def check_key(self, base_url: str, apikey: str) -> Reply:
        """GET /instance/fetchInstances: NoQrYet(count=None) means the key is accepted."""
        url = f"{base_url.rstrip('/')}/instance/fetchInstances"
        return await self._call(url, apikey, _classify_check_reply)

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

    async def _call(self, url: str, apikey: str, classify: _Classifier) -> Reply:
        async with self._semaphore:
            started = time.perf_counter()
            outcome = await self._fetch(url, apikey, classify)
            return Reply(outcome, (time.perf_counter() - started) * 1000.0)

    async def _fetch(self, url: str, apikey: str, classify: _Classifier) -> Outcome:
        session = self._get_session()
        try:
            async with session.get(
                URL(url, encoded=True),
                headers={"apikey": apikey, "Accept": "application/json"},
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                try:
                    body = await self._read_capped(resp)
                except _TooLarge:
                    return _fail("too_large", resp.status, f"reply larger than {self._max_reply_bytes} bytes")
                return classify(resp.status, body)
        except TimeoutError:
            # Checked before ClientError: aiohttp's timeout errors subclass both.
            return _fail("timeout", None, f"no complete reply within {self._timeout_s:g}s", transient=True)
        except aiohttp.ClientError as exc:
            return _fail("network", None, _network_detail(exc), transient=True)
        except ValueError:
            # yarl/aiohttp reject a malformed base URL (a row's evolution_url, say) only when it is used
            return _fail("config", None, "the Evolution base URL is not a valid URL")

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
