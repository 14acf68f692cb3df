"""The sidecar's HTTP side (aiohttp): liveness, readiness, Prometheus metrics, and Evolution's webhooks.

It gets narrow callables (record results, find instances, readiness, the metrics registry), never the service.
Webhooks arrive at POST /webhooks/evolution/{secret}[/{event}] (the optional last segment is Evolution's
"webhook by events" suffix). Evolution signs nothing (evolution-api.md section 4), so the secret is the
authentication; it is compared in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from . import db
from .metrics import Metrics
from .settings import ConfigError, Secret

log = logging.getLogger("pgqr.web")
KNOWN_EVENTS = frozenset({"qrcode.updated", "connection.update", "status.instance", "logout.instance",
                          "remove.instance", "instance.create", "instance.delete"})


@dataclass(frozen=True)
class Deps:
    """What the web app may do: nothing else of the service reaches it."""

    record: Callable[[list[db.Result]], Awaitable[list[db.Recorded]]]
    find: Callable[[str], Awaitable[list[db.Instance]]]
    readiness: Callable[[], list[str]]          # problems; empty when ready
    notes: Callable[[], list[str]]              # degraded but serving (readiness stays 200)
    metrics: Metrics
    secret: Secret | None
    default_evolution_url: str | None


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
            return Event(name, server, "gave_up", evolution_state="close", error_class="qr_limit")
        if state in ("close", "connecting"):
            return Event(name, server, "event", evolution_state=state)
    if event in ("logout.instance", "remove.instance", "instance.delete"):
        return Event(name, server, "gave_up", evolution_state="close", error_class=event.replace(".", "_"))
    return None


def pick(instances: list[db.Instance], server_url: str | None, default_url: str | None) -> db.Instance | None:
    """The row a webhook means: Evolution's names are unique per server, so a name shared by rows on several
    servers is told apart by the envelope's server_url."""
    if len(instances) <= 1 or not server_url:
        return instances[0] if len(instances) == 1 else None
    same = [i for i in instances if (i.url or default_url or "").rstrip("/") == server_url.rstrip("/")]
    return same[0] if len(same) == 1 else None


async def webhook(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    given = request.match_info["secret"]
    if deps.secret is None or not hmac.compare_digest(given.encode(), deps.secret.reveal().encode()):
        return web.json_response({"error": "not found"}, status=404)
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the JSON parser goes
        return web.json_response({"error": "body is not JSON"}, status=400)
    event_name = str(body.get("event", "")) if isinstance(body, dict) else ""
    # a label per known event only: the body is the sender's to choose, and series must stay bounded
    deps.metrics.webhooks.labels(event_name if event_name in KNOWN_EVENTS else "other").inc()
    try:
        event = event_from_webhook(body)
    except BadWebhook as exc:
        return web.json_response({"error": str(exc)}, status=400)
    if event is None:
        return web.json_response({"ignored": event_name})
    try:
        instance = pick(await deps.find(event.name), event.server_url, deps.default_evolution_url)
        if instance is None:
            return web.json_response({"error": "unknown instance"}, status=404)
        md5 = _md5(event.qr) if event.qr else None
        result = db.Result(key=instance.key, source="webhook", outcome=event.outcome, md5=md5, qr=event.qr,
                           pairing_code=event.pairing_code, evolution_state=event.evolution_state,
                           error_class=event.error_class)
        recorded = await deps.record([result])
    except (psycopg.Error, OSError) as exc:
        # Evolution retries a 5xx with backoff, so nothing is lost while the database is away
        log.warning("webhook %s for %s not recorded: %s", event_name, event.name, type(exc).__name__,
                    extra={"action": "webhook_error", "event": event_name, "instance": event.name})
        return web.json_response({"error": "database unavailable"}, status=503)
    rec = recorded[0] if recorded else None
    if rec is not None and rec.busy:
        return web.json_response({"error": "instance busy, retry"}, status=503)
    applied = bool(rec and rec.applied)
    if not recorded:
        deps.metrics.webhook_repeats.inc()  # the state pgqr already holds: nothing written
    log.info("webhook %s for %s", event_name, event.name,
             extra={"action": "webhook", "event": event_name, "instance": event.name, "applied": applied})
    return web.json_response({"recorded": applied, "qr_updated": bool(rec and rec.qr_updated)})


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    problems = deps.readiness()
    return web.json_response({"ready": not problems, "problems": problems, "degraded": deps.notes()},
                             status=503 if problems else 200)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DEPS].metrics.render(), content_type="text/plain", charset="utf-8")


class RedactingAccessLogger(AbstractAccessLogger):
    """The access log names the route, never the raw path of anything under /webhook (it may carry a secret,
    whatever its case, dot-segments or encoding)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        info = getattr(request, "match_info", None)  # a request that never reached the router has none
        resource = info.route.resource if info is not None else None
        route = resource.canonical if resource is not None else None
        path = request.path if route is None or "{" not in route else route
        if "webhook" in request.raw_path.lower() or "webhook" in path.lower():
            path = route if route and "webhook" in route else "/webhooks/…"
        self.logger.info("%s %s %s", request.method, path, response.status,
                         extra={"action": "http", "method": request.method, "path": path,
                                "status": response.status, "ms": round(time * 1000, 1)})

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def make_app(deps: Deps) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024)
    app[DEPS] = deps
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/webhooks/evolution/{secret}", webhook)
    app.router.add_post("/webhooks/evolution/{secret}/{event}", webhook)
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
