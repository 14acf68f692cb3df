"""The simulator behaves like Evolution API as described in evolution-api.md."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sim_fixtures import eventually, serve

from pgqr.simulator import Simulator, WebhookDelivery
from pgqr.simulator.images import image_pool


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


# ---- images: sized like Evolution's, rendered once ----


async def test_base64_is_a_13_kb_png_data_url_of_a_229_character_baileys_code(simulator: Simulator) -> None:
    """Evolution's data URLs are ~13 KB (node qrcode, scale 4, margin 3, level H); the pool measures 12.8-13.4 KB."""
    simulator.add_instance("shop")
    _, body = await api(simulator, "GET", "/instance/connect/shop")
    assert 12_000 <= len(body["base64"]) <= 14_000, len(body["base64"])
    assert body["code"].startswith("2@") and len(body["code"].split(",")) == 4 and 220 <= len(body["code"]) <= 240
    assert body["base64"] in {image.data_url for image in image_pool(simulator.config.image_pool)}
    assert image_pool(simulator.config.image_pool) is image_pool(simulator.config.image_pool)  # rendered once


async def test_consecutive_qrs_of_one_instance_always_differ(simulator: Simulator) -> None:
    simulator.add_instance("shop")
    seen = [(await api(simulator, "GET", "/instance/connect/shop"))[1]]
    for _ in range(5):
        simulator.rotate("shop")
        seen.append((await api(simulator, "GET", "/instance/connect/shop"))[1])
    assert all(a["base64"] != b["base64"] for a, b in itertools.pairwise(seen))
    assert len({qr["code"] for qr in seen}) == 6 and [qr["count"] for qr in seen] == [1, 2, 3, 4, 5, 6]


# ---- scale: QRs computed from time; pushes only where a webhook waits ----


async def test_qrs_rotate_by_time_and_current_reports_the_md5_evolution_would_accept(simulator: Simulator) -> None:
    simulator.config.qr_ttl = 0.3
    simulator.add_instance("shop", state="connecting")

    async def current_and_connect() -> tuple[dict[str, Any], dict[str, Any]]:
        _, now = await api(simulator, "GET", "/_sim/current")
        _, qr = await api(simulator, "GET", "/instance/connect/shop")
        return now["instances"]["shop"], qr

    first = await eventually(current_and_connect, lambda pair: pair[0]["md5"] is not None)
    later = await eventually(current_and_connect, lambda pair: pair[1]["count"] >= first[1]["count"] + 2)
    for entry, qr in (first, later):
        if entry["count"] == qr["count"]:  # not rotated between the two reads
            assert entry["md5"] == hashlib.md5(qr["base64"].encode()).hexdigest()
    assert simulator.stats("shop").sockets_started == 1
    assert simulator.pending_pushes == 0  # no webhook anywhere: nothing scheduled


async def test_ten_thousand_instances_need_no_task_each(simulator: Simulator) -> None:
    tasks_before = len(asyncio.all_tasks())
    status, made = await api(simulator, "POST", "/_sim/instances/bulk", json={"count": 10_000, "state": "connecting"})
    assert status == 201 and len(made["tokens"]) == 10_000 and "sim-00001" in made["tokens"]
    _, now = await api(simulator, "GET", "/_sim/current")
    states = {entry["state"] for entry in now["instances"].values()}
    with_qr = sum(entry["md5"] is not None for entry in now["instances"].values())
    assert len(now["instances"]) == 10_000 and states == {"connecting"} and with_qr > 9_900
    # Random phases over the hour-long qr_ttl here: only the few that started just under an hour ago rotated.
    assert sum(entry["count"] == 1 for entry in now["instances"].values()) > 9_900
    assert len(asyncio.all_tasks()) - tasks_before < 10
    assert simulator.pending_pushes == 0


async def test_bulk_instances_can_all_start_on_one_phase(simulator: Simulator) -> None:
    simulator.config.first_qr_delay = 30.0  # a first QR half a minute after the socket starts
    # a minute ago: every first QR is out and the next is an hour away (the fixture's qr_ttl)
    status, _ = await api(simulator, "POST", "/_sim/instances/bulk",
                          json={"count": 200, "state": "connecting", "prefix": "past", "phase": 60})
    assert status == 201
    # just now: none has its first QR yet (for half a minute)
    status, _ = await api(simulator, "POST", "/_sim/instances/bulk",
                          json={"count": 200, "state": "connecting", "prefix": "now", "phase": 0})
    assert status == 201
    _, now = await api(simulator, "GET", "/_sim/current")
    past = [e for n, e in now["instances"].items() if n.startswith("past-")]
    fresh = [e for n, e in now["instances"].items() if n.startswith("now-")]
    assert len(past) == len(fresh) == 200
    assert all(e["md5"] is not None and e["count"] == 1 for e in past)
    assert all(e["md5"] is None for e in fresh)
    for bad in (-1, "10", True):
        status, reply = await api(simulator, "POST", "/_sim/instances/bulk",
                                  json={"count": 1, "state": "connecting", "prefix": "bad", "phase": bad})
        assert status == 400 and "phase" in reply["error"]


async def test_rotations_are_pushed_once_a_webhook_is_set(simulator: Simulator, receiver: Receiver) -> None:
    simulator.config.qr_ttl = 0.2
    simulator.add_instances(3, state="connecting")
    assert simulator.pending_pushes == 0
    simulator.config.global_webhook_url = receiver.url  # set late, as the demo does
    for name in ("sim-00001", "sim-00002", "sim-00003"):
        found = await simulator.wait_for_webhooks(
            lambda d, name=name: d.body["instance"] == name and d.body["event"] == "qrcode.updated", n=3)
        codes = [d.body["data"]["qrcode"]["code"] for d in found]
        assert len(set(codes)) == len(codes)
    assert simulator.pending_pushes == 3


# ---- per-instance call stats ----


async def test_stats_keep_call_times_and_concurrency(simulator: Simulator) -> None:
    simulator.add_instance("shop", state="connecting")
    for _ in range(3):
        await api(simulator, "GET", "/instance/connect/shop")
    await api(simulator, "GET", "/instance/connectionState/shop")
    stats = simulator.stats("shop")
    assert (stats.connect_calls, stats.state_calls, stats.max_concurrent_calls) == (3, 1, 1)
    assert stats.most_calls_within(60) == 4 and len(stats.recent_calls) == 4
    simulator.config.latency = 0.2  # positive control: two calls at once are seen as two
    await asyncio.gather(api(simulator, "GET", "/instance/connect/shop"),
                         api(simulator, "GET", "/instance/connectionState/shop"))
    assert simulator.stats("shop").max_concurrent_calls == 2


# ---- where Evolution fails (evolution-api.md section 9) ----


async def test_lower_case_event_names_are_refused_listing_the_allowed_ones(simulator: Simulator) -> None:
    simulator.add_instance("shop")
    hook = {"enabled": True, "url": "http://127.0.0.1:9/x", "events": ["qrcode.updated"]}
    status, body = await api(simulator, "POST", "/webhook/set/shop", json={"webhook": hook})
    assert status == 400 and body["error"] == "Bad Request"
    [[message]] = body["response"]["message"]
    assert "QRCODE_UPDATED" in message and "CONNECTION_UPDATE" in message
    hook["events"] = ["QRCODE_UPDATED"]  # positive control
    assert (await api(simulator, "POST", "/webhook/set/shop", json={"webhook": hook}))[0] == 201


async def test_webhook_set_events_and_headers_as_evolution_stores_them(simulator: Simulator) -> None:
    simulator.add_instance("shop")
    hook: dict[str, Any] = {"enabled": True, "url": "http://127.0.0.1:9/x"}
    status, body = await api(simulator, "POST", "/webhook/set/shop", json={"webhook": hook})
    assert (status, body["response"]["message"]) == (500, "Cannot read properties of undefined (reading 'length')")
    status, row = await api(simulator, "POST", "/webhook/set/shop", json={"webhook": {**hook, "events": []}})
    assert status == 201 and row["headers"] is None
    assert len(row["events"]) > 20 and {"QRCODE_UPDATED", "CONNECTION_UPDATE"} <= set(row["events"])
    with_headers = {**hook, "events": ["QRCODE_UPDATED"], "headers": {"X-A": "1"}}
    await api(simulator, "POST", "/webhook/set/shop", json={"webhook": with_headers})
    _, kept = await api(simulator, "POST", "/webhook/set/shop", json={"webhook": {**hook, "events": ["CALL"]}})
    assert (kept["headers"], kept["events"], kept["id"]) == ({"X-A": "1"}, ["CALL"], row["id"])
    assert (await api(simulator, "GET", "/webhook/find/shop"))[1] == kept


async def test_create_needs_an_integration(simulator: Simulator) -> None:
    status, body = await api(simulator, "POST", "/instance/create", json={"instanceName": "x"})
    assert (status, body["response"]["message"]) == (400, ["Invalid integration"])
    status, body = await api(simulator, "POST", "/instance/create", json={"integration": "WHATSAPP-BAILEYS"})
    assert (status, body["response"]["message"]) == (400, [['instance requires property "instanceName"']])
    assert (await api(simulator, "POST", "/instance/create", json={**NEW, "instanceName": "x"}))[0] == 201


async def test_fetch_instances_with_a_token_shows_only_its_own_row(simulator: Simulator) -> None:
    token = simulator.add_instance("shop")
    simulator.add_instance("other")
    status, rows = await api(simulator, "GET", "/instance/fetchInstances", key=token)
    assert status == 200 and [(r["name"], r["token"]) for r in rows] == [("shop", token)]
    assert (await api(simulator, "GET", "/instance/fetchInstances?instanceName=other", key=token))[0] == 401
    status, own = await api(simulator, "GET", "/instance/fetchInstances?instanceName=shop", key=token)
    assert status == 200 and [r["name"] for r in own] == ["shop"]


async def test_logout_sends_evolutions_three_webhooks_in_order(simulator: Simulator, receiver: Receiver) -> None:
    simulator.add_instance("shop")
    hook = {"enabled": True, "url": receiver.url, "events": []}
    await api(simulator, "POST", "/webhook/set/shop", json={"webhook": hook})
    status, body = await api(simulator, "DELETE", "/instance/logout/shop")
    assert status == 400 and "not connected" in body["response"]["message"][0]
    await api(simulator, "GET", "/instance/connect/shop")
    assert (await api(simulator, "DELETE", "/instance/logout/shop"))[0] == 200
    await simulator.wait_for_webhooks(lambda d: d.body["event"] == "logout.instance")
    await simulator.wait_for_webhooks(lambda d: d.body["data"] == {"instance": "shop", "state": "close",
                                                                   "statusReason": 401})
    after = [r.body for r in receiver.received if r.body["event"] in ("status.instance", "logout.instance")
             or r.body["data"].get("state") == "close"]
    assert [b["event"] for b in after] == ["status.instance", "logout.instance", "connection.update"]
    status_data = after[0]["data"]
    assert (status_data["status"], status_data["disconnectionReasonCode"]) == ("closed", 401)
    assert isinstance(status_data["disconnectionObject"], str) and after[1]["data"] is None


async def test_delete_sends_instance_delete_then_remove_instance(simulator: Simulator, receiver: Receiver) -> None:
    simulator.add_instance("shop")
    await api(simulator, "POST", "/webhook/set/shop", json={"webhook": {"enabled": True, "url": receiver.url,
                                                                        "events": []}})
    assert (await api(simulator, "DELETE", "/instance/delete/shop"))[0] == 200
    await simulator.wait_for_webhooks(lambda d: d.body["event"] == "remove.instance")
    bodies = [r.body for r in receiver.received]
    assert [(b["event"], b["data"]) for b in bodies] == [
        ("instance.delete", {"instanceName": "shop", "instanceId": bodies[0]["data"]["instanceId"]}),
        ("remove.instance", None),
    ]
    assert (await api(simulator, "GET", "/instance/connect/shop"))[0] == 404


async def test_flapping_flips_close_and_connecting_with_a_webhook_each_time(
    simulator: Simulator, receiver: Receiver
) -> None:
    simulator.config.flaps_per_minute = (600.0, 600.0)  # every 50 ms instead of every 2-3 s
    simulator.config.global_webhook_url = receiver.url
    simulator.add_instance("storm", mode="flapping")
    found = await simulator.wait_for_webhooks(lambda d: d.body["data"] == {
        "instance": "storm", "state": "connecting", "statusReason": 200}, n=4)
    assert len(found) >= 4
    seen = set()
    for _ in range(200):
        seen.add((await api(simulator, "GET", "/instance/connectionState/storm"))[1]["instance"]["state"])
        if seen == {"close", "connecting"}:
            break
        await asyncio.sleep(0.01)
    assert seen == {"close", "connecting"}
    assert not [d for d in simulator.webhooks if d.body["event"] == "qrcode.updated"]  # no route to WhatsApp


async def test_not_in_memory_ends_when_evolution_reloads_the_instance(simulator: Simulator) -> None:
    simulator.add_instance("shop", mode="not_in_memory")
    assert (await api(simulator, "GET", "/instance/connectionState/shop"))[1] == {"instance": {"instanceName": "shop"}}
    assert (await api(simulator, "POST", "/_sim/instances/shop/reload"))[0] == 200
    _, state = await api(simulator, "GET", "/instance/connectionState/shop")
    assert state == {"instance": {"instanceName": "shop", "state": "connecting"}}
    assert simulator.stats("shop").state_calls == 2 and simulator.stats("shop").sockets_started == 1


# ---- the command line never loads the simulator unless asked ----


def test_pgqr_commands_other_than_simulate_never_import_the_simulator() -> None:
    script = (
        "import contextlib, io, sys, pgqr.cli as cli\n"
        "cli.build_parser().parse_args(['run'])\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    cli.main(['--help'])\n"
        "assert 'pgqr.simulator' not in sys.modules, 'simulator imported'\n"
        "cli.build_parser().parse_args(['simulate', '--port', '0'])\n"
        "assert 'pgqr.simulator' not in sys.modules, 'simulator imported by parsing'\n"
        "from pgqr.simulator import cli as sim_cli\n"
        "assert sim_cli.build_parser().parse_args(['--port', '0', '--instances', '3']).instances == 3\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
