"""Evolution API's routes as pgqr meets them, with Evolution's guard order and bodies (evolution-api.md)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import replies
from .faults import fault_reply
from .lifecycle import Instance, NotConnectedError
from .surface import EvolutionSurface
from .webhooks import ALL_EVENTS, webhook_row

__all__ = ["Handler", "add_routes", "not_found_middleware", "same_secret"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
INTEGRATIONS = ("WHATSAPP-BAILEYS", "WHATSAPP-BUSINESS", "EVOLUTION")


def same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


@web.middleware
async def not_found_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Express's reply for an unknown route or a wrong method."""
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        return replies.error(404, "Not Found", [f"Cannot {request.method} {request.raw_path.split('?')[0]}"])


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


def add_routes(app: web.Application, sim: EvolutionSurface) -> None:
    r = _Routes(sim)
    app.router.add_get("/", r.welcome)
    app.router.add_get("/instance/connect/{name}", r.connect)
    app.router.add_get("/instance/connectionState/{name}", r.connection_state)
    app.router.add_post("/instance/create", r.create)
    app.router.add_get("/instance/fetchInstances", r.fetch_instances)
    app.router.add_delete("/instance/logout/{name}", r.logout)
    app.router.add_delete("/instance/delete/{name}", r.delete)
    app.router.add_post("/webhook/set/{name}", r.webhook_set)
    app.router.add_get("/webhook/find/{name}", r.webhook_find)


class _Routes:
    def __init__(self, sim: EvolutionSurface) -> None:
        self.sim = sim

    def _guard(self, request: web.Request) -> Instance | web.Response:
        """instanceExistsGuard, then authGuard: 404 before 401, whatever the key."""
        name = request.match_info["name"]
        inst = self.sim.instances.get(name)
        if inst is None:
            return replies.not_found_instance(name)
        if inst.mode == "license":
            return replies.license_required()
        key = request.headers.get("apikey", "")
        if self.sim.is_global_key(key) or same_secret(key, inst.token):
            return inst
        return replies.unauthorized()

    async def _delay(self) -> None:
        """config.latency, spent inside each call (so it counts towards the call's concurrency)."""
        if self.sim.config.latency > 0:
            await asyncio.sleep(self.sim.config.latency)

    async def _fault(
        self, inst: Instance, request: web.Request, healthy: Callable[[], Any]
    ) -> web.StreamResponse | None:
        """The reply of an instance in a fault mode (None when it is healthy); `healthy` makes the body a
        healthy reply would carry (a slow drip sends it)."""
        mode = self.sim.fault(inst)
        if mode is None:
            return None
        body = json.dumps(healthy()).encode()
        return await fault_reply(mode, request, self.sim.config, self.sim.stopping, body)

    async def welcome(self, request: web.Request) -> web.Response:
        await self._delay()
        return web.json_response({
            "status": 200,
            "message": "Welcome to the Evolution API, it is working!",
            "version": replies.VERSION,
            "clientName": "evolution_exchange",
            "manager": f"{self.sim.base_url}/manager",
            "documentation": "https://doc.evolution-api.com",
        })

    async def connect(self, request: web.Request) -> web.StreamResponse:
        guarded = self._guard(request)
        if isinstance(guarded, web.Response):
            return guarded
        with guarded.calls.call("connect", time.monotonic()):
            await self._delay()
            return await self._connect(guarded, request)

    async def _connect(self, inst: Instance, request: web.Request) -> web.StreamResponse:
        sim, config = self.sim, self.sim.config
        roll = sim.roll()
        if roll < config.timeout_rate:
            return await fault_reply("hang", request, config, sim.stopping, b"")
        if roll < config.timeout_rate + config.error_rate:
            return await fault_reply("http_500", request, config, sim.stopping, b"")
        if (faulted := await self._fault(inst, request, lambda: sim.qr_body(inst))) is not None:
            return faulted
        if inst.mode == "not_in_memory":
            return replies.not_loaded()
        if inst.mode == "empty_reply":
            return web.Response(status=200)  # v1.8's controller catch returns nothing
        sim.settle(inst)
        if inst.state == "open":
            return web.json_response({"instance": {"instanceName": inst.name, "state": "open"}})
        if inst.state == "close":
            # Each connect in `close` opens a socket (`number` only matters here), then sleeps: 2 s in the
            # controller, and 2 to 8 s in all with the fetch of WhatsApp's web version before it (section 9).
            sim.start_socket(inst, request.query.get("number"))
            await asyncio.sleep(sim.connect_sleep())
        return web.json_response(sim.qr_body(inst))

    async def connection_state(self, request: web.Request) -> web.StreamResponse:
        guarded = self._guard(request)
        if isinstance(guarded, web.Response):
            return guarded
        inst = guarded
        with inst.calls.call("state", time.monotonic()):
            await self._delay()
            self.sim.settle(inst)
            # Only reads the in-memory state: no side effect; no `state` for an instance not in memory.
            body: dict[str, Any] = {"instance": {"instanceName": inst.name}}
            if inst.mode != "not_in_memory":
                body["instance"]["state"] = inst.state
            if (faulted := await self._fault(inst, request, lambda: body)) is not None:
                return faulted
            return web.json_response(body)

    async def create(self, request: web.Request) -> web.Response:
        await self._delay()
        sim = self.sim
        if not sim.is_global_key(request.headers.get("apikey", "")):
            return replies.unauthorized()
        body = await _json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("instanceName"), str) or not body["instanceName"]:
            return replies.schema_error('instance requires property "instanceName"')
        name = body["instanceName"]
        if name in sim.instances:
            return replies.error(403, "Forbidden", [f'This name "{name}" is already in use.'])
        if body.get("integration") not in INTEGRATIONS:
            return replies.error(400, "Bad Request", ["Invalid integration"])
        token = body.get("token") if isinstance(body.get("token"), str) else None
        sim.add_instance(name, token)
        inst = sim.instances[name]
        hook = body.get("webhook")
        if isinstance(hook, dict) and isinstance(hook.get("url"), str):
            inst.webhook = webhook_row(None, {"enabled": True, **hook}, instance_id=inst.instance_id,
                                       new_id=sim.new_uuid())
        reply = self._create_reply(inst)
        if body.get("qrcode") is True:
            sim.start_socket(inst, body.get("number") if isinstance(body.get("number"), str) else None)
            await asyncio.sleep(sim.connect_sleep())
            reply["instance"]["status"] = inst.state
            reply["qrcode"] = sim.qr_body(inst)
        return web.json_response(reply, status=201)

    @staticmethod
    def _create_reply(inst: Instance) -> dict[str, Any]:
        row = inst.webhook
        # create's reply names the webhook fields differently from webhook/find (section 9)
        hook = {} if row is None else {
            "webhookUrl": row["url"], "webhookHeaders": row["headers"],
            "webhookByEvents": row["webhookByEvents"], "webhookBase64": row["webhookBase64"],
        }
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
            "webhook": hook,
            "websocket": {},
            "rabbitmq": {},
            "nats": {},
            "sqs": {},
            "settings": replies.settings(),
        }

    async def fetch_instances(self, request: web.Request) -> web.Response:
        await self._delay()
        key = request.headers.get("apikey", "")
        everyone = list(self.sim.instances.values())
        # With the global key every instance; with an instance token (DATABASE_SAVE_DATA_INSTANCE=true) only
        # the instance(s) holding that token.
        is_global = self.sim.is_global_key(key)
        visible = everyone if is_global else [i for i in everyone if same_secret(key, i.token)]
        if not is_global and not visible:
            return replies.unauthorized()
        wanted = request.query.get("instanceName")
        if wanted is not None:
            inst = self.sim.instances.get(wanted)
            if inst is None or inst.mode == "not_in_memory":
                return replies.error(404, "Not Found", [f'Instance "{wanted}" not found'])
            if inst not in visible:
                return replies.unauthorized()
            visible = [inst]
        return web.json_response([replies.instance_row(i) for i in visible])

    async def logout(self, request: web.Request) -> web.Response:
        await self._delay()
        guarded = self._guard(request)
        if isinstance(guarded, web.Response):
            return guarded
        self.sim.settle(guarded)
        try:
            self.sim.logout(guarded)
        except NotConnectedError:
            return replies.error(400, "Bad Request", [f'The "{guarded.name}" instance is not connected'])
        return web.json_response({"status": "SUCCESS", "error": False, "response": {"message": "Instance logged out"}})

    async def delete(self, request: web.Request) -> web.Response:
        await self._delay()
        guarded = self._guard(request)
        if isinstance(guarded, web.Response):
            return guarded
        self.sim.delete(guarded)
        return web.json_response({"status": "SUCCESS", "error": False, "response": {"message": "Instance deleted"}})

    async def webhook_set(self, request: web.Request) -> web.StreamResponse:
        await self._delay()
        guarded = self._guard(request)
        if isinstance(guarded, web.Response):
            return guarded
        body = await _json_body(request)
        hook = body.get("webhook") if isinstance(body, dict) else None
        # The flat v2.0 / v1 / openapi body has no `webhook` object: Evolution's schema rejects it.
        if not isinstance(hook, dict):
            return replies.schema_error('instance requires property "webhook"')
        if problems := _webhook_schema_problems(hook):
            return replies.schema_error(*problems)
        if not isinstance(hook.get("events"), list):
            # set() reads events.length unguarded (section 9)
            return replies.error(500, "Internal Server Error", "Cannot read properties of undefined (reading 'length')")
        guarded.webhook = webhook_row(guarded.webhook, hook, instance_id=guarded.instance_id,
                                      new_id=self.sim.new_uuid())
        self.sim.webhook_changed(guarded)
        if (faulted := await self._fault(guarded, request, lambda: guarded.webhook)) is not None:
            return faulted
        return web.json_response(guarded.webhook, status=201)

    async def webhook_find(self, request: web.Request) -> web.StreamResponse:
        await self._delay()
        guarded = self._guard(request)
        if isinstance(guarded, web.Response):
            return guarded
        if (faulted := await self._fault(guarded, request, lambda: guarded.webhook)) is not None:
            return faulted
        return web.json_response(guarded.webhook)  # the row, or null


def _webhook_schema_problems(hook: dict[str, Any]) -> list[str]:
    """webhook.schema.ts as the jsonschema package words it."""
    problems = [f'instance.webhook requires property "{p}"' for p in ("enabled", "url") if p not in hook]
    if "enabled" in hook and not isinstance(hook["enabled"], bool):
        problems.append("instance.webhook.enabled is not of a type(s) boolean")
    if "url" in hook and not isinstance(hook["url"], str):
        problems.append("instance.webhook.url is not of a type(s) string")
    if hook.get("headers") is not None and not isinstance(hook["headers"], dict):
        problems.append("instance.webhook.headers is not of a type(s) object")
    events = hook.get("events")
    if isinstance(events, list):
        problems += [
            f"instance.webhook.events[{i}] is not one of enum values: {','.join(ALL_EVENTS)}"
            for i, e in enumerate(events) if e not in ALL_EVENTS
        ]
    elif events is not None:
        problems.append("instance.webhook.events is not of a type(s) array")
    return problems
