"""The Evolution client turns every reply class into a typed outcome (evolution-api.md sections 1-2)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, get_args

import aiohttp
import pytest
from aiohttp import web
from sim_fixtures import eventually, serve

from pgqr.evolution import (
    ERROR_CLASSES,
    Connected,
    ErrorClass,
    EvolutionClient,
    EvolutionState,
    Failure,
    InstanceList,
    NoQrYet,
    NoWebhook,
    QrCode,
    Reply,
    WebhookConfig,
    classify_connect_reply,
    classify_connection_state_reply,
    classify_fetch_instances_reply,
    classify_webhook_reply,
)
from pgqr.simulator import Mode, Simulator


def assert_failure(reply: Reply, error_class: str, *, transient: bool, status: int | None) -> Failure:
    outcome = reply.outcome
    assert isinstance(outcome, Failure), outcome
    assert (outcome.error_class, outcome.transient, outcome.http_status) == (error_class, transient, status)
    return outcome


def assert_no_secret(failure: Failure, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in failure.detail


async def test_close_instance_returns_a_qr(simulator: Simulator, evolution_client: EvolutionClient) -> None:
    simulator.add_instance("shop")
    reply = await evolution_client.connect(simulator.base_url, "shop", simulator.config.api_key)
    qr = reply.outcome
    assert isinstance(qr, QrCode)
    assert qr.code.startswith("2@")
    assert qr.base64.startswith("data:image/png;base64,")
    assert (qr.pairing_code, qr.count, qr.http_status) == (None, 1, 200)
    assert reply.latency_ms > 0


async def test_instance_token_is_accepted(simulator: Simulator, evolution_client: EvolutionClient) -> None:
    token = simulator.add_instance("shop")
    reply = await evolution_client.connect(simulator.base_url + "/", "shop", token)
    assert isinstance(reply.outcome, QrCode)


async def test_number_asks_for_a_pairing_code(
    simulator: Simulator, evolution_client: EvolutionClient
) -> None:
    simulator.add_instance("shop")
    reply = await evolution_client.connect(
        simulator.base_url, "shop", simulator.config.api_key, number="5511999990000"
    )
    assert isinstance(reply.outcome, QrCode)
    assert reply.outcome.pairing_code is not None and len(reply.outcome.pairing_code) == 8


async def test_no_qr_before_the_first_one_is_count_zero(
    simulator: Simulator, evolution_client: EvolutionClient
) -> None:
    simulator.config.first_qr_delay = 30  # the socket is slower than the controller's sleep
    simulator.add_instance("shop")
    reply = await evolution_client.connect(simulator.base_url, "shop", simulator.config.api_key)
    assert reply.outcome == NoQrYet(count=0)


async def test_open_instance_is_connected(simulator: Simulator, evolution_client: EvolutionClient) -> None:
    simulator.add_instance("shop", state="open")
    reply = await evolution_client.connect(simulator.base_url, "shop", simulator.config.api_key)
    assert reply.outcome == Connected()


async def test_missing_instance_is_not_found(simulator: Simulator, evolution_client: EvolutionClient) -> None:
    reply = await evolution_client.connect(simulator.base_url, "ghost", simulator.config.api_key)
    failure = assert_failure(reply, "not_found", transient=False, status=404)
    assert failure.detail == "HTTP 404: instance does not exist"
    assert_no_secret(failure, simulator.config.api_key)


async def test_missing_instance_is_not_found_even_with_a_wrong_key(
    simulator: Simulator, evolution_client: EvolutionClient
) -> None:
    reply = await evolution_client.connect(simulator.base_url, "ghost", "wrong-key")
    assert_failure(reply, "not_found", transient=False, status=404)


async def test_wrong_key_is_unauthorized(simulator: Simulator, evolution_client: EvolutionClient) -> None:
    simulator.add_instance("shop")
    reply = await evolution_client.connect(simulator.base_url, "shop", "wrong-key-abc")
    assert_no_secret(assert_failure(reply, "unauthorized", transient=False, status=401), "wrong-key-abc")
    assert simulator.stats("shop").connect_calls == 0


async def test_another_instances_token_is_unauthorized(
    simulator: Simulator, evolution_client: EvolutionClient
) -> None:
    simulator.add_instance("shop")
    other_token = simulator.add_instance("other")
    reply = await evolution_client.connect(simulator.base_url, "shop", other_token)
    assert_no_secret(assert_failure(reply, "unauthorized", transient=False, status=401), other_token)


async def test_an_instance_not_in_memory_is_transient_not_loaded(
    simulator: Simulator, evolution_client: EvolutionClient
) -> None:
    simulator.add_instance("shop", mode="not_in_memory")
    reply = await evolution_client.connect(simulator.base_url, "shop", simulator.config.api_key)
    assert_failure(reply, "not_loaded", transient=True, status=200)
    simulator.reload("shop")  # Evolution reloaded it: the same call now succeeds
    again = await eventually(lambda: evolution_client.connect(simulator.base_url, "shop", simulator.config.api_key),
                             lambda r: isinstance(r.outcome, QrCode))
    assert isinstance(again.outcome, QrCode)


async def test_empty_body_is_empty_reply(simulator: Simulator, evolution_client: EvolutionClient) -> None:
    simulator.add_instance("shop", mode="empty_reply")
    reply = await evolution_client.connect(simulator.base_url, "shop", simulator.config.api_key)
    assert_failure(reply, "empty_reply", transient=False, status=200)


async def test_license_503_is_not_activated(simulator: Simulator, evolution_client: EvolutionClient) -> None:
    simulator.add_instance("shop", mode="license")
    reply = await evolution_client.connect(simulator.base_url, "shop", simulator.config.api_key)
    assert_failure(reply, "not_activated", transient=False, status=503)


async def test_500_is_a_transient_server_error(
    simulator: Simulator, evolution_client: EvolutionClient
) -> None:
    simulator.config.error_rate = 1.0
    simulator.add_instance("shop")
    reply = await evolution_client.connect(simulator.base_url, "shop", simulator.config.api_key)
    assert_failure(reply, "server_error", transient=True, status=500)


async def test_hang_is_a_transient_timeout(simulator: Simulator) -> None:
    simulator.config.timeout_rate = 1.0
    simulator.add_instance("shop")
    async with EvolutionClient(timeout=0.2) as client:
        started = time.monotonic()
        reply = await client.connect(simulator.base_url, "shop", simulator.config.api_key)
    assert_failure(reply, "timeout", transient=True, status=None)
    assert time.monotonic() - started < 1.5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_connection_refused_is_a_transient_network_error(evolution_client: EvolutionClient) -> None:
    reply = await evolution_client.connect(f"http://127.0.0.1:{_free_port()}", "shop", "key-123")
    assert_no_secret(assert_failure(reply, "network", transient=True, status=None), "key-123")


async def test_reply_over_the_cap_is_too_large(simulator: Simulator) -> None:
    simulator.add_instance("shop")  # a QR reply carries a PNG of a few KB
    async with EvolutionClient(timeout=2, max_reply_bytes=512) as client:
        reply = await client.connect(simulator.base_url, "shop", simulator.config.api_key)
    assert_failure(reply, "too_large", transient=False, status=200)


async def test_name_with_spaces_and_slashes_reaches_that_instance(
    simulator: Simulator, evolution_client: EvolutionClient
) -> None:
    name = "team a/b?c#d%e"
    simulator.add_instance(name)
    simulator.add_instance("team a")
    reply = await evolution_client.connect(simulator.base_url, name, simulator.config.api_key)
    assert isinstance(reply.outcome, QrCode)
    assert simulator.stats(name).connect_calls == 1
    assert simulator.stats("team a").connect_calls == 0


async def test_check_key_accepts_the_global_key_and_rejects_others(
    simulator: Simulator, evolution_client: EvolutionClient
) -> None:
    ok = await evolution_client.check_key(simulator.base_url, simulator.config.api_key)
    assert ok.outcome == NoQrYet(count=None)
    bad = await evolution_client.check_key(simulator.base_url, "nope")
    assert_failure(bad, "unauthorized", transient=False, status=401)


async def test_connects_to_one_instance_are_serialised_others_run_concurrently(
    simulator: Simulator, evolution_client: EvolutionClient
) -> None:
    simulator.config.latency = 0.2
    for name in ("a", "b"):
        simulator.add_instance(name)
    key = simulator.config.api_key
    started = time.monotonic()
    replies = await asyncio.gather(
        *(evolution_client.connect(simulator.base_url, name, key) for name in ("a", "b") * 3)
    )
    elapsed = time.monotonic() - started
    assert all(isinstance(r.outcome, QrCode) for r in replies)
    for name in ("a", "b"):
        stats = simulator.stats(name)
        assert (stats.connect_calls, stats.max_concurrent_connects, stats.sockets_started) == (3, 1, 1)
    # Serial per instance is >= 3 x 0.2 s; serial across instances would be >= 1.2 s.
    assert elapsed < 1.1


# ---- reply shapes the simulator never sends (proxies, other versions): a canned server ----

CANNED: dict[str, tuple[int, bytes, dict[str, str]]] = {
    "not-json": (200, b"<html>gateway</html>", {}),
    "json-list": (200, b"[1, 2]", {}),
    "json-odd": (200, b'{"hello": "world"}', {}),
    "bad-count": (200, b'{"count": "three"}', {}),
    "no-state": (200, b'{"instance": {"instanceName": "x"}}', {}),
    "teapot": (418, b"{}", {}),
    "throttled": (429, b"", {}),
    "other-error": (200, b'{"error": true, "message": "something else"}', {}),
    "redirect": (302, b"", {"Location": "http://elsewhere.invalid/"}),
    "bad-gateway": (502, b"<html>bad gateway</html>", {}),
}


@pytest.fixture
async def canned_url() -> AsyncIterator[str]:
    async def reply(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "streamed-big":  # chunked, no Content-Length: the cap must stop the read
            resp = web.StreamResponse()
            await resp.prepare(request)
            for _ in range(64):
                await resp.write(b"x" * 1024)
            await resp.write_eof()
            return resp
        status, body, headers = CANNED[name]
        return web.Response(status=status, body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/instance/connect/{name}", reply)
    async with serve(app) as base_url:
        yield base_url


@pytest.mark.parametrize(
    ("name", "error_class", "transient", "status"),
    [
        ("not-json", "bad_reply", False, 200),
        ("json-list", "bad_reply", False, 200),
        ("json-odd", "bad_reply", False, 200),
        ("bad-count", "bad_reply", False, 200),
        ("teapot", "http_error", False, 418),
        ("throttled", "throttled", True, 429),
        ("other-error", "api_error", False, 200),
        ("redirect", "http_error", False, 302),
        ("bad-gateway", "server_error", True, 502),
    ],
)
async def test_unexpected_replies_are_typed_failures(
    canned_url: str,
    evolution_client: EvolutionClient,
    name: str,
    error_class: str,
    transient: bool,
    status: int,
) -> None:
    reply = await evolution_client.connect(canned_url, name, "key")
    assert_failure(reply, error_class, transient=transient, status=status)


async def test_instance_without_state_is_no_qr_yet(
    canned_url: str, evolution_client: EvolutionClient
) -> None:
    reply = await evolution_client.connect(canned_url, "no-state", "key")
    assert reply.outcome == NoQrYet(count=None)


async def test_streamed_reply_over_the_cap_is_too_large(canned_url: str) -> None:
    async with EvolutionClient(timeout=2, max_reply_bytes=16_384) as client:
        reply = await client.connect(canned_url, "streamed-big", "key")
    assert_failure(reply, "too_large", transient=False, status=200)


def test_unknown_route_404_says_check_the_base_url() -> None:
    body = b'{"status":404,"error":"Not Found","response":{"message":["Cannot GET /v2/instance/connect/x"]}}'
    outcome = classify_connect_reply(404, body)
    assert isinstance(outcome, Failure) and outcome.error_class == "not_found"
    assert "base URL" in outcome.detail


# ---- golden replies (tests/golden/, written by hand from evolution-api.md) ----

GOLDEN = Path(__file__).parent / "golden"
GOLDENS = sorted(GOLDEN.glob("*.json"))


def _golden(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def _golden_body(golden: dict[str, Any]) -> bytes:
    text = golden["body_text"] if "body_text" in golden else json.dumps(golden["body"])
    return str(text).encode()


def _classify(golden: dict[str, Any]) -> object:
    status, body = golden["status"], _golden_body(golden)
    call = golden["call"]
    if call == "connect":
        return classify_connect_reply(status, body)
    if call == "connection_state":
        return classify_connection_state_reply(status, body)
    if call == "fetch_instances":
        return classify_fetch_instances_reply(status, body, golden["key"])
    assert call == "webhook", call
    return classify_webhook_reply(status, body)


def _matches(outcome: object, expect: dict[str, Any]) -> None:
    assert type(outcome).__name__ == expect["type"], outcome
    if isinstance(outcome, Failure):
        assert (outcome.error_class, outcome.transient) == (expect["error_class"], expect["transient"])
        assert outcome.transient is ERROR_CLASSES[outcome.error_class].transient
    elif isinstance(outcome, QrCode):
        assert (outcome.count, outcome.pairing_code) == (expect["count"], expect["pairing_code"])
    elif isinstance(outcome, NoQrYet):
        assert outcome.count == expect["count"]
    elif isinstance(outcome, EvolutionState):
        assert outcome.state == expect["state"]
    elif isinstance(outcome, InstanceList):
        assert (outcome.key_scope, [r.name for r in outcome.rows]) == (expect["key_scope"], expect["names"])
    elif isinstance(outcome, WebhookConfig):
        assert (list(outcome.events), list(outcome.header_names)) == (expect["events"], expect["header_names"])


@pytest.mark.parametrize("path", GOLDENS, ids=[p.stem for p in GOLDENS])
def test_golden_reply_is_classified_as_expected(path: Path) -> None:
    golden = _golden(path)
    _matches(_classify(golden), golden["expect"])


def test_there_are_goldens_for_every_call_and_a_failure_for_each_simulator_route() -> None:
    calls = {_golden(p)["call"] for p in GOLDENS}
    assert calls == {"connect", "connection_state", "fetch_instances", "webhook"}
    assert sum("simulator" in _golden(p) for p in GOLDENS) >= 12


async def _sim_call(sim: Simulator, method: str, path: str, key: str | None = None,
                    json_body: Any = None) -> tuple[int, bytes]:
    headers = {"apikey": sim.config.api_key if key is None else key}
    async with aiohttp.ClientSession() as http, http.request(
            method, sim.base_url + path, headers=headers, json=json_body) as resp:
        return resp.status, await resp.read()


HOOK = {"enabled": True, "url": "http://127.0.0.1:9/hook", "events": ["QRCODE_UPDATED", "CONNECTION_UPDATE"]}


async def _scenario(sim: Simulator, name: str) -> tuple[int, bytes]:
    """The situation a golden file describes, played on the simulator."""
    if name == "connect_close_instance":
        sim.add_instance("shop")
    elif name == "connect_with_number":
        sim.add_instance("shop")
        return await _sim_call(sim, "GET", "/instance/connect/shop?number=5511999990000")
    elif name == "connect_before_first_qr":
        sim.config.first_qr_delay = 30
        sim.add_instance("shop")
    elif name == "connect_open_instance":
        sim.add_instance("shop", state="open")
    elif name in ("connect_not_in_memory", "state_not_in_memory"):
        sim.add_instance("shop", mode="not_in_memory")
    elif name == "connect_missing_instance":
        return await _sim_call(sim, "GET", "/instance/connect/ghost")
    elif name == "connect_wrong_key":
        sim.add_instance("shop")
        return await _sim_call(sim, "GET", "/instance/connect/shop", key="wrong")
    elif name == "post_to_connect":
        sim.add_instance("shop")
        return await _sim_call(sim, "POST", "/instance/connect/shop")
    elif name == "connect_license":
        sim.add_instance("shop", mode="license")
    elif name == "state_connecting":
        sim.add_instance("shop", state="connecting")
    elif name == "fetch_instances_global":
        sim.add_instance("shop", state="connecting")
        sim.add_instance("other")
        return await _sim_call(sim, "GET", "/instance/fetchInstances")
    elif name.startswith("webhook_"):
        sim.add_instance("shop")
        if name == "webhook_find_unset":
            return await _sim_call(sim, "GET", "/webhook/find/shop")
        body = {
            "webhook_set_flat": {"url": HOOK["url"], "webhookByEvents": False, "events": HOOK["events"]},
            "webhook_set_without_events": {"webhook": {"enabled": True, "url": HOOK["url"]}},
            "webhook_set_ok": {"webhook": HOOK},
        }[name]
        return await _sim_call(sim, "POST", "/webhook/set/shop", json_body=body)
    route = "connectionState" if name.startswith("state_") else "connect"
    return await _sim_call(sim, "GET", f"/instance/{route}/shop")


def _same_shape(golden: Any, got: Any, where: str = "body") -> None:
    if isinstance(golden, dict):
        assert isinstance(got, dict) and set(got) == set(golden), f"{where}: {got!r}"
        for key in golden:
            _same_shape(golden[key], got[key], f"{where}.{key}")
    elif isinstance(golden, list):
        assert isinstance(got, list) and bool(got) == bool(golden), f"{where}: {got!r}"
        if golden:
            _same_shape(golden[0], got[0], f"{where}[0]")
    elif isinstance(golden, str) and golden.startswith("data:image/"):
        assert isinstance(got, str) and got.startswith(golden.split(",")[0]), where
    else:
        assert type(got) is type(golden), f"{where}: {got!r} is not like {golden!r}"


SIMULATED = [p for p in GOLDENS if "simulator" in _golden(p)]


@pytest.mark.parametrize("path", SIMULATED, ids=[p.stem for p in SIMULATED])
async def test_the_simulator_answers_like_the_golden_reply(simulator: Simulator, path: Path) -> None:
    golden = _golden(path)
    status, body = await _scenario(simulator, golden["simulator"]["scenario"])
    assert status == golden["status"]
    got = json.loads(body) if body else None
    outcome = _classify({**golden, "body": got})
    if golden["simulator"]["compare"] == "exact":
        assert got == golden["body"]
        _matches(outcome, golden["expect"])
    else:  # values differ (codes, ids); the client must still read it as the same kind of outcome
        _same_shape(golden["body"], got)
        assert type(outcome).__name__ == golden["expect"]["type"]


# ---- the error table ----


def test_every_error_class_has_one_row_in_the_table() -> None:
    assert set(get_args(ErrorClass)) == set(ERROR_CLASSES)
    assert all(info.meaning and "\n" not in info.meaning for info in ERROR_CLASSES.values())
    assert ERROR_CLASSES["not_loaded"].transient and not ERROR_CLASSES["not_found"].transient


# ---- connectionState, fetchInstances, webhook set/find against the simulator ----


async def test_connection_state_reads_each_state_without_side_effects(
    simulator: Simulator, evolution_client: EvolutionClient
) -> None:
    key = simulator.config.api_key
    for name, state in (("a", "close"), ("b", "connecting"), ("c", "open")):
        simulator.add_instance(name, state=state)
        assert await evolution_client.connection_state(simulator.base_url, name, key) == EvolutionState(state)
    simulator.add_instance("d", mode="not_in_memory")
    assert await evolution_client.connection_state(simulator.base_url, "d", key) == EvolutionState(None)
    assert simulator.stats("a").sockets_started == 0 and simulator.stats("a").state_calls == 1


async def test_fetch_instances_tells_a_global_key_from_an_instance_token(
    simulator: Simulator, evolution_client: EvolutionClient
) -> None:
    token = simulator.add_instance("shop")
    simulator.add_instance("other")
    everyone = await evolution_client.fetch_instances(simulator.base_url, simulator.config.api_key)
    assert isinstance(everyone, InstanceList) and everyone.key_scope == "global"
    assert sorted(r.name for r in everyone.rows) == ["other", "shop"]
    own = await evolution_client.fetch_instances(simulator.base_url, token)
    assert isinstance(own, InstanceList) and own.key_scope == "instance"
    assert [(r.name, r.holds_key) for r in own.rows] == [("shop", True)]
    assert token not in repr(own) + repr(everyone)
    bad = await evolution_client.fetch_instances(simulator.base_url, "not-a-key")
    assert isinstance(bad, Failure) and bad.error_class == "unauthorized"


async def test_set_webhook_sends_the_nested_body_and_find_reads_it_back(
    simulator: Simulator, evolution_client: EvolutionClient
) -> None:
    simulator.add_instance("shop")
    base, key = simulator.base_url, simulator.config.api_key
    assert await evolution_client.find_webhook(base, "shop", key) == NoWebhook()
    hook_url = "http://127.0.0.1:9/webhooks/evolution/s3cret-path"
    row = await evolution_client.set_webhook(base, "shop", key, url=hook_url, headers={"X-Secret": "hdr-secret"})
    assert isinstance(row, WebhookConfig)
    assert (row.url, row.events, row.header_names, row.http_status) == (
        hook_url, ("QRCODE_UPDATED", "CONNECTION_UPDATE"), ("X-Secret",), 201)
    assert "s3cret-path" not in repr(row) and "hdr-secret" not in repr(row)
    assert row.header_values == (("X-Secret", "hdr-secret"),)  # kept for doctor's constant-time comparison
    assert await evolution_client.find_webhook(base, "shop", key) == dataclasses.replace(row, http_status=200)


async def test_a_webhook_set_evolution_refuses_is_a_bad_request(
    simulator: Simulator, evolution_client: EvolutionClient
) -> None:
    simulator.add_instance("shop")
    refused = await evolution_client.set_webhook(
        simulator.base_url, "shop", simulator.config.api_key, url="http://x/", events=["qrcode.updated"])
    assert isinstance(refused, Failure) and (refused.error_class, refused.http_status) == ("bad_request", 400)
    done = await evolution_client.set_webhook(  # positive control: the same call with Evolution's names
        simulator.base_url, "shop", simulator.config.api_key, url="http://x/", events=["QRCODE_UPDATED"])
    assert isinstance(done, WebhookConfig)


@pytest.mark.parametrize("name", [".", ".."])
async def test_the_names_dot_and_dot_dot_are_refused_unsent(
    simulator: Simulator, evolution_client: EvolutionClient, name: str
) -> None:
    simulator.add_instance(name)
    key, base = simulator.config.api_key, simulator.base_url
    outcomes = [
        (await evolution_client.connect(base, name, key)).outcome,
        await evolution_client.connection_state(base, name, key),
        await evolution_client.set_webhook(base, name, key, url="http://x/"),
        await evolution_client.find_webhook(base, name, key),
    ]
    assert all(isinstance(o, Failure) and o.error_class == "config" for o in outcomes), outcomes
    assert simulator.stats(name).connect_calls == simulator.stats(name).state_calls == 0
    simulator.add_instance("a..b")  # positive control: dots inside a name are just characters
    assert isinstance((await evolution_client.connect(base, "a..b", key)).outcome, QrCode)


# ---- faults injected per instance ----


@pytest.mark.parametrize(
    ("mode", "error_class", "status"),
    [
        ("hang", "timeout", None),
        ("http_500", "server_error", 500),
        ("html_502", "server_error", 502),
        ("garbage_json", "bad_reply", 200),
        ("huge_body", "too_large", 200),
        ("slow_drip", "timeout", None),
        ("reset", "network", None),
    ],
)
async def test_each_fault_is_a_typed_failure_and_the_instance_recovers(
    simulator: Simulator, mode: Mode, error_class: str, status: int | None
) -> None:
    simulator.add_instance("shop", mode=mode)
    simulator.add_instance("healthy")
    key = simulator.config.api_key
    async with EvolutionClient(timeout=0.5) as client:
        reply = await client.connect(simulator.base_url, "shop", key)
        failure = assert_failure(reply, error_class, transient=ERROR_CLASSES[error_class].transient, status=status)
        assert_no_secret(failure, key)
        assert isinstance((await client.connect(simulator.base_url, "healthy", key)).outcome, QrCode)
        async with aiohttp.ClientSession() as http, http.post(
                f"{simulator.base_url}/_sim/instances/shop/mode", json={"mode": "normal"}) as resp:
            assert resp.status == 200
        again = await eventually(lambda: client.connect(simulator.base_url, "shop", key),
                                 lambda r: isinstance(r.outcome, QrCode))
        assert isinstance(again.outcome, QrCode)


async def test_a_close_connect_slower_than_the_timeout_still_opened_a_socket(simulator: Simulator) -> None:
    simulator.config.connect_sleep = 30  # Evolution's fetch of WhatsApp's web version has no bound
    simulator.add_instance("shop")
    async with EvolutionClient(timeout=0.3) as client:
        reply = await client.connect(simulator.base_url, "shop", simulator.config.api_key)
    assert_failure(reply, "timeout", transient=True, status=None)
    assert simulator.stats("shop").state == "connecting" and simulator.stats("shop").sockets_started == 1
