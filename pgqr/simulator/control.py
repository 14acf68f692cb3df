"""The /_sim control API: what a demo, a benchmark or a test does that no Evolution client can.

No authentication: bind the simulator to loopback.

    POST /_sim/instances                {"name", "token"?, "state"?, "mode"?}     -> 201 {name, token}
    POST /_sim/instances/bulk           {"count", "prefix"?, "start"?, "state"?, "mode"?, "phase"?}
                                                                                -> 201 {"tokens": {...}}
    GET  /_sim/instances                                                        -> {name: {token, state, mode}}
    POST /_sim/instances/{name}/scan | rotate | close | reload                  -> that instance's stats
    POST /_sim/instances/{name}/mode    {"mode"}                                -> that instance's stats
    GET  /_sim/stats                                                            -> every instance's stats
    GET  /_sim/current                  -> {"at": unix seconds, "instances": {name: {state, md5, count}}}
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, cast

from aiohttp import web

from .config import MODES, STATES, Mode, State
from .surface import ControlSurface

__all__ = ["add_routes"]

MAX_BULK = 100_000


def add_routes(app: web.Application, sim: ControlSurface) -> None:
    c = _Control(sim)
    app.router.add_post("/_sim/instances", c.add)
    app.router.add_post("/_sim/instances/bulk", c.bulk)
    app.router.add_get("/_sim/instances", c.listing)
    app.router.add_post("/_sim/instances/{name}/scan", c.action(sim.scan))
    app.router.add_post("/_sim/instances/{name}/rotate", c.action(sim.rotate))
    app.router.add_post("/_sim/instances/{name}/close", c.action(sim.close_instance))
    app.router.add_post("/_sim/instances/{name}/reload", c.action(sim.reload))
    app.router.add_post("/_sim/instances/{name}/mode", c.mode)
    app.router.add_get("/_sim/stats", c.stats)
    app.router.add_get("/_sim/current", c.current)


def _refuse(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _object_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _state_and_mode(body: dict[str, Any]) -> tuple[State, Mode] | None:
    state, mode = body.get("state", "close"), body.get("mode", "normal")
    if state not in STATES or mode not in MODES:
        return None
    return cast(State, state), cast(Mode, mode)


class _Control:
    def __init__(self, sim: ControlSurface) -> None:
        self.sim = sim

    async def add(self, request: web.Request) -> web.Response:
        body = await _object_body(request)
        chosen = _state_and_mode(body)
        if not isinstance(body.get("name"), str) or chosen is None:
            return _refuse(400, f"body needs a string `name`; state in {STATES}, mode in {MODES}")
        token = body.get("token") if isinstance(body.get("token"), str) else None
        try:
            token = self.sim.add_instance(body["name"], token, state=chosen[0], mode=chosen[1])
        except ValueError as exc:
            return _refuse(409, str(exc))
        return web.json_response({"name": body["name"], "token": token}, status=201)

    async def bulk(self, request: web.Request) -> web.Response:
        body = await _object_body(request)
        chosen = _state_and_mode(body)
        count, prefix, start = body.get("count"), body.get("prefix", "sim"), body.get("start", 1)
        phase = body.get("phase")
        if (not isinstance(count, int) or not 0 < count <= MAX_BULK or not isinstance(prefix, str)
                or not isinstance(start, int) or chosen is None
                or not (phase is None or (isinstance(phase, int | float) and not isinstance(phase, bool)
                                          and phase >= 0))):
            return _refuse(400, f"body needs `count` in 1..{MAX_BULK}; prefix a string, start an int, "
                                f"state in {STATES}, mode in {MODES}, phase (optional) seconds >= 0")
        try:
            tokens = self.sim.add_instances(count, prefix=prefix, start=start, state=chosen[0], mode=chosen[1],
                                            phase=None if phase is None else float(phase))
        except ValueError as exc:
            return _refuse(409, str(exc))
        return web.json_response({"tokens": tokens}, status=201)

    async def listing(self, request: web.Request) -> web.Response:
        return web.json_response({
            i.name: {"token": i.token, "state": i.state, "mode": i.mode} for i in self.sim.instances.values()
        })

    def action(self, step: Callable[[str], None]) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            return self._act(request, step)

        return handler

    async def mode(self, request: web.Request) -> web.Response:
        mode = (await _object_body(request)).get("mode")
        if mode not in MODES:
            return _refuse(400, f"body needs `mode` in {MODES}")
        return self._act(request, lambda name: self.sim.set_mode(name, cast(Mode, mode)))

    def _act(self, request: web.Request, step: Callable[[str], None]) -> web.Response:
        name = request.match_info["name"]
        if name not in self.sim.instances:
            return _refuse(404, f"no instance {name!r}")
        try:
            step(name)
        except ValueError as exc:
            return _refuse(409, str(exc))
        return web.json_response(asdict(self.sim.stats(name)))

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({
            "instances": {n: asdict(self.sim.stats(n)) for n in list(self.sim.instances)},
            "webhooks": {"attempted": len(self.sim.webhooks), "failed": self.sim.webhook_failures},
        })

    async def current(self, request: web.Request) -> web.Response:
        return web.json_response({"at": time.time(), "instances": self.sim.current()})
