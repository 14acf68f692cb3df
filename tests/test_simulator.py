"""The simulator behaves like Evolution API as described in evolution-api.md."""

from __future__ import annotations

import asyncio
import base64
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sim_fixtures import serve

from pgqr.simulator import Simulator, WebhookDelivery


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Receiver:
    url: str
    received: list[Received] = field(default_factory=list)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A webhook receiver on loopback that records every POST."""
    box = Receiver(url="")

    async def record(request: web.Request) -> web.Response:
        box.received.append(Received(request.path, dict(request.headers), await request.json()))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/{tail:.*}", record)
    async with serve(app) as base_url:
        box.url = f"{base_url}/hooks/evo"
        yield box


async def api(
    sim: Simulator, method: str, path: str, key: str | None = None, json: Any = None
) -> tuple[int, Any]:
    headers = {"APIKEY": key if key is not None else sim.config.api_key}  # header name is case-insensitive
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, sim.base_url + path, headers=headers, json=json) as resp,
    ):
        text = await resp.text()
        return resp.status, (await resp.json(content_type=None)) if text else None


def event_is(event: str) -> Any:
    return lambda d: d.body["event"] == event


async def test_rotation_increments_count_and_changes_code(simulator: Simulator) -> None:
    simulator.add_instance("shop")
    _, first = await api(simulator, "GET", "/instance/connect/shop")
    simulator.rotate("shop")
    _, second = await api(simulator, "GET", "/instance/connect/shop")
    assert (first["count"], second["count"]) == (1, 2)
    assert first["code"] != second["code"] and first["base64"] != second["base64"]
    assert set(second) == {"pairingCode", "code", "base64", "count"} and second["pairingCode"] is None


async def test_base64_is_a_real_png(simulator: Simulator) -> None:
    simulator.add_instance("shop")
    _, body = await api(simulator, "GET", "/instance/connect/shop")
    prefix = "data:image/png;base64,"
    assert body["base64"].startswith(prefix)
    assert base64.b64decode(body["base64"][len(prefix) :]).startswith(b"\x89PNG\r\n\x1a\n")


async def test_connect_while_connecting_starts_no_new_socket(simulator: Simulator) -> None:
    simulator.add_instance("shop")
    replies = [await api(simulator, "GET", "/instance/connect/shop") for _ in range(3)]
    assert {body["code"] for _, body in replies} == {replies[0][1]["code"]}
    stats = simulator.stats("shop")
    assert (stats.connect_calls, stats.sockets_started, stats.count, stats.state) == (3, 1, 1, "connecting")


async def test_connect_after_a_close_can_return_the_stale_qr(simulator: Simulator) -> None:
    simulator.add_instance("shop")
    _, before = await api(simulator, "GET", "/instance/connect/shop")
    simulator.close_instance("shop")
    simulator.config.first_qr_delay = 30  # the new socket has no QR within the controller's sleep
    _, after = await api(simulator, "GET", "/instance/connect/shop")
    assert after == before
    assert simulator.stats("shop").sockets_started == 2


async def test_instance_webhook_envelope(simulator: Simulator, receiver: Receiver) -> None:
    token = simulator.add_instance("shop")
    hook = {
        "enabled": True,
        "url": receiver.url,
        "headers": {"X-Pgqr-Secret": "s3cret"},
        "byEvents": True,
        "base64": False,
        "events": ["QRCODE_UPDATED", "CONNECTION_UPDATE"],
    }
    status, row = await api(simulator, "POST", "/webhook/set/shop", key=token, json={"webhook": hook})
    assert status == 201
    assert (row["url"], row["webhookByEvents"], row["events"]) == (receiver.url, True, hook["events"])
    _, qr = await api(simulator, "GET", "/instance/connect/shop")
    await simulator.wait_for_webhooks(event_is("qrcode.updated"))

    paths = [r.path for r in receiver.received]
    assert paths == ["/hooks/evo/connection-update", "/hooks/evo/qrcode-updated"]
    connecting, qr_event = (r.body for r in receiver.received)
    assert connecting["data"] == {"instance": "shop", "state": "connecting", "statusReason": 200}
    assert set(qr_event) == {"event", "instance", "data", "destination", "date_time", "server_url", "apikey"}
    assert qr_event["data"] == {
        "qrcode": {"instance": "shop", "pairingCode": None, "code": qr["code"], "base64": qr["base64"]}
    }
    assert (qr_event["destination"], qr_event["server_url"]) == (receiver.url, simulator.base_url)
    assert qr_event["apikey"] == token
    assert qr_event["date_time"].endswith("Z")
    assert all(r.headers["X-Pgqr-Secret"] == "s3cret" for r in receiver.received)


async def test_flat_webhook_body_is_rejected(simulator: Simulator) -> None:
    simulator.add_instance("shop")
    flat = {"url": "http://127.0.0.1:9/x", "webhookByEvents": False, "events": ["QRCODE_UPDATED"]}
    status, body = await api(simulator, "POST", "/webhook/set/shop", json=flat)
    assert status == 400 and body["error"] == "Bad Request"
    assert (await api(simulator, "GET", "/webhook/find/shop")) == (200, None)


async def test_qrcode_limit_sequence(simulator: Simulator, receiver: Receiver) -> None:
    simulator.config.qrcode_limit = 2
    simulator.config.global_webhook_url = receiver.url
    simulator.config.expose_token_in_webhook = False
    simulator.add_instance("shop")
    await api(simulator, "GET", "/instance/connect/shop")  # QR 1
    simulator.rotate("shop")  # QR 2, the limit
    simulator.rotate("shop")  # the next one trips QRCODE_LIMIT
    await simulator.wait_for_webhooks(lambda d: d.body["data"].get("state") == "refused")

    events = [(r.body["event"], r.body["data"]) for r in receiver.received]
    assert [e for e, _ in events] == ["connection.update", *["qrcode.updated"] * 3, "connection.update"]
    assert events[3][1] == {"message": "QR code limit reached, please login again", "statusCode": 500}
    assert events[4][1]["state"] == "refused" and events[4][1]["statusReason"] == 428
    assert all(r.body["apikey"] is None for r in receiver.received)
    assert all(r.path == "/hooks/evo" for r in receiver.received)
    stats = simulator.stats("shop")
    assert (stats.state, stats.count) == ("close", 0)
    assert await api(simulator, "GET", "/instance/connectionState/shop") == (
        200,
        {"instance": {"instanceName": "shop", "state": "close"}},
    )
    _, again = await api(simulator, "GET", "/instance/connect/shop")  # starts over from count 0
    assert again["count"] == 1 and simulator.stats("shop").sockets_started == 2


async def test_scan_opens_the_instance(simulator: Simulator, receiver: Receiver) -> None:
    simulator.config.global_webhook_url = receiver.url
    simulator.config.global_webhook_by_events = True
    simulator.add_instance("shop")
    await api(simulator, "GET", "/instance/connect/shop")
    simulator.scan("shop")
    deliveries: list[WebhookDelivery] = await simulator.wait_for_webhooks(
        lambda d: d.body["data"].get("state") == "open"
    )
    opened = deliveries[0]
    assert opened.url == receiver.url + "/connection-update"
    assert opened.body["data"]["wuid"].endswith("@s.whatsapp.net")
    assert opened.body["sender"] == opened.body["data"]["wuid"]
    assert await api(simulator, "GET", "/instance/connect/shop") == (
        200,
        {"instance": {"instanceName": "shop", "state": "open"}},
    )


async def test_unknown_route_and_wrong_method_bodies(simulator: Simulator) -> None:
    simulator.add_instance("foo")
    assert await api(simulator, "POST", "/instance/connect/foo") == (
        404,
        {"status": 404, "error": "Not Found", "response": {"message": ["Cannot POST /instance/connect/foo"]}},
    )
    status, body = await api(simulator, "GET", "/nope")
    assert status == 404 and body["response"]["message"] == ["Cannot GET /nope"]


async def test_guard_order_and_error_bodies(simulator: Simulator) -> None:
    simulator.add_instance("shop")
    assert await api(simulator, "GET", "/instance/connectionState/ghost", key="wrong") == (
        404,
        {
            "status": 404,
            "error": "Not Found",
            "response": {"message": ['The "ghost" instance does not exist']},
        },
    )
    assert await api(simulator, "GET", "/instance/connectionState/shop", key="wrong") == (
        401,
        {"status": 401, "error": "Unauthorized", "response": {"message": "Unauthorized"}},
    )


NEW = {"instanceName": "new", "integration": "WHATSAPP-BAILEYS"}


async def test_create_and_fetch_instances(simulator: Simulator) -> None:
    status, created = await api(simulator, "POST", "/instance/create", json=NEW)
    assert status == 201 and isinstance(created["hash"], str)
    assert created["instance"]["instanceName"] == "new" and created["instance"]["status"] == "close"
    status, dup = await api(simulator, "POST", "/instance/create", json=NEW)
    assert status == 403 and dup["response"]["message"] == ['This name "new" is already in use.']
    simulator.add_instance("other")
    _, everything = await api(simulator, "GET", "/instance/fetchInstances")
    assert sorted(row["name"] for row in everything) == ["new", "other"]
    _, own = await api(simulator, "GET", "/instance/fetchInstances", key=created["hash"])
    assert [row["name"] for row in own] == ["new"]
    assert (await api(simulator, "POST", "/instance/create", key=created["hash"], json={}))[0] == 401


async def test_control_api(simulator: Simulator) -> None:
    status, made = await api(
        simulator, "POST", "/_sim/instances", json={"name": "demo", "state": "connecting"}
    )
    assert status == 201 and made["token"]
    status, _ = await api(simulator, "POST", "/_sim/instances/demo/scan")
    assert status == 200
    _, stats = await api(simulator, "GET", "/_sim/stats")
    assert stats["instances"]["demo"]["state"] == "open"
    assert (await api(simulator, "POST", "/_sim/instances/demo/rotate"))[0] == 409


async def test_deleted_instance_is_gone(simulator: Simulator) -> None:
    simulator.add_instance("shop")
    await api(simulator, "GET", "/instance/connect/shop")
    assert (await api(simulator, "DELETE", "/instance/delete/shop"))[0] == 200
    assert (await api(simulator, "GET", "/instance/connect/shop"))[0] == 404


async def test_pgqr_simulate_serves_its_instances_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgqr", "simulate", "--port", "0", "--instances", "2", "--connect-sleep", "0.2",
        "--first-qr-delay", "0.05", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        fields = dict(part.split("=", 1) for part in line.split()[3:])
        name, token = fields["instances"].split(",")[0].split(":")
        url = f"{fields['base_url']}/instance/connect/{name}"
        async with aiohttp.ClientSession() as http, http.get(url, headers={"apikey": token}) as r:
            body = await r.json()
        assert r.status == 200 and body["base64"].startswith("data:image/png;base64,") and body["count"] == 1
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
