"""AlertForwarder: pgqr_alert notifications from a real LISTEN connection, POSTed to a real HTTP receiver."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from aiohttp import web
from conftest import Database
from service_fixtures import Env, running_service
from sim_fixtures import serve

from pgqr.alerts import AlertForwarder, safe_origin
from pgqr.devdb import free_port
from pgqr.simulator import Simulator


@dataclass
class Receiver:
    """An alert endpoint on loopback; `replies` scripts the status of each request (then 200)."""

    url: str = ""
    received: list[dict[str, Any]] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)
    replies: list[int] = field(default_factory=list)
    delay: float = 0.0
    got_one: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)  # ends every delay at teardown

    async def handle(self, request: web.Request) -> web.Response:
        self.content_types.append(request.content_type)
        body = await request.json()
        if self.delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.released.wait(), self.delay)
        status = self.replies.pop(0) if self.replies else 200
        if status == 200:
            self.received.append(body)
            self.got_one.set()
        return web.Response(status=status)

    async def wait_for(self, n: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < n and time.monotonic() < deadline:
            self.got_one.clear()
            try:
                await asyncio.wait_for(self.got_one.wait(), deadline - time.monotonic())
            except TimeoutError:
                break


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/{secret}", rec.handle)
    async with serve(app) as base_url:
        rec.url = f"{base_url}/hooks/s3cr3t-path?token=q-s3cr3t"
        yield rec
        rec.released.set()


async def test_a_real_listen_connection_forwards_exactly_one_firing_and_one_resolved(
    quiet: Database, receiver: Receiver
) -> None:
    forwarder = AlertForwarder(receiver.url, base_delay=0.01)
    await forwarder.start()
    listen = await psycopg.AsyncConnection.connect(quiet.dsn, autocommit=True)
    await listen.execute("LISTEN pgqr_alert")

    async def pump() -> None:  # what the listener does with each pgqr_alert notification
        async for notify in listen.notifies():
            forwarder.submit(notify.payload)

    pumping = asyncio.create_task(pump())
    try:
        quiet.query("INSERT INTO public.evolution_instances (instance_name) VALUES ('alpha')")
        quiet.query("UPDATE pgqr.instance_state SET connecting_since = now() - interval '10 minutes'")
        quiet.query("SELECT * FROM pgqr.check_alerts()")
        quiet.query("SELECT * FROM pgqr.check_alerts()")  # nothing changed: no second "firing"
        quiet.query("UPDATE public.evolution_instances SET last_qr_update = now()")
        quiet.query("SELECT * FROM pgqr.check_alerts()")
        quiet.query("SELECT * FROM pgqr.check_alerts()")
        await receiver.wait_for(2)
        await asyncio.sleep(0.2)  # room for a wrong third delivery to show up
    finally:
        pumping.cancel()
        await listen.close()
        await forwarder.close(grace=1)
    assert [(a["rule"], a["state"], a["count"]) for a in receiver.received] == [
        ("stale_qr", "firing", 1), ("stale_qr", "resolved", 0)]
    assert "alpha" in receiver.received[0]["detail"]
    assert receiver.content_types == ["application/json", "application/json"]
    assert (forwarder.delivered, forwarder.failed, forwarder.dropped) == (2, 0, 0)


async def test_submit_never_blocks_or_raises_when_the_endpoint_hangs(receiver: Receiver) -> None:
    receiver.delay = 5.0
    forwarder = AlertForwarder(receiver.url, timeout=0.2, max_attempts=3, base_delay=0.05, queue_size=10)
    await forwarder.start()
    started = time.monotonic()
    for i in range(1000):
        forwarder.submit(json.dumps({"rule": "stale_qr", "state": "firing", "count": i}))
    forwarder.submit("not json at all")
    submit_seconds = time.monotonic() - started
    # the loop stays free while the endpoint hangs: other work runs on time
    tick = time.monotonic()
    await asyncio.sleep(0.05)
    loop_lag = time.monotonic() - tick - 0.05
    closing = time.monotonic()
    await forwarder.close(grace=0.3)
    close_seconds = time.monotonic() - closing
    assert submit_seconds < 0.1 and loop_lag < 0.05
    assert close_seconds < 1.0
    assert forwarder.delivered == 0
    assert forwarder.dropped >= 991  # 1001 submitted into a queue of 10
    assert forwarder.dropped + forwarder.failed == 1001


async def test_a_failing_endpoint_is_retried_with_backoff_until_it_accepts(receiver: Receiver) -> None:
    receiver.replies = [503, 500]
    forwarder = AlertForwarder(receiver.url, base_delay=0.05)
    await forwarder.start()
    started = time.monotonic()
    forwarder.submit('{"rule": "no_listener", "state": "firing", "count": 0, "detail": "d"}')
    await receiver.wait_for(1)
    elapsed = time.monotonic() - started
    await forwarder.close()
    assert receiver.received == [{"rule": "no_listener", "state": "firing", "count": 0, "detail": "d"}]
    assert len(receiver.content_types) == 3
    assert elapsed >= 0.05 * 0.5 + 0.1 * 0.5  # two jittered backoff delays
    assert (forwarder.delivered, forwarder.failed) == (1, 0)


async def test_a_client_error_reply_is_not_retried(receiver: Receiver) -> None:
    receiver.replies = [400]
    forwarder = AlertForwarder(receiver.url, base_delay=0.01)
    await forwarder.start()
    forwarder.submit('{"rule": "stale_qr", "state": "firing"}')
    await forwarder.close(grace=2)
    assert len(receiver.content_types) == 1
    assert (forwarder.delivered, forwarder.failed, forwarder.dropped) == (0, 1, 0)


async def test_an_unreachable_endpoint_gives_up_and_never_logs_the_urls_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()  # nothing listens there
    url = f"http://alerts:pa55w0rd@127.0.0.1:{port}/hooks/s3cr3t-path?token=q-s3cr3t"
    forwarder = AlertForwarder(url, max_attempts=2, base_delay=0.01, timeout=1)
    caplog.set_level(logging.DEBUG, logger="pgqr.alerts")
    await forwarder.start()
    forwarder.submit('{"rule": "stale_qr", "state": "firing"}')
    await forwarder.close(grace=3)
    assert (forwarder.delivered, forwarder.failed) == (0, 1)
    records = [r for r in caplog.records if r.name == "pgqr.alerts"]
    assert [getattr(r, "action", None) for r in records] == ["alert_retry", "alert_failed"]
    text = " ".join(f"{r.getMessage()} {r.__dict__}" for r in records)
    for secret in ("pa55w0rd", "s3cr3t-path", "q-s3cr3t", "alerts:"):
        assert secret not in text
    assert f"http://127.0.0.1:{port}" in text


async def test_close_delivers_what_is_queued_within_the_grace(receiver: Receiver) -> None:
    forwarder = AlertForwarder(receiver.url)
    for rule in ("stale_qr", "no_listener", "ticks_not_firing"):
        forwarder.submit(json.dumps({"rule": rule, "state": "firing"}))
    await forwarder.start()
    await forwarder.close(grace=5)
    assert [a["rule"] for a in receiver.received] == ["stale_qr", "no_listener", "ticks_not_firing"]
    assert forwarder.delivered == 3
    forwarder.submit('{"rule": "late"}')  # after close: counted, not raised
    assert forwarder.dropped == 1


def test_safe_origin_keeps_only_scheme_host_and_port() -> None:
    assert safe_origin("https://u:p@hooks.example.com/services/T0/B0/XYZ?x=1") == "https://hooks.example.com"
    assert safe_origin("http://[::1]:9000/a") == "http://[::1]:9000"


async def test_pgqr_run_forwards_a_firing_and_a_resolved_alert_to_the_alert_webhook(
    quiet: Database, receiver: Receiver, simulator: Simulator
) -> None:
    env = Env(quiet, simulator)
    async with running_service(env.settings(alert_webhook_url=receiver.url)):
        env.add("waiting", sim_state=None, triggers=False)
        quiet.query("UPDATE pgqr.instance_state SET connecting_since = now() - interval '10 minutes'")
        quiet.query("SELECT pgqr.check_alerts()")
        await receiver.wait_for(1)
        quiet.query("UPDATE public.evolution_instances SET instance_status = 'connected'")
        quiet.query("SELECT pgqr.check_alerts()")
        await receiver.wait_for(2)
    stale = [(a["rule"], a["state"], a["count"]) for a in receiver.received if a["rule"] == "stale_qr"]
    assert stale == [("stale_qr", "firing", 1), ("stale_qr", "resolved", 0)]
