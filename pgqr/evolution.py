"""Evolution API client: every reply becomes a typed outcome value, never an exception.

The reply classes and their meaning come from docs evolution-api.md (sections 1 and 2).
Secrets (the global API key, instance tokens) are sent only as the `apikey` header and never
appear in an outcome, a log line or an exception message.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
from yarl import URL

__all__ = [
    "ERROR_CLASSES",
    "Connected",
    "ErrorClass",
    "ErrorClassInfo",
    "EvolutionClient",
    "EvolutionState",
    "Failure",
    "InstanceList",
    "InstanceRow",
    "NoQrYet",
    "NoWebhook",
    "Outcome",
    "QrCode",
    "Reply",
    "WebhookConfig",
    "classify_connect_reply",
    "classify_connection_state_reply",
    "classify_fetch_instances_reply",
    "classify_webhook_reply",
    "display_url",
]

ErrorClass = Literal[
    "not_found", "unauthorized", "not_loaded", "api_error", "empty_reply", "bad_reply", "bad_request",
    "not_activated", "http_error", "throttled", "too_large", "server_error", "timeout", "network", "config",
    "internal", "app_refused",
]



def is_http_url(raw: str) -> bool:
    """An http(s) URL with a host and a valid port (a setting's, or a row's URL column)."""
    try:
        url = URL(raw)
        return url.scheme in ("http", "https") and bool(url.host) and url.port is not None
    except (ValueError, TypeError):
        return False

@dataclass(frozen=True)
class ErrorClassInfo:
    transient: bool  # retry soon: the same call is expected to succeed later without anyone changing anything
    meaning: str
    backoff_base: float  # seconds before the first retry; a transient class doubles it per failure
    backoff_max: float   # the cap (a permanent class always waits backoff_base: someone must fix something)


# The one table of error classes: Failure.transient comes from here; `pgqr migrate` copies it into
# pgqr.error_classes (where the write path reads the backoff) and the README lists it.
ERROR_CLASSES: dict[str, ErrorClassInfo] = {
    "not_found": ErrorClassInfo(False, "Evolution has no instance of that name, or the base URL is wrong (404)",
                                1800, 1800),
    "unauthorized": ErrorClassInfo(False, "the API key or instance token was rejected (401)", 1800, 1800),
    "not_loaded": ErrorClassInfo(
        True, "the instance is in Evolution's database but not loaded in memory yet (after a restart); "
              "recovers in seconds", 2, 60),
    "api_error": ErrorClassInfo(False, "Evolution answered 200 with an error object", 1800, 1800),
    "empty_reply": ErrorClassInfo(False, "200 with an empty body (Evolution v1.8's controller error)", 300, 300),
    "bad_reply": ErrorClassInfo(
        False, "a reply Evolution does not send: not JSON, another shape, a field of the wrong type or range",
        300, 300),
    "bad_request": ErrorClassInfo(False, "Evolution refused the request body as invalid (400)", 1800, 1800),
    "not_activated": ErrorClassInfo(False, "Evolution 2.4 is not activated (503 LICENSE_REQUIRED)", 1800, 1800),
    "http_error": ErrorClassInfo(False, "an HTTP status Evolution does not send here (a redirect, another 4xx)",
                                 900, 900),
    "throttled": ErrorClassInfo(True, "a proxy in front of Evolution throttled or timed out the call (408, 429)",
                                10, 300),
    "too_large": ErrorClassInfo(False, "the reply was larger than the size cap", 300, 300),
    "server_error": ErrorClassInfo(True, "Evolution or a proxy in front of it failed (5xx)", 10, 600),
    "timeout": ErrorClassInfo(True, "no complete reply within the timeout (a connect on a closed instance can "
                                    "take 8 s and more: backs off, never retried at once)", 10, 300),
    "network": ErrorClassInfo(True, "the connection failed (refused, reset, name resolution)", 5, 300),
    "config": ErrorClassInfo(
        True, "the instance cannot be called as configured (no or a malformed base URL, no key, the name . "
              "or ..); retried, so a fixed row heals", 60, 900),
    "internal": ErrorClassInfo(
        True, "a bug caught around one call (the reconcile loop's class; the client never returns it)", 30, 900),
    "app_refused": ErrorClassInfo(
        False, "the app's own table refused pgqr's write (a CHECK, trigger, row security or exclusion constraint; "
               "the refresh log's detail has its SQLSTATE and message): the call worked, nothing was written",
        300, 300),
}


def error_class_table() -> str:
    """The README's table of error classes."""
    rows = ["| class | transient | first retry | cap | meaning |", "|---|---|---|---|---|"]
    for name, info in ERROR_CLASSES.items():
        rows.append(f"| `{name}` | {'yes' if info.transient else 'no'} | {info.backoff_base:g} s | "
                    f"{info.backoff_max:g} s | {info.meaning} |")
    return "\n".join(rows)


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
StateName = Literal["open", "connecting", "close"]


@dataclass(frozen=True)
class EvolutionState:
    """connectionState: the in-memory state, or None for an instance Evolution has not loaded."""

    state: StateName | None
    http_status: int = 200


@dataclass(frozen=True)
class InstanceRow:
    """One fetchInstances row. The row's `token` is never kept: only whether it equals the key that asked."""

    name: str
    connection_status: str | None
    holds_key: bool


@dataclass(frozen=True)
class InstanceList:
    rows: tuple[InstanceRow, ...]
    http_status: int = 200

    @property
    def key_scope(self) -> Literal["global", "instance", "unknown"]:
        """A global key sees every instance; an instance token only the row(s) holding it (section 9)."""
        if any(not row.holds_key for row in self.rows):
            return "global"
        return "instance" if self.rows else "unknown"


@dataclass(frozen=True)
class WebhookConfig:
    """A webhook/set or webhook/find row. Header values may be secrets: kept out of repr and comparisons, only
    for constant-time checks against what the receiver expects."""

    url: str = field(repr=False)  # may carry the receiver's secret in its path
    enabled: bool
    events: tuple[str, ...]
    by_events: bool
    base64: bool
    header_names: tuple[str, ...]
    http_status: int = 200
    header_values: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class NoWebhook:
    """webhook/find answered null: no webhook is set for the instance."""

    http_status: int = 200


@dataclass(frozen=True)
class Reply:
    outcome: Outcome
    latency_ms: float


# Keys that only the connect reply's QR getter produces; a 2xx dict with none of them is not
# something Evolution sends, so it is reported as bad_reply instead of silently "no QR".
_QR_KEYS = frozenset({"code", "base64", "count", "pairingCode"})
_CHUNK = 64 * 1024
_MAX_COUNT = 2**31 - 1  # Evolution's count is a JS number kept in an int column; more is not a count
_MAX_PAIRING = 32  # Evolution's pairing codes have 8 characters
_STATES: tuple[StateName, ...] = ("open", "connecting", "close")
_NOT_LOADED = {"error": True, "message": "[object Object]"}
WEBHOOK_EVENTS = ("QRCODE_UPDATED", "CONNECTION_UPDATE")


def _fail(error_class: ErrorClass, status: int | None, what: str) -> Failure:
    prefix = f"HTTP {status}: " if status is not None else ""
    return Failure(error_class, ERROR_CLASSES[error_class].transient, status, prefix + what)


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
        return _fail("server_error", status, "server error")
    # Evolution itself never sends 408/429 (no rate limiting), but a proxy in front of it may,
    # and both mean "try again later".
    if status in (408, 429):
        return _fail("throttled", status, "request throttled or timed out by a proxy")
    if status == 400:
        return _fail("bad_request", status, "Evolution refused the request as invalid")
    if 300 <= status < 400:
        # Redirects are not followed so the apikey header never travels to another host.
        return _fail("http_error", status, "unexpected redirect (check the base URL)")
    return _fail("http_error", status, "unexpected client error")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_COUNT


def _qr_fields_problem(parsed: dict[str, Any]) -> str | None:
    """Why the QR getter's fields are not what Evolution sends (None when they are)."""
    count, pairing = parsed.get("count"), parsed.get("pairingCode")
    code, b64 = parsed.get("code"), parsed.get("base64")
    if count is not None and not _is_count(count):
        return f"count is not an integer in 0..{_MAX_COUNT}"
    if pairing is not None and not (isinstance(pairing, str) and 0 < len(pairing) <= _MAX_PAIRING):
        return "pairingCode is not a short string"
    if code is not None and not (isinstance(code, str) and code):
        return "code is not a string"
    if b64 is not None and not (isinstance(b64, str) and b64.startswith("data:image/")):
        return "base64 is not a data:image/ URL"
    if (code is None) != (b64 is None):
        return "code and base64 come together"
    return None


def _classify_qr_body(status: int, parsed: dict[str, Any]) -> Outcome:
    """Map a 2xx JSON object from /instance/connect to an outcome."""
    if parsed.get("error") is True:
        if parsed == _NOT_LOADED:
            # The controller's catch for a DB row not (yet) in memory: Evolution reloads it within seconds.
            return _fail("not_loaded", status, "the instance is not loaded in Evolution's memory yet")
        return _fail("api_error", status, "Evolution returned an error object")
    instance = parsed.get("instance")
    if isinstance(instance, dict):
        state = instance.get("state")
        if state is not None and state not in _STATES:
            return _fail("bad_reply", status, "instance.state is not open, connecting or close")
        return Connected(http_status=status) if state == "open" else NoQrYet(count=None, http_status=status)
    if not _QR_KEYS & parsed.keys():
        return _fail("bad_reply", status, "reply has an unexpected shape")
    if (problem := _qr_fields_problem(parsed)) is not None:
        return _fail("bad_reply", status, problem)
    count, pairing = parsed.get("count"), parsed.get("pairingCode")
    code, b64 = parsed.get("code"), parsed.get("base64")
    if isinstance(code, str) and isinstance(b64, str):
        return QrCode(code=code, base64=b64, pairing_code=pairing, count=count, http_status=status)
    return NoQrYet(count=count, http_status=status)


def _json_reply(status: int, body: bytes) -> Failure | Any:
    """The JSON value of a 2xx reply, or the Failure for a non-2xx, empty or non-JSON one."""
    if not 200 <= status < 300:
        return _classify_error_status(status, body)
    if not body.strip():
        return _fail("empty_reply", status, "empty reply body (Evolution v1.8 controller error)")
    parsed = _parse_json(body)
    if parsed is _NOT_JSON:
        return _fail("bad_reply", status, "reply is not JSON")
    return parsed


def classify_connect_reply(status: int, body: bytes) -> Outcome:
    """Pure mapping of one /instance/connect HTTP reply to an outcome."""
    parsed = _json_reply(status, body)
    if isinstance(parsed, Failure):
        return parsed
    if not isinstance(parsed, dict):
        return _fail("bad_reply", status, "reply has an unexpected shape")
    return _classify_qr_body(status, parsed)


def classify_connection_state_reply(status: int, body: bytes) -> EvolutionState | Failure:
    """/instance/connectionState: {"instance": {"instanceName", "state"?}}; no state = not in memory."""
    parsed = _json_reply(status, body)
    if isinstance(parsed, Failure):
        return parsed
    instance = parsed.get("instance") if isinstance(parsed, dict) else None
    if not isinstance(instance, dict) or not isinstance(instance.get("instanceName"), str):
        return _fail("bad_reply", status, "reply has an unexpected shape")
    state = instance.get("state")
    if state is None:
        return EvolutionState(None, status)
    if state not in _STATES:
        return _fail("bad_reply", status, "instance.state is not open, connecting or close")
    return EvolutionState(state, status)


def classify_fetch_instances_reply(status: int, body: bytes, key: str) -> InstanceList | Failure:
    """/instance/fetchInstances (v2): an array of DB rows; each row's token is compared with `key`, not kept."""
    parsed = _json_reply(status, body)
    if isinstance(parsed, Failure):
        return parsed
    if not isinstance(parsed, list):
        return _fail("bad_reply", status, "reply is not an array of instances")
    rows = []
    for row in parsed:
        name = row.get("name") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(name, str):
            return _fail("bad_reply", status, "an instance row has no name")
        token, connection = row.get("token"), row.get("connectionStatus")
        holds_key = isinstance(token, str) and hmac.compare_digest(token.encode(), key.encode())
        rows.append(InstanceRow(name, connection if isinstance(connection, str) else None, holds_key))
    return InstanceList(tuple(rows), status)


def classify_webhook_reply(status: int, body: bytes) -> WebhookConfig | NoWebhook | Failure:
    """/webhook/set (201 and the row) and /webhook/find (the row, or null)."""
    parsed = _json_reply(status, body)
    if isinstance(parsed, Failure):
        return parsed
    if parsed is None:
        return NoWebhook(status)
    if not isinstance(parsed, dict):
        return _fail("bad_reply", status, "reply has an unexpected shape")
    url, enabled, events = parsed.get("url"), parsed.get("enabled"), parsed.get("events")
    headers = parsed.get("headers")
    if (not isinstance(url, str) or not isinstance(enabled, bool) or not isinstance(events, list)
            or not all(isinstance(e, str) for e in events) or not isinstance(headers, dict | None)):
        return _fail("bad_reply", status, "the webhook row has unexpected fields")
    return WebhookConfig(
        url=url, enabled=enabled, events=tuple(events), by_events=parsed.get("webhookByEvents") is True,
        base64=parsed.get("webhookBase64") is True, header_names=tuple(sorted(headers or {})), http_status=status,
        header_values=tuple((str(k), v) for k, v in sorted((headers or {}).items()) if isinstance(v, str)))


def _classify_check_reply(status: int, body: bytes) -> Outcome:
    """fetchInstances for `doctor`: any 2xx means the key works."""
    if 200 <= status < 300:
        return NoQrYet(count=None, http_status=status)
    return _classify_error_status(status, body)


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
        url = _instance_url(base_url, "instance/connect", instance_name)
        if isinstance(url, Failure):
            return Reply(url, 0.0)
        if number is not None:
            url += f"?number={quote(number, safe='')}"
        # Concurrent connects while `close` each open a WhatsApp socket (section 5): serialise them.
        async with self._serialised(base_url.rstrip("/"), instance_name):
            return Reply(*await self._timed_call("GET", url, apikey, classify_connect_reply))

    async def connection_state(self, base_url: str, instance_name: str, apikey: str) -> EvolutionState | Failure:
        """GET /instance/connectionState/{name}: Evolution's in-memory state, read without side effects."""
        url = _instance_url(base_url, "instance/connectionState", instance_name)
        if isinstance(url, Failure):
            return url
        return await self._call("GET", url, apikey, classify_connection_state_reply)

    async def fetch_instances(self, base_url: str, apikey: str) -> InstanceList | Failure:
        """GET /instance/fetchInstances: every instance for the global key, only its own for an instance token."""
        base = _base(base_url)
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
        target = _instance_url(base_url, "webhook/set", instance_name)
        if isinstance(target, Failure):
            return target
        hook: dict[str, Any] = {"enabled": True, "url": url, "byEvents": False, "base64": False,
                                "events": list(events)}
        if headers is not None:
            hook["headers"] = headers
        row = await self._call("POST", target, apikey, classify_webhook_reply, body={"webhook": hook})
        if isinstance(row, NoWebhook):  # set answers the stored row, never null
            return _fail("bad_reply", row.http_status, "webhook/set answered null")
        return row

    async def find_webhook(
        self, base_url: str, instance_name: str, apikey: str
    ) -> WebhookConfig | NoWebhook | Failure:
        """GET /webhook/find/{name}: the instance's webhook row, or NoWebhook."""
        url = _instance_url(base_url, "webhook/find", instance_name)
        if isinstance(url, Failure):
            return url
        return await self._call("GET", url, apikey, classify_webhook_reply)

    async def check_key(self, base_url: str, apikey: str) -> Reply:
        """GET /instance/fetchInstances: NoQrYet(count=None) means the key is accepted."""
        base = _base(base_url)
        if isinstance(base, Failure):
            return Reply(base, 0.0)
        return Reply(*await self._timed_call("GET", f"{base}/instance/fetchInstances", apikey, _classify_check_reply))

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
                    return _fail("too_large", resp.status, f"reply larger than {self._max_reply_bytes} bytes")
                return classify(resp.status, raw)
        except TimeoutError:
            # Checked before ClientError: aiohttp's timeout errors subclass both.
            return _fail("timeout", None, f"no complete reply within {self._timeout_s:g}s")
        except aiohttp.ClientError as exc:
            return _fail("network", None, _network_detail(exc))
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


def _base(base_url: str) -> str | Failure:
    """The base URL without its trailing slash, or a `config` Failure when it is not an http(s) URL with a
    host (a row's URL column is the app's to fill: "not a url" or ftp://... must not pass for a network error).
    The message never echoes the URL (it may carry credentials)."""
    if not is_http_url(base_url):
        return _fail("config", None, "the Evolution base URL is not an http(s) URL with a host")
    return base_url.rstrip("/")


def _instance_url(base_url: str, route: str, name: str) -> str | Failure:
    """{base}/{route}/{name}, the name percent-encoded whole (a slash in it stays part of the name). "." and
    ".." would be resolved away as path segments and reach another route: refused before anything is sent."""
    base = _base(base_url)
    if isinstance(base, Failure):
        return base
    if name in (".", ".."):
        return _fail("config", None, f"the instance name {name!r} cannot be sent in a URL path")
    return f"{base}/{route}/{quote(name, safe='')}"


def display_url(url: str, *, with_path: bool = True) -> str:
    """A URL as shown to people: scheme, host, port and (with_path) path, like `https://host/api`; never
    user:password, query or fragment, which may hold credentials."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    if ":" in host:
        host = f"[{host}]"
    path = parts.path.rstrip("/") if with_path else ""
    return f"{parts.scheme}://{host}{port}{path}"


def _network_detail(exc: aiohttp.ClientError) -> str:
    """Name the failure without the exception text, which can echo URLs or headers."""
    reason = ""
    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, OSError) and os_error.strerror:
        reason = f": {os_error.strerror}"
    return f"network error ({type(exc).__name__}){reason}"
