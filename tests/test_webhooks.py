"""Evolution's webhooks into the listener's HTTP server: the simulator posts real envelopes over loopback,
and they reach the rows through the same write path as the poller."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import psycopg
import pytest
from service_fixtures import Env, notifications, running_service, settled, wait_until

from pgqr.listener import Service
from pgqr.simulator import WebhookDelivery

SECRET = "wh-SECRET-7f3a9c2e"


def hook_url(service: Service, secret: str = SECRET) -> str:
    return f"http://127.0.0.1:{service.http_port}/webhooks/evolution/{secret}"


@pytest.fixture
async def hooked(env: Env) -> AsyncIterator[Service]:
    """A listener with webhooks on, the simulator's global webhook pointing at it, and pg_cron paused."""
    env.db.pause_cron()
    settings = env.settings(http_port=0, webhook_secret=SECRET, fallback_seconds=3600.0)
    async with running_service(settings) as service:
        env.sim.config.global_webhook_url = hook_url(service)
        await settled(service)
        yield service


async def post(url: str, body: Any = None, *, data: bytes | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body if data is None else None,
                                                          data=data) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


def qr_envelope(name: str, base64: str) -> dict[str, Any]:
    return {"event": "qrcode.updated", "instance": name, "apikey": "token-of-" + name,
            "data": {"qrcode": {"instance": name, "pairingCode": None, "code": "2@x", "base64": base64}}}


def qr_of(env: Env, name: str) -> str | None:
    qr: str | None = env.row(name)["qr_code"]
    return qr


def qr_hook(name: str) -> Callable[[WebhookDelivery], bool]:
    return lambda d: d.body["instance"] == name and d.body["event"] == "qrcode.updated"


async def first_qr(env: Env, name: str, *, webhook: bool = True) -> str:
    """Wait for the poll's QR and (unless no webhook is set up) for the simulator to deliver its own."""
    await wait_until(lambda: qr_of(env, name) is not None, 2, "the first QR")
    if webhook:
        await env.sim.wait_for_webhooks(qr_hook(name))
    await asyncio.sleep(0.1)
    qr = qr_of(env, name)
    assert qr is not None
    return qr


async def test_a_rotated_qr_arrives_by_webhook_within_a_second_without_a_poll(env: Env, hooked: Service) -> None:
    env.add("shop")
    old = await first_qr(env, "shop")
    started = time.monotonic()
    env.sim.rotate("shop")
    [*_, delivered] = await env.sim.wait_for_webhooks(qr_hook("shop"), n=2)
    new = delivered.body["data"]["qrcode"]["base64"]
    await wait_until(lambda: qr_of(env, "shop") == new, 1.0, "the webhook QR")
    assert time.monotonic() - started < 1.0 and new != old
    last = env.log("shop")[-1]
    assert (last["source"], last["outcome"], last["applied"], last["qr_updated"]) == ("webhook", "qr", True, True)
    assert env.sim.stats("shop").connect_calls == 1  # only the first QR was polled
    assert env.db.value("SELECT count(*) FROM pgqr.ticks") == 0
    assert all(d.status == 200 for d in env.sim.webhooks)


async def test_a_per_instance_by_events_webhook_reaches_the_event_suffix_route(env: Env, hooked: Service) -> None:
    env.sim.config.global_webhook_url = None
    token = env.add("shop")
    old = await first_qr(env, "shop", webhook=False)
    hook = {"enabled": True, "url": hook_url(hooked), "byEvents": True, "base64": True,
            "events": ["QRCODE_UPDATED", "CONNECTION_UPDATE"]}
    async with aiohttp.ClientSession() as http, http.post(
            f"{env.sim.base_url}/webhook/set/shop", json={"webhook": hook}, headers={"apikey": token}) as resp:
        assert resp.status == 201
    env.sim.rotate("shop")
    [delivery] = await env.sim.wait_for_webhooks(qr_hook("shop"), timeout=1.0)
    assert qr_of(env, "shop") != old
    assert delivery.url == hook_url(hooked) + "/qrcode-updated" and delivery.status == 200
    assert qr_of(env, "shop") == delivery.body["data"]["qrcode"]["base64"]
    assert env.log("shop")[-1]["source"] == "webhook"


async def test_an_open_connection_update_marks_connected_clears_the_qr_and_notifies(
        env: Env, hooked: Service) -> None:
    env.add("shop")
    await first_qr(env, "shop")
    async with notifications(env.db.dsn, "pgqr_qr_updated") as collect:
        env.sim.scan("shop")
        await wait_until(lambda: env.row("shop")["instance_status"] == "connected", 1.0, "the open webhook")
        payloads = await collect(0.3)
    row = env.row("shop")
    assert (row["qr_code"], row["pairing_code"]) == (None, None)
    assert payloads == [{"instance_id": str(row["id"]), "instance_name": "shop",
                         "user_id": str(row["user_id"]), "status": "connected"}]
    last = env.log("shop")[-1]
    assert (last["source"], last["outcome"], last["applied"], last["qr_updated"]) == (
        "webhook", "connected", True, True)


async def test_the_qr_limit_is_logged_as_an_event_and_keeps_the_last_qr(env: Env, hooked: Service) -> None:
    env.sim.config.qrcode_limit = 2
    env.add("shop")
    await first_qr(env, "shop")
    env.sim.rotate("shop")  # QR number 2, the last one allowed
    [*_, delivered] = await env.sim.wait_for_webhooks(qr_hook("shop"), n=2)
    second = delivered.body["data"]["qrcode"]["base64"]
    await wait_until(lambda: qr_of(env, "shop") == second, 1.0, "the second QR")
    env.sim.rotate("shop")  # Evolution gives up: "QR code limit reached", then state refused
    await wait_until(lambda: any(r["error_class"] == "state_refused" for r in env.log("shop")), 2, "the events")
    events = [(r["source"], r["outcome"], r["error_class"], r["qr_updated"])
              for r in env.log("shop") if r["outcome"] == "event"]
    assert events == [("webhook", "event", "qr_limit", False), ("webhook", "event", "state_refused", False)]
    row = env.row("shop")
    assert (row["qr_code"], row["instance_status"]) == (second, "connecting")
    assert (row["consecutive_failures"], row["next_attempt_at"], row["last_error_class"]) == (0, None, "state_refused")


async def test_a_wrong_secret_is_404_and_writes_nothing(env: Env, hooked: Service) -> None:
    env.add("shop", sim_state=None, triggers=False)
    body = qr_envelope("shop", "data:image/png;base64,FORGED")
    for url in (hook_url(hooked, "guess"), hook_url(hooked, "guess") + "/qrcode-updated",
                hook_url(hooked, SECRET[:-1]), hook_url(hooked, SECRET + "x")):
        assert await post(url, body) == (404, {"error": "not found"})
    assert qr_of(env, "shop") is None
    assert env.log("shop") == []
    assert await post(hook_url(hooked), body) == (200, {"recorded": True, "qr_updated": True})  # the control


async def test_webhooks_are_refused_when_no_secret_is_configured(env: Env) -> None:
    env.add("shop", sim_state=None, triggers=False)
    async with running_service(env.settings(http_port=0, fallback_seconds=3600.0)) as service:
        for secret in ("", "None", "anything"):
            status, _ = await post(f"http://127.0.0.1:{service.http_port}/webhooks/evolution/{secret}",
                                   qr_envelope("shop", "data:image/png;base64,FORGED"))
            assert status == 404
    assert [r for r in env.log("shop") if r["source"] == "webhook"] == [] and qr_of(env, "shop") is None


async def test_a_body_that_is_not_json_is_400(env: Env, hooked: Service) -> None:
    for data in (b"not json", b'{"event": "qrcode.updated",', b"\xff\xfe"):
        assert await post(hook_url(hooked), data=data) == (400, {"error": "body is not JSON"})
    assert env.db.value("SELECT count(*) FROM pgqr.refresh_log") == 0


async def test_an_event_for_an_unknown_instance_changes_nothing(env: Env, hooked: Service) -> None:
    env.add("shop", sim_state=None, triggers=False)
    snapshot = "SELECT e.*, s.* FROM public.evolution_instances e JOIN pgqr.instance_state s USING (instance_name)"
    before = env.db.query(snapshot)
    async with notifications(env.db.dsn, "pgqr_qr_updated") as collect:
        assert await post(hook_url(hooked), qr_envelope("nobody", "data:image/png;base64,X")) == (
            200, {"recorded": False, "qr_updated": False})
        status, reply = await post(hook_url(hooked), {"event": "connection.update", "instance": "nobody",
                                                      "data": {"instance": "nobody", "state": "open"}})
        assert (status, reply["recorded"]) == (200, False)
        assert await collect(0.3) == []
    assert env.db.query(snapshot) == before
    assert env.db.value("SELECT count(*) FROM public.evolution_instances") == 1
    assert all(not r["applied"] and not r["qr_updated"] for r in env.log("nobody"))


async def test_the_access_log_never_shows_the_secret(
        env: Env, hooked: Service, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgqr.http.access")
    env.add("shop", sim_state=None, triggers=False)
    body = qr_envelope("shop", "data:image/png;base64,A")
    assert (await post(hook_url(hooked), body))[0] == 200
    assert (await post(hook_url(hooked) + "/qrcode-updated", body))[0] == 200
    assert (await post(hook_url(hooked) + "x", body))[0] == 404
    assert (await post(hook_url(hooked), data=b"nope"))[0] == 400
    base = f"http://127.0.0.1:{hooked.http_port}"
    assert (await post(base + f"//webhooks/evolution/{SECRET}", body))[0] == 404  # a base URL ending in '/'
    assert (await post(base + f"/webhooks/evolution/{SECRET}/qrcode-updated/extra", body))[0] == 404
    assert (await post(base + f"/pgqr/webhooks/evolution/{SECRET}", body))[0] == 404  # an unstripped proxy prefix
    assert (await post(base + f"/webhooks/evolution//{SECRET}", body))[0] == 404
    records = [r for r in caplog.records if r.name == "pgqr.http.access"]
    assert len(records) == 8
    for record in records:
        assert SECRET not in record.getMessage() and SECRET not in json.dumps(vars(record), default=str)
    paths = [record.path for record in records]  # type: ignore[attr-defined]
    assert paths == ["/webhooks/evolution/***", "/webhooks/evolution/***/qrcode-updated",
                     "/webhooks/evolution/***", "/webhooks/evolution/***", "//webhooks/evolution/***",
                     "/webhooks/evolution/***/qrcode-updated/extra", "/pgqr/webhooks/evolution/***",
                     "/webhooks/evolution/***"]
    assert [record.status for record in records] == [200, 200, 404, 400, 404, 404, 404, 404]  # type: ignore[attr-defined]


async def test_a_webhook_qr_newer_than_a_polls_claim_survives_the_polls_late_write(
        env: Env, hooked: Service) -> None:
    env.add("shop", sim_state=None, triggers=False)
    with env.db.connect() as conn:
        [claimed] = conn.execute("SELECT * FROM pgqr.claim('slow-poller', 10, now())").fetchall()
    webhook_qr = "data:image/png;base64,FROM-WEBHOOK"
    async with notifications(env.db.dsn, "pgqr_qr_updated") as collect:
        assert await post(hook_url(hooked), qr_envelope("shop", webhook_qr)) == (
            200, {"recorded": True, "qr_updated": True})
        with env.db.connect() as conn:
            late = conn.execute("SELECT * FROM pgqr.record_results('slow-poller', %s::jsonb)", (json.dumps([{
                "instance_name": "shop", "source": "poll", "outcome": "qr", "qr": "data:image/png;base64,FROM-POLL",
                "http_status": 200, "claimed_at": str(claimed["claimed_at"])}]),)).fetchall()
        payloads = await collect(0.3)
    assert late == [{"instance_name": "shop", "applied": True, "qr_updated": False, "status": None}]
    row = env.row("shop")
    assert row["qr_code"] == webhook_qr
    assert row["lease_owner"] is None  # the poll still gave its lease back
    assert [p["instance_name"] for p in payloads] == ["shop"]  # announced once, for the webhook
    assert [(r["source"], r["qr_updated"]) for r in env.log("shop")] == [("webhook", True), ("poll", False)]


async def test_a_poll_write_back_and_a_webhook_for_the_same_instance_do_not_deadlock(env: Env) -> None:
    env.add("shop", sim_state=None, triggers=False)
    with env.db.connect() as conn:
        [claimed] = conn.execute("SELECT * FROM pgqr.claim('replica-a', 10, now())").fetchall()
    poll = [{"instance_name": "shop", "source": "poll", "outcome": "qr", "qr": "data:image/png;base64,POLL",
             "claimed_at": str(claimed["claimed_at"])}]
    hook = [{"instance_name": "shop", "source": "webhook", "outcome": "qr", "qr": "data:image/png;base64,HOOK"}]
    holder = await psycopg.AsyncConnection.connect(env.db.dsn)  # a third session briefly holding the state row
    replica_a = await psycopg.AsyncConnection.connect(env.db.dsn, autocommit=True)
    replica_b = await psycopg.AsyncConnection.connect(env.db.dsn, autocommit=True)
    try:
        await holder.execute("SELECT 1 FROM pgqr.instance_state WHERE instance_name = 'shop' FOR UPDATE")

        def waiting(conn: psycopg.AsyncConnection[Any]) -> bool:
            return env.db.value("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                                (conn.info.backend_pid,)) is True

        write = "SELECT * FROM pgqr.record_results(%s, %s::jsonb)"
        poll_task = asyncio.create_task(replica_a.execute(write, ("replica-a", json.dumps(poll))))
        await wait_until(lambda: waiting(replica_a), 2, "the poll write-back to queue")
        hook_task = asyncio.create_task(replica_b.execute(write, ("replica-b", json.dumps(hook))))
        await wait_until(lambda: waiting(replica_b), 2, "the webhook write-back to queue")
        await holder.commit()
        outcomes = await asyncio.gather(poll_task, hook_task, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
    finally:
        for session in (holder, replica_a, replica_b):
            await session.close()
    assert qr_of(env, "shop") == "data:image/png;base64,HOOK"  # the webhook came last
