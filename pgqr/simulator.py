"""An in-memory Evolution API simulator, faithful to docs evolution-api.md.

Used by the tests, by `pgqr demo` and by users via `pgqr simulate`. It serves the routes pgqr
touches with Evolution's exact bodies and guard order, rotates QR codes like Baileys does under
Evolution's settings, and posts v2 webhook envelopes. A small unauthenticated control API under
/_sim lets a demo "scan" or "rotate" without a phone; bind it to loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import random
import signal
import string
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import aiohttp
import segno
from aiohttp import web

__all__ = [
    "InstanceStats",
    "SimConfig",
    "Simulator",
    "WebhookDelivery",
    "add_arguments",
    "serve_forever",
]

State = Literal["close", "connecting", "open"]
Mode = Literal["normal", "not_in_memory", "empty_reply", "license"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATES: tuple[State, ...] = ("close", "connecting", "open")
MODES: tuple[Mode, ...] = ("normal", "not_in_memory", "empty_reply", "license")
_QR_COLOR = "#198754"  # Evolution's QRCODE_COLOR default
_VERSION = "2.3.7"
# What the .env.example enables for the global webhook (WEBHOOK_EVENTS_*=true).
_GLOBAL_EVENTS = frozenset({"QRCODE_UPDATED", "CONNECTION_UPDATE"})


@dataclass
class SimConfig:
    api_key: str = "pgqr-simulator-key"
    qr_ttl: float = 45.0  # every QR lives 45 s under Evolution's qrTimeout
    connect_sleep: float = 2.0  # the controller's sleep after starting a socket in `close`
    first_qr_delay: float = 0.5  # socket start -> first QR
    qrcode_limit: int = 30
    latency: float = 0.0  # added to every API reply (not to /_sim)
    error_rate: float = 0.0  # fraction of connect calls answered 500
    timeout_rate: float = 0.0  # fraction of connect calls that hang for hang_seconds
    hang_seconds: float = 30.0
    expose_token_in_webhook: bool = True
    global_webhook_url: str | None = None
    global_webhook_by_events: bool = False
    webhook_timeout: float = 5.0
    seed: int | None = None


@dataclass(frozen=True)
class InstanceStats:
    connect_calls: int
    max_concurrent_connects: int
    sockets_started: int
    count: int
    state: State


@dataclass(frozen=True)
class WebhookDelivery:
    """One webhook POST attempt; `status` is None when it failed before a reply."""

    url: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int | None
    error: str | None = None


@dataclass
class _Instance:
    name: str
    token: str
    state: State
    mode: Mode
    instance_id: str
    created_at: str
    count: int = 0
    code: str | None = None
    base64: str | None = None
    pairing_code: str | None = None
    number: str | None = None
    wuid: str | None = None
    profile_name: str | None = None
    webhook: dict[str, Any] | None = None
    connect_calls: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    sockets_started: int = 0
    socket_task: asyncio.Task[None] | None = None
    outbox: asyncio.Queue[tuple[str, dict[str, str], dict[str, Any]]] | None = None
    delivery_task: asyncio.Task[None] | None = None


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _error(status: int, error: str, message: str | list[str]) -> web.Response:
    """Evolution's main.ts error envelope."""
    return web.json_response(
        {"status": status, "error": error, "response": {"message": message}}, status=status
    )


def _not_found_instance(name: str) -> web.Response:
    return _error(404, "Not Found", [f'The "{name}" instance does not exist'])


def _unauthorized() -> web.Response:
    return _error(401, "Unauthorized", "Unauthorized")


def _license_required() -> web.Response:
    body = {
        "error": "service not activated",
        "code": "LICENSE_REQUIRED",
        "register_url": "http://localhost/manager/login",
        "instance_id": "00000000-0000-4000-8000-000000000000",
        "docs_url": "https://doc.evolution-api.com",
        "message": "This Evolution API installation is not activated.",
    }
    return web.json_response(body, status=503)


def _qr_png_data_url(code: str) -> str:
    return str(segno.make(code, error="l").png_data_uri(scale=4, border=2, dark=_QR_COLOR))


def _jwt(key: str) -> str:
    """HS256 JWT Evolution sends when a per-instance webhook header has `jwt_key` (2.3.0+)."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    now = int(time.time())
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(
        json.dumps({"iat": now, "exp": now + 600, "app": "evolution", "action": "webhook"}).encode()
    )
    sig = hmac.new(key.encode(), f"{head}.{payload}".encode(), hashlib.sha256).digest()
    return f"{head}.{payload}.{b64(sig)}"


class Simulator:
    """One in-memory Evolution API server."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.base_url = ""
        self.webhooks: list[WebhookDelivery] = []
        self.webhook_failures = 0
        self._rng = random.Random(config.seed)
        self._instances: dict[str, _Instance] = {}
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.app = self.make_app()

    # ---- public control surface (tests, demo) ----

    def add_instance(
        self, name: str, token: str | None = None, *, state: State = "close", mode: Mode = "normal"
    ) -> str:
        """Create an instance as if it were in Evolution's DB and memory; returns its token."""
        if name in self._instances:
            raise ValueError(f"instance {name!r} already exists")
        if state not in STATES or mode not in MODES:
            raise ValueError("unknown state or mode")
        inst = _Instance(
            name=name,
            token=token or self._uuid().upper(),
            state="close",
            mode=mode,
            instance_id=self._uuid(),
            created_at=_now_iso(),
        )
        self._instances[name] = inst
        if state == "connecting":
            self._start_socket(inst, None)  # needs a running loop, like a real boot auto-connect
        elif state == "open":
            self._log_in(inst)
        return inst.token

    def scan(self, name: str) -> None:
        """The user scans the QR: Baileys restarts (515), reconnects and opens."""
        inst = self._get(name)
        if inst.state == "open":
            return
        self._stop_socket(inst)
        self._log_in(inst)
        # After pair-success Baileys closes with 515 and auto-reconnects: connecting, then open.
        self._emit(inst, "connection.update", {"instance": name, "state": "connecting", "statusReason": 200})
        self._emit(inst, "connection.update", self._open_data(inst))

    def rotate(self, name: str) -> None:
        """Emit the next QR now and restart the rotation timer (instead of waiting qr_ttl)."""
        inst = self._get(name)
        if inst.state != "connecting":
            raise ValueError(f"instance {name!r} is {inst.state}, not connecting")
        self._cancel_socket_task(inst)
        self._next_qr(inst)
        if inst.state == "connecting":
            inst.socket_task = self._spawn(self._rotation_loop(inst, self.config.qr_ttl))

    def close_instance(self, name: str, status_reason: int = 401) -> None:
        """A final close (no reconnect), e.g. the phone unlinked the device."""
        inst = self._get(name)
        self._stop_socket(inst)
        # The old code/base64 stay in memory (section 2 [INFERRED]): a later connect may return them.
        self._emit(
            inst,
            "status.instance",
            {
                "instance": name,
                "status": "closed",
                "disconnectionAt": _now_iso(),
                "disconnectionReasonCode": status_reason,
                "disconnectionObject": json.dumps({"statusCode": status_reason}),
            },
        )
        self._emit(
            inst, "connection.update", {"instance": name, "state": "close", "statusReason": status_reason}
        )

    def stats(self, name: str) -> InstanceStats:
        inst = self._get(name)
        return InstanceStats(
            inst.connect_calls, inst.max_in_flight, inst.sockets_started, inst.count, inst.state
        )

    def token(self, name: str) -> str:
        return self._get(name).token

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 picks a free port); returns the base URL."""
        self._stopping.clear()
        self._http = aiohttp.ClientSession()
        self._runner = web.AppRunner(self.app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in str(bound_host) else str(bound_host)
        self.base_url = f"http://{shown}:{bound_port}"
        return self.base_url

    async def stop(self) -> None:
        self._stopping.set()  # releases hanging fault-injected requests
        # Every background task, including those of deleted instances.
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for inst in self._instances.values():
            inst.socket_task = inst.delivery_task = None
            inst.outbox = None
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def wait_for_webhooks(
        self, predicate: Callable[[WebhookDelivery], bool], n: int = 1, timeout: float = 5.0
    ) -> list[WebhookDelivery]:
        """Wait until at least n recorded deliveries match; for tests and the demo."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = [d for d in self.webhooks if predicate(d)]
            if len(found) >= n:
                return found
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"only {len(found)} of {n} matching webhooks arrived")
            await asyncio.sleep(0.01)

    # ---- app and routes ----

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._not_found_middleware, self._latency_middleware])
        r = app.router
        r.add_get("/", self._welcome)
        r.add_get("/instance/connect/{name}", self._connect)
        r.add_get("/instance/connectionState/{name}", self._connection_state)
        r.add_post("/instance/create", self._create)
        r.add_get("/instance/fetchInstances", self._fetch_instances)
        r.add_delete("/instance/logout/{name}", self._logout)
        r.add_delete("/instance/delete/{name}", self._delete)
        r.add_post("/webhook/set/{name}", self._webhook_set)
        r.add_get("/webhook/find/{name}", self._webhook_find)
        r.add_post("/_sim/instances", self._sim_add)
        r.add_post("/_sim/instances/{name}/scan", self._sim_scan)
        r.add_post("/_sim/instances/{name}/rotate", self._sim_rotate)
        r.add_post("/_sim/instances/{name}/close", self._sim_close)
        r.add_get("/_sim/stats", self._sim_stats)
        return app

    @web.middleware
    async def _not_found_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Express's reply for an unknown route or a wrong method."""
        try:
            return await handler(request)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            return _error(404, "Not Found", [f"Cannot {request.method} {request.raw_path.split('?')[0]}"])

    @web.middleware
    async def _latency_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.config.latency > 0 and not request.path.startswith("/_sim"):
            await asyncio.sleep(self.config.latency)
        return await handler(request)

    def _guard(self, request: web.Request) -> _Instance | web.Response:
        """instanceExistsGuard then authGuard: 404 before 401, whatever the key."""
        name = request.match_info["name"]
        inst = self._instances.get(name)
        if inst is None:
            return _not_found_instance(name)
        if inst.mode == "license":
            return _license_required()
        key = request.headers.get("apikey", "")
        if self._is_global_key(key) or hmac.compare_digest(key.encode(), inst.token.encode()):
            return inst
        return _unauthorized()

    def _is_global_key(self, key: str) -> bool:
        return hmac.compare_digest(key.encode(), self.config.api_key.encode())

    async def _welcome(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": 200,
                "message": "Welcome to the Evolution API, it is working!",
                "version": _VERSION,
                "clientName": "evolution_exchange",
                "manager": f"{self.base_url}/manager",
                "documentation": "https://doc.evolution-api.com",
            }
        )

    async def _connect(self, request: web.Request) -> web.StreamResponse:
        guarded = self._guard(request)
        if isinstance(guarded, web.Response):
            return guarded
        inst = guarded
        inst.connect_calls += 1
        inst.in_flight += 1
        inst.max_in_flight = max(inst.max_in_flight, inst.in_flight)
        try:
            return await self._connect_body(inst, request.query.get("number"))
        finally:
            inst.in_flight -= 1

    async def _connect_body(self, inst: _Instance, number: str | None) -> web.StreamResponse:
        roll = self._rng.random()
        if roll < self.config.timeout_rate:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.config.hang_seconds)
            return _error(504, "Gateway Timeout", ["simulated hang"])
        if roll < self.config.timeout_rate + self.config.error_rate:
            return _error(500, "Internal Server Error", ["simulated failure"])
        if inst.mode == "not_in_memory":
            return web.json_response({"error": True, "message": "[object Object]"})
        if inst.mode == "empty_reply":
            return web.Response(status=200)
        if inst.state == "open":
            return web.json_response({"instance": {"instanceName": inst.name, "state": "open"}})
        if inst.state == "close":
            # Each connect in `close` opens a socket; `number` only matters here.
            self._start_socket(inst, number)
            await asyncio.sleep(self.config.connect_sleep)
        return web.json_response(self._qr_body(inst))

    def _qr_body(self, inst: _Instance) -> dict[str, Any]:
        if inst.code is None:
            return {"count": inst.count}
        return {
            "pairingCode": inst.pairing_code,
            "code": inst.code,
            "base64": inst.base64,
            "count": inst.count,
        }

    async def _connection_state(self, request: web.Request) -> web.Response:
        guarded = self._guard(request)
        if isinstance(guarded, web.Response):
            return guarded
        inst = guarded
        if inst.mode == "not_in_memory":
            return web.json_response({"instance": {"instanceName": inst.name}})
        return web.json_response({"instance": {"instanceName": inst.name, "state": inst.state}})

    async def _create(self, request: web.Request) -> web.Response:
        if not self._is_global_key(request.headers.get("apikey", "")):
            return _unauthorized()
        body = await _json_body(request)
        name = body.get("instanceName") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            return _error(400, "Bad Request", ['instance requires property "instanceName"'])
        assert isinstance(body, dict)
        if name in self._instances:
            return _error(403, "Forbidden", [f'This name "{name}" is already in use.'])
        token = body.get("token") if isinstance(body.get("token"), str) else None
        self.add_instance(name, token)
        inst = self._instances[name]
        hook = body.get("webhook")
        if isinstance(hook, dict) and isinstance(hook.get("url"), str):
            self._set_webhook(inst, {"enabled": True, **hook})
        reply: dict[str, Any] = self._create_reply(inst)
        if body.get("qrcode") is True:
            self._start_socket(inst, body.get("number") if isinstance(body.get("number"), str) else None)
            await asyncio.sleep(self.config.connect_sleep)
            reply["instance"]["status"] = inst.state
            reply["qrcode"] = self._qr_body(inst)
        return web.json_response(reply, status=201)

    def _create_reply(self, inst: _Instance) -> dict[str, Any]:
        return {
            "instance": {
                "instanceName": inst.name,
                "instanceId": inst.instance_id,
                "integration": "WHATSAPP-BAILEYS",
                "webhookWaBusiness": None,
                "accessTokenWaBusiness": "",
                "status": inst.state,
            },
            "hash": inst.token,
            "webhook": self._webhook_row(inst) or {},
            "websocket": {},
            "rabbitmq": {},
            "nats": {},
            "sqs": {},
            "settings": self._settings(),
        }

    async def _fetch_instances(self, request: web.Request) -> web.Response:
        key = request.headers.get("apikey", "")
        if self._is_global_key(key):
            visible = list(self._instances.values())
        else:
            # DATABASE_SAVE_DATA_INSTANCE=true: an instance token sees only its own instances.
            visible = [
                i for i in self._instances.values() if hmac.compare_digest(key.encode(), i.token.encode())
            ]
            if not visible:
                return _unauthorized()
        wanted = request.query.get("instanceName")
        if wanted is not None:
            if wanted not in self._instances:
                return _error(404, "Not Found", [f'Instance "{wanted}" not found'])
            visible = [i for i in visible if i.name == wanted]
        return web.json_response([self._instance_row(i) for i in visible])

    def _instance_row(self, inst: _Instance) -> dict[str, Any]:
        return {
            "id": inst.instance_id,
            "name": inst.name,
            "connectionStatus": inst.state,
            "ownerJid": inst.wuid,
            "profileName": inst.profile_name,
            "profilePicUrl": None,
            "integration": "WHATSAPP-BAILEYS",
            "number": None,
            "businessId": None,
            "token": inst.token,
            "clientName": "evolution_exchange",
            "disconnectionReasonCode": None,
            "disconnectionObject": None,
            "disconnectionAt": None,
            "createdAt": inst.created_at,
            "updatedAt": inst.created_at,
            "Chatwoot": None,
            "Proxy": None,
            "Rabbitmq": None,
            "Nats": None,
            "Sqs": None,
            "Websocket": None,
            "Setting": self._settings(),
            "_count": {"Message": 0, "Contact": 0, "Chat": 0},
        }

    @staticmethod
    def _settings() -> dict[str, Any]:
        return {
            "rejectCall": False,
            "msgCall": "",
            "groupsIgnore": False,
            "alwaysOnline": False,
            "readMessages": False,
            "readStatus": False,
            "syncFullHistory": False,
        }

    async def _logout(self, request: web.Request) -> web.Response:
        guarded = self._guard(request)
        if isinstance(guarded, web.Response):
            return guarded
        inst = guarded
        if inst.state == "close":
            return _error(400, "Bad Request", [f'The "{inst.name}" instance is not connected'])
        self._emit(inst, "logout.instance", {"instance": inst.name})
        self.close_instance(inst.name, 401)
        inst.wuid = inst.profile_name = None
        return web.json_response(
            {"status": "SUCCESS", "error": False, "response": {"message": "Instance logged out"}}
        )

    async def _delete(self, request: web.Request) -> web.Response:
        guarded = self._guard(request)
        if isinstance(guarded, web.Response):
            return guarded
        inst = guarded
        self._stop_socket(inst)
        self._emit(inst, "remove.instance", {"instance": inst.name})
        del self._instances[inst.name]
        return web.json_response(
            {"status": "SUCCESS", "error": False, "response": {"message": "Instance deleted"}}
        )

    async def _webhook_set(self, request: web.Request) -> web.Response:
        guarded = self._guard(request)
        if isinstance(guarded, web.Response):
            return guarded
        body = await _json_body(request)
        hook = body.get("webhook") if isinstance(body, dict) else None
        # The flat v2.0 / openapi body has no `webhook` key: Evolution's schema rejects it.
        if not isinstance(hook, dict):
            return _error(400, "Bad Request", ['instance requires property "webhook"'])
        if not isinstance(hook.get("enabled"), bool) or not isinstance(hook.get("url"), str):
            return _error(400, "Bad Request", ['webhook requires property "enabled" and "url"'])
        if not isinstance(hook.get("events"), list):
            # set() reads events.length unguarded [INFERRED]; an omitted list throws.
            return _error(
                500, "Internal Server Error", "Cannot read properties of undefined (reading 'length')"
            )
        self._set_webhook(guarded, hook)
        return web.json_response(self._webhook_row(guarded), status=201)

    async def _webhook_find(self, request: web.Request) -> web.Response:
        guarded = self._guard(request)
        if isinstance(guarded, web.Response):
            return guarded
        return web.json_response(self._webhook_row(guarded))

    def _set_webhook(self, inst: _Instance, hook: dict[str, Any]) -> None:
        now = _now_iso()
        headers = hook.get("headers")
        events = hook.get("events")
        inst.webhook = {
            "id": (inst.webhook or {}).get("id") or self._uuid(),
            "url": hook["url"],
            "headers": headers if isinstance(headers, dict) else {},
            "enabled": bool(hook.get("enabled", True)),
            "events": [str(e) for e in events] if isinstance(events, list) else [],
            "webhookByEvents": bool(hook.get("byEvents", False)),
            "webhookBase64": bool(hook.get("base64", False)),
            "createdAt": (inst.webhook or {}).get("createdAt") or now,
            "updatedAt": now,
            "instanceId": inst.instance_id,
        }

    def _webhook_row(self, inst: _Instance) -> dict[str, Any] | None:
        return dict(inst.webhook) if inst.webhook is not None else None

    # ---- /_sim control API (loopback tool; no auth) ----

    async def _sim_add(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return web.json_response({"error": "body needs a string `name`"}, status=400)
        state, mode = body.get("state", "close"), body.get("mode", "normal")
        if state not in STATES or mode not in MODES:
            return web.json_response({"error": f"state in {STATES}, mode in {MODES}"}, status=400)
        token = body.get("token") if isinstance(body.get("token"), str) else None
        try:
            token = self.add_instance(body["name"], token, state=state, mode=mode)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        return web.json_response({"name": body["name"], "token": token}, status=201)

    async def _sim_scan(self, request: web.Request) -> web.Response:
        return self._sim_action(request, self.scan)

    async def _sim_rotate(self, request: web.Request) -> web.Response:
        return self._sim_action(request, self.rotate)

    async def _sim_close(self, request: web.Request) -> web.Response:
        return self._sim_action(request, self.close_instance)

    def _sim_action(self, request: web.Request, action: Callable[[str], None]) -> web.Response:
        name = request.match_info["name"]
        if name not in self._instances:
            return web.json_response({"error": f"no instance {name!r}"}, status=404)
        try:
            action(name)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        return web.json_response(asdict(self.stats(name)))

    async def _sim_stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "instances": {n: asdict(self.stats(n)) for n in self._instances},
                "webhooks": {"attempted": len(self.webhooks), "failed": self.webhook_failures},
            }
        )

    # ---- QR lifecycle (evolution-api.md section 5) ----

    def _start_socket(self, inst: _Instance, number: str | None) -> None:
        self._cancel_socket_task(inst)
        inst.sockets_started += 1
        inst.state = "connecting"
        inst.number = number
        self._emit(
            inst, "connection.update", {"instance": inst.name, "state": "connecting", "statusReason": 200}
        )
        inst.socket_task = self._spawn(self._rotation_loop(inst, self.config.first_qr_delay))

    async def _rotation_loop(self, inst: _Instance, first_delay: float) -> None:
        await asyncio.sleep(first_delay)
        while True:
            self._next_qr(inst)
            if inst.state != "connecting":
                return
            await asyncio.sleep(self.config.qr_ttl)

    def _next_qr(self, inst: _Instance) -> None:
        """A new QR from Baileys; the QRCODE_LIMIT check runs before it is counted."""
        if inst.count == self.config.qrcode_limit:
            self._qr_limit_reached(inst)
            return
        inst.count += 1
        inst.code = self._random_code()
        inst.base64 = _qr_png_data_url(inst.code)
        # With a number Evolution asks for a fresh pairing code on every rotation.
        inst.pairing_code = self._pairing_code() if inst.number else None
        qrcode = {
            "instance": inst.name,
            "pairingCode": inst.pairing_code,
            "code": inst.code,
            "base64": inst.base64,
        }
        self._emit(inst, "qrcode.updated", {"qrcode": qrcode})

    def _qr_limit_reached(self, inst: _Instance) -> None:
        # 2.4.0-rc order; <= 2.3.7 would follow with a close/401 from logout() [INFERRED], left out.
        self._emit(
            inst,
            "qrcode.updated",
            {"message": "QR code limit reached, please login again", "statusCode": 500},
        )
        self._emit(
            inst,
            "connection.update",
            {"instance": inst.name, "state": "refused", "statusReason": 428, "profileName": None},
        )
        inst.state = "close"
        inst.count = 0
        inst.code = inst.base64 = inst.pairing_code = None

    def _log_in(self, inst: _Instance) -> None:
        inst.state = "open"
        inst.wuid = f"5511{self._rng.randrange(10**8, 10**9)}@s.whatsapp.net"
        inst.profile_name = f"Sim {inst.name}"

    def _open_data(self, inst: _Instance) -> dict[str, Any]:
        return {
            "instance": inst.name,
            "wuid": inst.wuid,
            "profileName": inst.profile_name,
            "profilePictureUrl": None,
            "state": "open",
            "statusReason": 200,
        }

    def _stop_socket(self, inst: _Instance) -> None:
        self._cancel_socket_task(inst)
        inst.state = "close"

    @staticmethod
    def _cancel_socket_task(inst: _Instance) -> None:
        task = inst.socket_task
        inst.socket_task = None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _random_code(self) -> str:
        # Shaped like WhatsApp's: "2@<ref>,<noise key>,<identity key>,<adv secret>".
        def b64(n: int) -> str:
            return base64.b64encode(self._rng.randbytes(n)).decode()

        return f"2@{b64(60)},{b64(32)},{b64(32)},{b64(32)}"

    def _pairing_code(self) -> str:
        return "".join(self._rng.choices(string.ascii_uppercase + string.digits, k=8))

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start a background task the simulator owns (and cancels in stop())."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _get(self, name: str) -> _Instance:
        try:
            return self._instances[name]
        except KeyError:
            raise KeyError(f"no instance {name!r}") from None

    # ---- webhooks (evolution-api.md section 4) ----

    def _emit(self, inst: _Instance, event: str, data: dict[str, Any]) -> None:
        """Queue one event for every subscribed webhook; never blocks the caller."""
        upper = event.upper().replace(".", "_")
        hyphen = event.replace(".", "-")
        targets: list[tuple[str, dict[str, str]]] = []
        hook = inst.webhook
        if hook is not None and hook["enabled"] and (not hook["events"] or upper in hook["events"]):
            url = f"{hook['url']}/{hyphen}" if hook["webhookByEvents"] else hook["url"]
            targets.append((url, self._instance_headers(hook["headers"])))
        global_url = self.config.global_webhook_url
        if global_url and upper in _GLOBAL_EVENTS:
            url = f"{global_url}/{hyphen}" if self.config.global_webhook_by_events else global_url
            targets.append((url, {}))  # the global webhook sends no custom headers
        if not targets:
            return
        envelope = self._envelope(inst, event, data, hyphen)
        outbox = self._outbox(inst)
        for url, headers in targets:
            outbox.put_nowait((url, headers, envelope))

    def _envelope(self, inst: _Instance, event: str, data: dict[str, Any], hyphen: str) -> dict[str, Any]:
        hook = inst.webhook
        destination = hook["url"] if hook is not None else f"{self.config.global_webhook_url}/{hyphen}"
        # Evolution formats server-local time with a trailing Z (not true UTC unless TZ=UTC).
        local = datetime.now().isoformat(timespec="milliseconds") + "Z"
        envelope: dict[str, Any] = {
            "event": event,
            "instance": inst.name,
            "data": data,
            "destination": destination,
            "date_time": local,
        }
        if inst.wuid is not None:
            envelope["sender"] = inst.wuid  # undefined before login, so absent from QR events
        envelope["server_url"] = self.base_url
        envelope["apikey"] = inst.token if self.config.expose_token_in_webhook else None
        return envelope

    @staticmethod
    def _instance_headers(configured: dict[str, Any]) -> dict[str, str]:
        headers = {k: str(v) for k, v in configured.items() if k != "jwt_key"}
        jwt_key = configured.get("jwt_key")
        if isinstance(jwt_key, str) and jwt_key:
            headers["Authorization"] = f"Bearer {_jwt(jwt_key)}"
        return headers

    def _outbox(self, inst: _Instance) -> asyncio.Queue[tuple[str, dict[str, str], dict[str, Any]]]:
        if inst.outbox is None or inst.delivery_task is None or inst.delivery_task.done():
            inst.outbox = asyncio.Queue()
            inst.delivery_task = self._spawn(self._deliver_loop(inst.outbox))
        return inst.outbox

    async def _deliver_loop(self, outbox: asyncio.Queue[tuple[str, dict[str, str], dict[str, Any]]]) -> None:
        """Deliver one instance's events in order (Evolution awaits each in its emit chain)."""
        while True:
            url, headers, body = await outbox.get()
            await self._deliver(url, headers, body)

    async def _deliver(self, url: str, headers: dict[str, str], body: dict[str, Any]) -> None:
        status: int | None = None
        error: str | None = None
        try:
            if self._http is None:
                raise RuntimeError("simulator is not started")
            timeout = aiohttp.ClientTimeout(total=self.config.webhook_timeout)
            async with self._http.post(url, json=body, headers=headers, timeout=timeout) as resp:
                status = resp.status
                await resp.read()
        except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
            error = type(exc).__name__
        if status is None or status >= 400:
            self.webhook_failures += 1
        self.webhooks.append(WebhookDelivery(url, headers, body, status, error))


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


# ---- `pgqr simulate` ----


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for `pgqr simulate`."""
    d = SimConfig()
    parser.add_argument(
        "--host", default="127.0.0.1", help="bind address (the /_sim control API has no auth)"
    )
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--api-key", default=d.api_key, help="the global AUTHENTICATION_API_KEY")
    parser.add_argument("--instances", type=int, default=1, metavar="N", help="instances to create at start")
    parser.add_argument("--instance-prefix", default="demo", help="names are PREFIX-1 .. PREFIX-N")
    parser.add_argument("--qr-ttl", type=float, default=d.qr_ttl, help="seconds between QR rotations")
    parser.add_argument("--connect-sleep", type=float, default=d.connect_sleep)
    parser.add_argument("--first-qr-delay", type=float, default=d.first_qr_delay)
    parser.add_argument("--qrcode-limit", type=int, default=d.qrcode_limit)
    parser.add_argument("--latency", type=float, default=d.latency, help="seconds added to every API reply")
    parser.add_argument(
        "--error-rate", type=float, default=d.error_rate, help="fraction of connects answered 500"
    )
    parser.add_argument(
        "--timeout-rate", type=float, default=d.timeout_rate, help="fraction of connects that hang"
    )
    parser.add_argument("--hang-seconds", type=float, default=d.hang_seconds)
    parser.add_argument("--webhook-url", default=None, help="global webhook URL (WEBHOOK_GLOBAL_URL)")
    parser.add_argument(
        "--webhook-by-events", action="store_true", help="append /qrcode-updated etc. to the URL"
    )
    parser.add_argument("--hide-token-in-webhook", action="store_true", help="send apikey: null in webhooks")
    parser.add_argument("--seed", type=int, default=None)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        api_key=args.api_key,
        qr_ttl=args.qr_ttl,
        connect_sleep=args.connect_sleep,
        first_qr_delay=args.first_qr_delay,
        qrcode_limit=args.qrcode_limit,
        latency=args.latency,
        error_rate=args.error_rate,
        timeout_rate=args.timeout_rate,
        hang_seconds=args.hang_seconds,
        expose_token_in_webhook=not args.hide_token_in_webhook,
        global_webhook_url=args.webhook_url,
        global_webhook_by_events=args.webhook_by_events,
        seed=args.seed,
    )


async def serve_forever(args: argparse.Namespace) -> int:
    """Run the simulator until SIGINT/SIGTERM or cancellation; prints one line to stdout."""
    sim = Simulator(config_from_args(args))
    base_url = await sim.start(args.host, args.port)
    created = [
        f"{name}:{sim.add_instance(name)}"
        for name in (f"{args.instance_prefix}-{i}" for i in range(1, args.instances + 1))
    ]
    # A dev tool: its own fake key and tokens are printed so the user can configure pgqr.
    print(
        f"pgqr simulator listening base_url={base_url} api_key={sim.config.api_key} "
        f"instances={','.join(created) or '-'}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or no signal support: cancellation still stops us
    try:
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await sim.stop()
    return 0
