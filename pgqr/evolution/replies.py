"""Evolution's replies as typed values: one dataclass per reply class, and the pure functions that classify a
status and body into one (docs evolution-api.md, sections 1 and 2). Nothing here does I/O, so each mapping is
testable without a server.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ERROR_CLASSES, ErrorClass


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
_MAX_COUNT = 2**31 - 1  # Evolution's count is a JS number kept in an int column; more is not a count
_MAX_PAIRING = 32  # Evolution's pairing codes have 8 characters
_STATES: tuple[StateName, ...] = ("open", "connecting", "close")
_NOT_LOADED = {"error": True, "message": "[object Object]"}


def fail(error_class: ErrorClass, status: int | None, what: str) -> Failure:
    """The Failure of that class, its transience from the one table; `what` must never hold a secret."""
    prefix = f"HTTP {status}: " if status is not None else ""
    return Failure(error_class, ERROR_CLASSES[error_class].transient, status, prefix + what)


def _parse_json(body: bytes) -> Any:
    """The decoded JSON value, or a sentinel `_NOT_JSON` when the body is not JSON."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _NOT_JSON


_NOT_JSON = object()


def classify_error_status(status: int, body: bytes) -> Failure:
    """Map a non-2xx status to a Failure (evolution-api.md section 1)."""
    if status == 404:
        parsed = _parse_json(body)
        # An unknown route also answers 404 ("Cannot GET /..."): usually a wrong base URL.
        if isinstance(parsed, dict) and "Cannot " in str(parsed.get("response", "")):
            return fail("not_found", status, "route not found (check the base URL)")
        return fail("not_found", status, "instance does not exist")
    if status == 401:
        return fail("unauthorized", status, "API key or instance token rejected")
    if status == 503:
        parsed = _parse_json(body)
        if isinstance(parsed, dict) and parsed.get("code") == "LICENSE_REQUIRED":
            return fail("not_activated", status, "Evolution API is not activated (LICENSE_REQUIRED)")
    if status >= 500:
        return fail("server_error", status, "server error")
    # Evolution itself never sends 408/429 (no rate limiting), but a proxy in front of it may,
    # and both mean "try again later".
    if status in (408, 429):
        return fail("throttled", status, "request throttled or timed out by a proxy")
    if status == 400:
        return fail("bad_request", status, "Evolution refused the request as invalid")
    if 300 <= status < 400:
        # Redirects are not followed so the apikey header never travels to another host.
        return fail("http_error", status, "unexpected redirect (check the base URL)")
    return fail("http_error", status, "unexpected client error")


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
            return fail("not_loaded", status, "the instance is not loaded in Evolution's memory yet")
        return fail("api_error", status, "Evolution returned an error object")
    instance = parsed.get("instance")
    if isinstance(instance, dict):
        state = instance.get("state")
        if state is not None and state not in _STATES:
            return fail("bad_reply", status, "instance.state is not open, connecting or close")
        return Connected(http_status=status) if state == "open" else NoQrYet(count=None, http_status=status)
    if not _QR_KEYS & parsed.keys():
        return fail("bad_reply", status, "reply has an unexpected shape")
    if (problem := _qr_fields_problem(parsed)) is not None:
        return fail("bad_reply", status, problem)
    count, pairing = parsed.get("count"), parsed.get("pairingCode")
    code, b64 = parsed.get("code"), parsed.get("base64")
    if isinstance(code, str) and isinstance(b64, str):
        return QrCode(code=code, base64=b64, pairing_code=pairing, count=count, http_status=status)
    return NoQrYet(count=count, http_status=status)


def _json_reply(status: int, body: bytes) -> Failure | Any:
    """The JSON value of a 2xx reply, or the Failure for a non-2xx, empty or non-JSON one."""
    if not 200 <= status < 300:
        return classify_error_status(status, body)
    if not body.strip():
        return fail("empty_reply", status, "empty reply body (Evolution v1.8 controller error)")
    parsed = _parse_json(body)
    if parsed is _NOT_JSON:
        return fail("bad_reply", status, "reply is not JSON")
    return parsed


def classify_connect_reply(status: int, body: bytes) -> Outcome:
    """Pure mapping of one /instance/connect HTTP reply to an outcome."""
    parsed = _json_reply(status, body)
    if isinstance(parsed, Failure):
        return parsed
    if not isinstance(parsed, dict):
        return fail("bad_reply", status, "reply has an unexpected shape")
    return _classify_qr_body(status, parsed)


def classify_connection_state_reply(status: int, body: bytes) -> EvolutionState | Failure:
    """/instance/connectionState: {"instance": {"instanceName", "state"?}}; no state = not in memory."""
    parsed = _json_reply(status, body)
    if isinstance(parsed, Failure):
        return parsed
    instance = parsed.get("instance") if isinstance(parsed, dict) else None
    if not isinstance(instance, dict) or not isinstance(instance.get("instanceName"), str):
        return fail("bad_reply", status, "reply has an unexpected shape")
    state = instance.get("state")
    if state is None:
        return EvolutionState(None, status)
    if state not in _STATES:
        return fail("bad_reply", status, "instance.state is not open, connecting or close")
    return EvolutionState(state, status)


def classify_fetch_instances_reply(status: int, body: bytes, key: str) -> InstanceList | Failure:
    """/instance/fetchInstances (v2): an array of DB rows; each row's token is compared with `key`, not kept."""
    parsed = _json_reply(status, body)
    if isinstance(parsed, Failure):
        return parsed
    if not isinstance(parsed, list):
        return fail("bad_reply", status, "reply is not an array of instances")
    rows = []
    for row in parsed:
        name = row.get("name") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(name, str):
            return fail("bad_reply", status, "an instance row has no name")
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
        return fail("bad_reply", status, "reply has an unexpected shape")
    url, enabled, events = parsed.get("url"), parsed.get("enabled"), parsed.get("events")
    headers = parsed.get("headers")
    if (not isinstance(url, str) or not isinstance(enabled, bool) or not isinstance(events, list)
            or not all(isinstance(e, str) for e in events) or not isinstance(headers, dict | None)):
        return fail("bad_reply", status, "the webhook row has unexpected fields")
    return WebhookConfig(
        url=url, enabled=enabled, events=tuple(events), by_events=parsed.get("webhookByEvents") is True,
        base64=parsed.get("webhookBase64") is True, header_names=tuple(sorted(headers or {})), http_status=status,
        header_values=tuple((str(k), v) for k, v in sorted((headers or {}).items()) if isinstance(v, str)))


def classify_check_reply(status: int, body: bytes) -> Outcome:
    """fetchInstances for `doctor`: any 2xx means the key works."""
    if 200 <= status < 300:
        return NoQrYet(count=None, http_status=status)
    return classify_error_status(status, body)
