"""The listener's HTTP side (aiohttp): liveness, readiness, Prometheus metrics, and Evolution's webhooks.

Webhooks arrive at POST /webhooks/evolution/{secret}[/{event}] (the optional last segment is Evolution's
"webhook by events" suffix). Evolution signs nothing (evolution-api.md section 4), so the secret in the path
is the authentication; it is compared in constant time and redacted from the access log.
"""

from __future__ import annotations

import hmac
import logging
import os
from typing import TYPE_CHECKING, Any

import psycopg
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from . import db
from .config import ConfigError

if TYPE_CHECKING:
    from .listener import Service

log = logging.getLogger("pgqr.http")
SERVICE: web.AppKey[Service] = web.AppKey("service")
KNOWN_EVENTS = frozenset({"qrcode.updated", "connection.update", "status.instance", "logout.instance",
                          "remove.instance", "instance.create", "instance.delete"})


def result_from_webhook(body: Any) -> db.Result | None:
    """Map an Evolution webhook envelope to the write path's record; None for events we do not use."""
    if not isinstance(body, dict) or not isinstance(body.get("instance"), str) or not db.storable(body["instance"]):
        return None
    event = str(body.get("event", "")).lower().replace("_", ".")
    raw_data = body.get("data")
    data: dict[str, Any] = raw_data if isinstance(raw_data, dict) else {}
    name = body["instance"]
    if event == "qrcode.updated":
        qrcode = data.get("qrcode")
        if isinstance(qrcode, dict) and isinstance(qrcode.get("base64"), str) and qrcode["base64"]:
            pairing = qrcode.get("pairingCode") if isinstance(qrcode.get("pairingCode"), str) else None
            if not db.storable(qrcode["base64"], pairing):
                return db.Result(name, "webhook", "event", error_class="bad_reply")
            return db.Result(name, "webhook", "qr", qr=qrcode["base64"], pairing_code=pairing)
        # "QR code limit reached, please login again": Evolution stopped rotating; the next poll restarts it
        return db.Result(name, "webhook", "event", error_class="qr_limit")
    if event == "connection.update":
        state = data.get("state")
        if state == "open":
            return db.Result(name, "webhook", "connected")
        if state in ("close", "refused"):
            return db.Result(name, "webhook", "event", error_class=f"state_{state}")
    return None


async def webhook(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    secret = service.settings.webhook_secret
    given = request.match_info["secret"]
    if not secret or not hmac.compare_digest(given.encode(), secret.encode()):
        return web.json_response({"error": "not found"}, status=404)
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": "body is not JSON"}, status=400)
    event = str(body.get("event", "")) if isinstance(body, dict) else ""
    # a label per known event only: the body is the sender's to choose, and series must stay bounded
    service.metrics.webhooks.labels(event if event in KNOWN_EVENTS else "other").inc()
    result = result_from_webhook(body)
    if result is None:
        return web.json_response({"ignored": event})
    try:
        recorded = await db.record_results(await service.work.get(), service.owner, [result])
    except (psycopg.Error, OSError) as exc:
        # Evolution retries a 5xx with backoff, so nothing is lost while the database is away
        log.warning("webhook %s for %s not recorded: %s", event, result.instance_name, type(exc).__name__,
                    extra={"action": "webhook_error", "event": event, "instance": result.instance_name})
        return web.json_response({"error": "database unavailable"}, status=503)
    applied = bool(recorded and recorded[0].applied)
    log.info("webhook %s for %s", event, result.instance_name,
             extra={"action": "webhook", "event": event, "instance": result.instance_name, "applied": applied})
    return web.json_response({"recorded": applied, "qr_updated": bool(recorded and recorded[0].qr_updated)})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    problems = []
    if not service.listening.is_set():
        problems.append("not listening")
    if service.last_reconcile_ok is False:
        problems.append("last reconcile failed")
    return web.json_response({"ready": not problems, "problems": problems}, status=503 if problems else 200)


async def metrics(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    service.metrics.listening.set(1 if service.listening.is_set() else 0)
    return web.Response(body=service.metrics.render(), content_type="text/plain", charset="utf-8")


class RedactingAccessLogger(AbstractAccessLogger):
    """Access log without the webhook secret (it is part of the path)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        # Redact the segment after /webhooks/evolution/ wherever it occurs: a base URL ending in '/' ("//webhooks")
        # or a proxy prefix misses the route (404), but the path still carries the real secret.
        head, sep, tail = request.path.partition("/webhooks/evolution/")
        path = head + sep + "/".join(["***", *tail.lstrip("/").split("/")[1:]]) if sep else request.path
        self.logger.info("%s %s %s", request.method, path, response.status,
                         extra={"action": "http", "method": request.method, "path": path,
                                "status": response.status, "ms": round(time * 1000, 1)})

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def make_app(service: Service) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024)
    app[SERVICE] = service
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/webhooks/evolution/{secret}", webhook)
    app.router.add_post("/webhooks/evolution/{secret}/{event}", webhook)
    return app


async def start(service: Service, host: str, port: int) -> web.AppRunner:
    # shutdown_timeout: webhook requests in flight at exit get this long, not aiohttp's default minute
    runner = web.AppRunner(make_app(service), access_log_class=RedactingAccessLogger,
                           access_log=logging.getLogger("pgqr.http.access"), shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:  # port in use, address not on this host: a setting to fix, not a traceback
        await runner.cleanup()
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(f"cannot serve HTTP on {host}:{port}: {reason}") from None
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port actually bound (useful with port 0)."""
    port: int = runner.addresses[0][1]
    return port
