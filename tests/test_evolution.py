"""The Evolution client turns every reply class into a typed outcome (evolution-api.md sections 1-2)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from sim_fixtures import serve

from pgqr.evolution import (
    Connected,
    EvolutionClient,
    Failure,
    NoQrYet,
    QrCode,
    Reply,
    classify_connect_reply,
)
from pgqr.simulator import Simulator


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
    again = await evolution_client.connect(simulator.base_url, "shop", simulator.config.api_key)
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
