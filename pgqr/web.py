"""The sidecar's HTTP side (aiohttp): liveness, readiness, Prometheus metrics, and Evolution's webhooks.

It gets narrow callables (record results, find instances, readiness, the metrics registry) and the webhook
credential checks (pgqr.tokens.WebhookAuth), never the service. Webhooks arrive in two forms:
- POST /webhooks/evolution/{secret}[/{event}]: the global secret in the path (Evolution's global webhook, which
  sends no custom headers);
- POST /webhooks/evolution[/{event}] with the header X-Pgqr-Token: the global secret or the instance's derived
  token (what `pgqr webhooks register` sets); the segment after `evolution` is then always the event.
The optional last segment is Evolution's "webhook by events" suffix. Evolution signs nothing (evolution-api.md
section 4): see pgqr/tokens.py for what is checked. Every refusal is counted by reason
(pgqr_webhook_rejections) and writes nothing; no credential is ever logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import psycopg
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from . import db, tokens, writeback
from .metrics import Metrics
from .settings import ConfigError

log = logging.getLogger("pgqr.web")
KNOWN_EVENTS = frozenset({"qrcode.updated", "connection.update", "status.instance", "logout.instance",
                          "remove.instance", "instance.create", "instance.delete"})
MAX_BODY_BYTES = 1024 * 1024
MAX_DEPTH = 32  # Evolution's envelopes nest 4 levels; JSON deeper than this is not from Evolution
WEBHOOK_PREFIX = "/webhooks/evolution"


@dataclass(frozen=True)
class Deps:
    """What the web app may do: nothing else of the service reaches it."""

    record: Callable[[db.Result], Awaitable[db.Recorded | None]]
    find: Callable[[str], Awaitable[list[db.Instance]]]
    readiness: Callable[[], list[str]]          # problems; empty when ready
    notes: Callable[[], list[str]]              # degraded but serving (readiness stays 200)
    metrics: Metrics
    auth: tokens.WebhookAuth
    evolution_url: Callable[[str | None], str | None]  # the base URL a row is called on (Settings.evolution_for)


DEPS: web.AppKey[Deps] = web.AppKey("deps")


@dataclass(frozen=True)
class Event:
    """What a webhook says about one instance, before we know which row it is."""

    name: str
    server_url: str | None
    outcome: db.OutcomeName
    qr: str | None = None
    pairing_code: str | None = None
    evolution_state: str | None = None
    error_class: str | None = None
    reason: str | None = None  # why that state: logged_out, deleted, qr_limit, or Evolution's statusReason


def _status_reason(data: dict[str, Any]) -> str | None:
    """connection.update's statusReason: 401 is Baileys' loggedOut (the phone unlinked it)."""
    code = data.get("statusReason")
    if isinstance(code, bool) or not isinstance(code, int):
        return None
    return "logged_out" if code == 401 else str(code)


class BadWebhook(ValueError):
    """An envelope no Evolution sends (answered 400); str() says what is wrong, never echoing the body."""


def event_from_webhook(body: Any) -> Event | None:
    """Map an Evolution webhook envelope to what it means; None for events we do not use; BadWebhook for a
    body that is not an Evolution envelope (not an object, fields of the wrong type, text PostgreSQL cannot
    hold)."""
    if not isinstance(body, dict):
        raise BadWebhook("the body is not a JSON object")
    if not isinstance(body.get("event"), str) or not isinstance(body.get("instance"), str):
        raise BadWebhook("`event` and `instance` must be strings")
    if not db.storable(body["instance"]):
        raise BadWebhook("`instance` holds characters PostgreSQL text cannot store")
    event = body["event"].lower().replace("_", ".")
    raw_data = body.get("data")
    if event in ("qrcode.updated", "connection.update") and not isinstance(raw_data, dict | None):
        raise BadWebhook("`data` must be an object")  # other events' data (messages: arrays) is not ours to judge
    data: dict[str, Any] = raw_data if isinstance(raw_data, dict) else {}
    server = body.get("server_url") if isinstance(body.get("server_url"), str) else None
    name = body["instance"]
    if event == "qrcode.updated":
        qrcode = data.get("qrcode")
        if isinstance(qrcode, dict) and isinstance(qrcode.get("base64"), str) and qrcode["base64"]:
            pairing = qrcode.get("pairingCode") if isinstance(qrcode.get("pairingCode"), str) else None
            if not db.storable(qrcode["base64"], pairing):
                raise BadWebhook("the QR holds characters PostgreSQL text cannot store")
            return Event(name, server, "qr", qr=qrcode["base64"], pairing_code=pairing, evolution_state="connecting")
        if "qrcode" in data:
            raise BadWebhook("`data.qrcode` must be an object with a `base64` string")
        # "QR code limit reached, please login again": Evolution stopped rotating
        return Event(name, server, "gave_up", error_class="qr_limit")
    if event == "connection.update":
        state = data.get("state")
        if state == "open":
            return Event(name, server, "connected", evolution_state="open")
        if state == "refused":
            return Event(name, server, "gave_up", evolution_state="close", error_class="qr_limit", reason="qr_limit")
        if state in ("close", "connecting"):
            return Event(name, server, "event", evolution_state=state,
                         reason=_status_reason(data) if state == "close" else None)
    if event in ("logout.instance", "remove.instance", "instance.delete"):
        return Event(name, server, "gave_up", evolution_state="close", error_class=event.replace(".", "_"),
                     reason="logged_out" if event == "logout.instance" else "deleted")
    return None


def pick(instances: list[db.Instance], server_url: str | None,
         evolution_url: Callable[[str | None], str | None]) -> db.Instance | None:
    """The row a webhook means: Evolution's names are unique per server, so a name shared by rows on several
    servers is told apart by the envelope's server_url."""
    if len(instances) <= 1 or not server_url:
        return instances[0] if len(instances) == 1 else None
    same = [i for i in instances if (evolution_url(i.url) or "").rstrip("/") == server_url.rstrip("/")]
    return same[0] if len(same) == 1 else None


class Refused(Exception):
    """A webhook refused before anything is written: the HTTP status, the metric's reason, the reply's text."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(reason)
        self.status, self.reason, self.message = status, reason, message


def _unauthorized(reason: str) -> Refused:
    return Refused(401, reason, "unauthorized")


# A JSON string (escape-aware; an unterminated one runs to the end, so no match attempt ever fails and the scan
# stays linear) or a bracket.
_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\(?:.|\Z)[^"\\]*)*(?:"|\Z)|[\[\]{}]', re.DOTALL)


def too_deep(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON text nests arrays/objects deeper than `limit`, found without recursion (json.loads recurses
    once per level and a 10,000-deep body would end in RecursionError)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > limit:
                return True
        elif token in ("]", "}"):
            depth -= 1
    return False


def parse_envelope(raw: bytes) -> dict[str, Any]:
    """The webhook body as a dict with the fields pgqr reads of the right type, or Refused (400)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(400, "bad_json", "body is not JSON") from None
    if too_deep(text):
        raise Refused(400, "too_deep", f"body nests deeper than {MAX_DEPTH} levels")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        raise Refused(400, "bad_json", "body is not JSON") from None
    if not isinstance(body, dict):
        raise Refused(400, "bad_shape", "body is not a JSON object")
    instance = body.get("instance")
    if not isinstance(instance, str) or not instance:
        raise Refused(400, "bad_shape", "instance is not a string")
    # logout.instance and remove.instance carry `data: null` (section 9)
    wanted: tuple[tuple[str, type | tuple[type, ...]], ...] = (
        ("event", str), ("data", (dict, type(None))), ("apikey", (str, type(None))),
        ("server_url", (str, type(None))))
    for field, kind in wanted:
        if field in body and not isinstance(body[field], kind):
            raise Refused(400, "bad_shape", f"{field} has the wrong type")
    return body


async def _read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise Refused(413, "too_large", f"body larger than {MAX_BODY_BYTES} bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Refused(413, "too_large", f"body larger than {MAX_BODY_BYTES} bytes") from None


async def _authenticated_body(request: web.Request, auth: tokens.WebhookAuth) -> dict[str, Any]:
    """Check the request's credentials (and read its body on the way); Refused unless they hold."""
    if not auth.enabled:
        raise _unauthorized("not_configured")
    header = request.headers.get(tokens.HEADER)
    first, second = request.match_info.get("first"), request.match_info.get("second")
    if header is None:  # the path form: /webhooks/evolution/{secret}[/{event}]
        if first is None:
            raise _unauthorized("missing_token")
        if not auth.path_secret_ok(first):
            raise _unauthorized("wrong_token")
    else:  # the header form: /webhooks/evolution[/{event}]
        if second is not None:
            raise Refused(404, "bad_path", "not found")
        if not header:
            raise _unauthorized("missing_token")
        if not auth.could_be_header_token(header):
            raise _unauthorized("wrong_token")
    if (problem := auth.jwt_problem(request.headers.get("Authorization"))) is not None:
        raise _unauthorized(problem)
    body = parse_envelope(await _read_body(request))
    # a derived token is valid for the name it was derived from, so it only ever writes that instance
    if header is not None and auth.header_scope(header, body["instance"]) is None:
        raise _unauthorized("wrong_token")
    return body


async def webhook(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    try:
        return await _webhook(request, deps)
    except Refused as refused:
        deps.metrics.webhook_rejections.labels(refused.reason).inc()
        return web.json_response({"error": refused.message}, status=refused.status)


async def _webhook(request: web.Request, deps: Deps) -> web.Response:
    body = await _authenticated_body(request, deps.auth)
    event_name = body.get("event") or ""
    # a label per known event only: the body is the sender's to choose, and series must stay bounded
    deps.metrics.webhooks.labels(event_name if event_name in KNOWN_EVENTS else "other").inc()
    try:
        event = event_from_webhook(body)
    except BadWebhook as exc:
        raise Refused(400, "bad_shape", str(exc)) from None
    if event is None:
        return web.json_response({"ignored": event_name})
    try:
        instances = await deps.find(event.name)
        instance = pick(instances, event.server_url, deps.evolution_url)
        if instance is None:
            raise Refused(404, "unknown_instance" if not instances else "ambiguous_instance", "unknown instance")
        apikey = body.get("apikey")
        # Evolution sends the instance's token, or null when it does not expose tokens (then the secret decides)
        if apikey is not None and not deps.auth.apikey_ok(apikey, instance.token):
            raise _unauthorized("wrong_apikey")
        md5 = db.image_md5(event.qr) if event.qr else None
        result = db.Result(key=instance.key, source="webhook", outcome=event.outcome, md5=md5, qr=event.qr,
                           pairing_code=event.pairing_code, evolution_state=event.evolution_state,
                           evolution_reason=event.reason, error_class=event.error_class)
        rec = await deps.record(result)
    except writeback.Refused:
        raise Refused(422, "bad_value", "the database cannot hold a value of this webhook") from None
    except (psycopg.Error, OSError) as exc:
        # Evolution retries a 5xx with backoff, so nothing is lost while the database is away
        log.warning("webhook %s for %s not recorded: %s", event_name, event.name, type(exc).__name__,
                    extra={"action": "webhook_error", "event": event_name, "instance": event.name})
        return web.json_response({"error": "database unavailable"}, status=503)
    if rec is None:  # the database stayed away for the writer's whole patience
        return web.json_response({"error": "database unavailable"}, status=503)
    if rec.busy:  # only the app holds a row this long: Evolution retries
        return web.json_response({"error": "instance busy, retry"}, status=503)
    if rec.outcome == "app_refused":
        # a 4xx: Evolution does not retry what the app's table will refuse again
        log.warning("webhook %s for %s: the app's table refused the write (%s)", event_name, event.name,
                    rec.reason, extra={"action": "webhook_app_refused", "event": event_name, "instance": event.name})
        raise Refused(422, "app_refused", "the app's table refused this write")
    if rec.reason == "repeat":
        deps.metrics.webhook_repeats.inc()  # the state pgqr already holds: nothing written
    # a repeat of the state pgqr holds is not news (Evolution sends connection.update storms): DEBUG
    log.log(logging.DEBUG if rec.reason == "repeat" else logging.INFO, "webhook %s for %s", event_name, event.name,
            extra={"action": "webhook", "event": event_name, "instance": event.name, "written": rec.written})
    return web.json_response({"recorded": rec.written, "qr_updated": rec.qr_updated})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    problems = deps.readiness()
    return web.json_response({"ready": not problems, "problems": problems, "degraded": deps.notes()},
                             status=503 if problems else 200)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DEPS].metrics.render(), content_type="text/plain", charset="utf-8")


def loggable_path(request: web.BaseRequest) -> str:
    """What the access log may show of a request's path: the route it matched (a template such as
    /webhooks/evolution/{first}, never the values). An unmatched path is never shown: it may be a webhook URL
    with a secret in it, in any case, dot-segments or percent-encoding."""
    info = getattr(request, "match_info", None)  # a request that never reached the router has none
    resource = getattr(getattr(info, "route", None), "resource", None)
    return str(resource.canonical) if resource is not None else "(unmatched)"


class RedactingAccessLogger(AbstractAccessLogger):
    """The access log names the route and the status, never a raw path or query string (see loggable_path)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        path = loggable_path(request)
        # a webhook that was taken has its own line (action "webhook"); its request line is DEBUG, so 500
        # webhooks a second are 500 lines, not 1,000. Refusals and every other route stay INFO.
        hook = path.startswith(WEBHOOK_PREFIX) and response.status < 400
        self.logger.log(logging.DEBUG if hook else logging.INFO, "%s %s %s", request.method, path, response.status,
                         extra={"action": "http", "method": request.method, "path": path,
                                "status": response.status, "ms": round(time * 1000, 1)})

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


@web.middleware
async def count_stray_webhooks(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                               ) -> web.StreamResponse:
    """A post under /webhook that matches no route (a wrong case, a doubled slash, an encoded slash, a proxy
    prefix left on) is a misconfigured webhook: counted as bad_path, so it shows in /metrics."""
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        if request.match_info.route.resource is None and "webhook" in unquote(request.raw_path).lower():
            request.app[DEPS].metrics.webhook_rejections.labels("bad_path").inc()
        raise


def make_app(deps: Deps) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[count_stray_webhooks])
    app[DEPS] = deps
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    # {first} is the secret in the path form, the event in the header form (see the module's docstring)
    app.router.add_post(WEBHOOK_PREFIX, webhook)
    app.router.add_post(WEBHOOK_PREFIX + "/{first}", webhook)
    app.router.add_post(WEBHOOK_PREFIX + "/{first}/{second}", webhook)
    return app


async def start(app: web.Application, host: str, port: int) -> web.AppRunner:
    # shutdown_timeout: webhook requests in flight at exit get this long, not aiohttp's default minute
    runner = web.AppRunner(app, access_log_class=RedactingAccessLogger,
                           access_log=logging.getLogger("pgqr.web.access"), shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:  # port in use, address not on this host: a setting to fix, not a traceback
        await runner.cleanup()
        if isinstance(exc, socket.gaierror):  # its errno is a resolver code, which strerror calls "Unknown error"
            reason = f"the host name {host} does not resolve ({exc.strerror or 'no address'})"
        else:
            reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else (exc.strerror or str(exc))
        raise ConfigError(f"cannot serve HTTP on {host}:{port}: {reason}") from None
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port actually bound (useful with port 0)."""
    port: int = runner.addresses[0][1]
    return port
