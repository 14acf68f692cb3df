"""Alert delivery: transitions queued in pgqr.alert_deliveries by check_alerts(), claimed by AlertForwarder
(alone, side by side, inside `pgqr run`) and POSTed to a real HTTP receiver on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from conftest import Database, mark_qr
from service_fixtures import Env, caught_up, running_service, settled, wait_until
from sim_fixtures import serve

from pgqr import db
from pgqr.alerts import AlertForwarder, safe_origin
from pgqr.devdb import free_port
from pgqr.service import Service
from pgqr.settings import Secret
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



@asynccontextmanager
async def work_pool(database: Database, name: str = "pgqr") -> AsyncIterator[db.Pool]:
    """What the service hands the forwarder: its pool of work connections."""
    pool = db.Pool(database.dsn, size=2, name=name)
    await pool.open()
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def pool(quiet: Database) -> AsyncIterator[db.Pool]:
    async with work_pool(quiet) as p:
        yield p


def make_stale(db: Database, name: str = "alpha") -> None:
    """A connecting instance without a QR for 10 minutes: stale_qr fires at the next check."""
    db.query("INSERT INTO public.evolution_instances (instance_name) VALUES (%s)", (name,))
    db.query("UPDATE pgqr.instance_state SET connecting_since = now() - interval '10 minutes'")


def fire(db: Database) -> None:
    make_stale(db)
    db.query("SELECT * FROM pgqr.check_alerts()")


def resolve(db: Database) -> None:
    mark_qr(db, "alpha", "45 seconds")  # a new QR
    db.query("SELECT * FROM pgqr.check_alerts()")


def deliveries(db: Database) -> list[dict[str, Any]]:
    return db.query("SELECT rule, state, attempts, delivered_at IS NOT NULL AS delivered, given_up_at IS NOT NULL "
                    "AS given_up, lease_owner, last_error FROM pgqr.alert_deliveries ORDER BY id")


def stale_qr(received: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    return [(a["rule"], a["state"], a["count"]) for a in received if a["rule"] == "stale_qr"]


async def forwarders_done(db: Database, *services: Service) -> None:
    """Wait until each service's listener has handled every notification sent so far (each pgqr_alert one wakes
    its forwarder) and each forwarder has run every pass asked of it: only then can it be said that nothing
    more is delivered."""
    await caught_up(db, *services)
    forwarders = [s.alerts for s in services]
    await wait_until(lambda: all(f is not None and f.idle for f in forwarders), what="the forwarders' passes")


# ------------------------------------------------------------------------------------------ the outbox in SQL


def test_each_transition_is_queued_once_and_a_resolved_waits_for_its_firing(quiet: Database) -> None:
    fire(quiet)
    quiet.query("SELECT * FROM pgqr.check_alerts()")  # nothing changed: nothing queued
    resolve(quiet)
    assert [(d["rule"], d["state"]) for d in deliveries(quiet)] == [("stale_qr", "firing"), ("stale_qr", "resolved")]
    first = quiet.query("SELECT * FROM pgqr.claim_alert_deliveries('r1', 10)")
    assert [(c["state"], c["attempts"]) for c in first] == [("firing", 1)]
    assert first[0]["payload"]["count"] == 1 and "alpha" in first[0]["payload"]["detail"]
    assert set(first[0]["payload"]) == {"rule", "state", "count", "detail", "database", "at"}
    assert quiet.query("SELECT * FROM pgqr.claim_alert_deliveries('r2', 10)") == []  # leased, and in order
    assert quiet.value("SELECT pgqr.finish_alert_delivery(%s, 'r2', 'delivered')", (first[0]["id"],)) is False
    assert quiet.value("SELECT pgqr.finish_alert_delivery(%s, 'r1', 'delivered')", (first[0]["id"],)) is True
    second = quiet.query("SELECT * FROM pgqr.claim_alert_deliveries('r2', 10)")
    assert [(c["state"], c["payload"]["count"]) for c in second] == [("resolved", 0)]


def test_housekeeping_keeps_a_resolved_alert_until_its_delivery_is_done(quiet: Database) -> None:
    fire(quiet)
    resolve(quiet)
    quiet.query("UPDATE pgqr.alerts SET resolved_at = now() - interval '30 days', "
                "fired_at = now() - interval '31 days'")
    quiet.query("SELECT * FROM pgqr.housekeeping()")
    assert quiet.value("SELECT count(*) FROM pgqr.alerts") == 1
    quiet.query("UPDATE pgqr.alert_deliveries SET delivered_at = now()")
    quiet.query("SELECT * FROM pgqr.housekeeping()")
    assert quiet.value("SELECT count(*) FROM pgqr.alerts") == 0
    assert quiet.value("SELECT count(*) FROM pgqr.alert_deliveries") == 0


# ------------------------------------------------------------------------------------------- the forwarder


async def test_two_forwarders_on_one_database_post_each_transition_exactly_once(
    quiet: Database, receiver: Receiver, pool: db.Pool
) -> None:
    async with work_pool(quiet) as other:
        forwarders = [AlertForwarder(receiver.url, pool, "one", base_delay=0.01),
                      AlertForwarder(receiver.url, other, "two", base_delay=0.01)]
        try:
            for f in forwarders:
                await f.start()
            fire(quiet)
            for _ in range(20):
                for f in forwarders:
                    f.wake()
                await asyncio.sleep(0)
            resolve(quiet)
            for f in forwarders:
                f.wake()
            await receiver.wait_for(2)
            # a wrong third delivery would come from a pass still running or still to run: wait for them all
            await wait_until(lambda: all(f.idle for f in forwarders), what="both forwarders' last passes")
        finally:
            for f in forwarders:
                await f.close(grace=1)
    assert stale_qr(receiver.received) == [("stale_qr", "firing", 1), ("stale_qr", "resolved", 0)]
    assert "alpha" in receiver.received[0]["detail"]
    assert receiver.content_types == ["application/json", "application/json"]
    assert sum(f.delivered for f in forwarders) == 2
    assert [(d["delivered"], d["lease_owner"]) for d in deliveries(quiet)] == [(True, None), (True, None)]


async def test_a_hanging_endpoint_never_holds_the_loop_and_close_gives_the_claim_back(
    quiet: Database, receiver: Receiver, pool: db.Pool
) -> None:
    receiver.delay = 600.0  # longer than any deadline here: nothing may wait for it
    forwarder = AlertForwarder(receiver.url, pool, "one", timeout=300, base_delay=0.05)
    await forwarder.start()
    fire(quiet)
    for _ in range(1000):
        forwarder.wake()  # never blocks; they coalesce
    await wait_until(lambda: receiver.content_types, what="the POST to start")
    # the loop stays free while the endpoint hangs: other work on it goes on
    assert await asyncio.wait_for(pool.value("SELECT 1"), 10) == 1
    await asyncio.wait_for(forwarder.close(grace=0.3), 10)  # well before the endpoint would answer
    assert forwarder.delivered == 0 and receiver.received == []
    assert len(receiver.content_types) == 1  # a thousand wake-ups, one POST
    # given back, not counted: another replica (or the next start) takes it at once
    assert [(d["attempts"], d["lease_owner"], d["delivered"]) for d in deliveries(quiet)] == [(0, None, False)]
    assert quiet.query("SELECT state FROM pgqr.claim_alert_deliveries('next', 10)") == [{"state": "firing"}]


async def test_a_failing_endpoint_is_retried_with_backoff_until_it_accepts(
    quiet: Database, receiver: Receiver, pool: db.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgqr.alerts")
    receiver.replies = [503, 500]
    forwarder = AlertForwarder(receiver.url, pool, "one", base_delay=0.05)
    await forwarder.start()
    fire(quiet)
    forwarder.wake()
    await receiver.wait_for(1)
    await forwarder.close()
    assert stale_qr(receiver.received) == [("stale_qr", "firing", 1)]
    assert len(receiver.content_types) == 3
    # two jittered backoff delays, the second twice the first's base
    delays = [r.__dict__["delay"] for r in caplog.records if getattr(r, "action", None) == "alert_retry"]
    assert len(delays) == 2
    assert 0.05 * 0.5 - 0.01 <= delays[0] <= 0.05 + 0.01 and 0.1 * 0.5 - 0.01 <= delays[1] <= 0.1 + 0.01
    assert (forwarder.delivered, forwarder.failed) == (1, 0)
    assert [(d["attempts"], d["delivered"]) for d in deliveries(quiet)] == [(1, True)]


async def test_a_failed_round_is_released_and_the_next_round_delivers_it_once(
    quiet: Database, receiver: Receiver, pool: db.Pool
) -> None:
    # the shortest wait a setting allows
    quiet.query("UPDATE pgqr.settings SET value = '1 second' WHERE key = 'alert_delivery_retry_after'")
    receiver.replies = [400]  # not retried within the round; the database schedules another
    forwarder = AlertForwarder(receiver.url, pool, "one", base_delay=0.01)
    await forwarder.start()
    fire(quiet)
    forwarder.wake()
    await wait_until(lambda: deliveries(quiet)[0]["last_error"], what="the failed round")
    assert (deliveries(quiet)[0]["lease_owner"], len(receiver.content_types)) == (None, 1)
    await receiver.wait_for(1, 10)  # no wake-up: the forwarder looks again when the retry is due
    await wait_until(lambda: forwarder.idle, what="the pass that delivered it to end")
    await forwarder.close()
    assert stale_qr(receiver.received) == [("stale_qr", "firing", 1)]
    assert (forwarder.delivered, forwarder.failed) == (1, 1)
    assert [(d["attempts"], d["delivered"]) for d in deliveries(quiet)] == [(2, True)]


async def test_a_delivery_is_given_up_after_the_attempt_cap_and_no_longer_blocks_its_rule(
    quiet: Database, receiver: Receiver, pool: db.Pool
) -> None:
    quiet.query("UPDATE pgqr.settings SET value = '1 second' WHERE key = 'alert_delivery_retry_after'")
    quiet.query("UPDATE pgqr.settings SET value = '2' WHERE key = 'alert_delivery_max_attempts'")
    receiver.replies = [400, 400]
    forwarder = AlertForwarder(receiver.url, pool, "one", base_delay=0.01)
    await forwarder.start()
    fire(quiet)
    resolve(quiet)
    forwarder.wake()
    await receiver.wait_for(1)
    await wait_until(lambda: forwarder.idle, what="the pass that delivered it to end")
    await forwarder.close()
    assert stale_qr(receiver.received) == [("stale_qr", "resolved", 0)]
    rows = deliveries(quiet)
    assert [(d["state"], d["attempts"], d["given_up"], d["delivered"]) for d in rows] == [
        ("firing", 2, True, False), ("resolved", 1, False, True)]
    assert rows[0]["last_error"] == "HTTP 400"


async def test_an_unreachable_endpoint_gives_up_and_never_logs_the_urls_secrets(
    quiet: Database, pool: db.Pool, caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()  # nothing listens there
    url = f"http://alerts:pa55w0rd@127.0.0.1:{port}/hooks/s3cr3t-path?token=q-s3cr3t"
    forwarder = AlertForwarder(url, pool, "one", max_attempts=2, base_delay=0.01, timeout=1)
    caplog.set_level(logging.DEBUG, logger="pgqr.alerts")
    fire(quiet)
    await forwarder.start()
    await wait_until(lambda: forwarder.failed, what="the round to fail")
    await forwarder.close(grace=3)
    assert (forwarder.delivered, forwarder.failed) == (0, 1)
    records = [r for r in caplog.records if r.name == "pgqr.alerts"]
    assert [getattr(r, "action", None) for r in records] == ["alert_retry", "alert_failed"]
    text = " ".join(f"{r.getMessage()} {r.__dict__}" for r in records)
    for secret in ("pa55w0rd", "s3cr3t-path", "q-s3cr3t", "alerts:"):
        assert secret not in text
    assert f"http://127.0.0.1:{port}" in text
    assert quiet.value("SELECT last_error FROM pgqr.alert_deliveries") == "ClientConnectorError"


def test_safe_origin_keeps_only_scheme_host_and_port() -> None:
    assert safe_origin("https://u:p@hooks.example.com/services/T0/B0/XYZ?x=1") == "https://hooks.example.com"
    assert safe_origin("http://[::1]:9000/a") == "http://[::1]:9000"


async def test_pgqr_run_forwards_a_firing_and_a_resolved_alert_to_the_alert_webhook(
    quiet: Database, receiver: Receiver, simulator: Simulator
) -> None:
    env = Env(quiet, simulator)
    async with running_service(env.settings(alert_webhook_url=Secret(receiver.url))):
        env.add("waiting", sim_state=None, triggers=False)
        quiet.query("UPDATE pgqr.instance_state SET connecting_since = now() - interval '10 minutes'")
        quiet.query("SELECT pgqr.check_alerts()")
        await receiver.wait_for(1)
        quiet.query("UPDATE public.evolution_instances SET instance_status = 'connected'")
        quiet.query("SELECT pgqr.check_alerts()")
        await receiver.wait_for(2)
    assert stale_qr(receiver.received) == [("stale_qr", "firing", 1), ("stale_qr", "resolved", 0)]


async def test_two_replicas_of_pgqr_run_deliver_one_firing_and_one_resolved(
    quiet: Database, receiver: Receiver, simulator: Simulator
) -> None:
    env = Env(quiet, simulator)
    settings = env.settings(alert_webhook_url=Secret(receiver.url))
    async with running_service(settings) as one, running_service(settings) as two:
        env.add("waiting", sim_state=None, triggers=False)
        quiet.query("UPDATE pgqr.instance_state SET connecting_since = now() - interval '10 minutes'")
        quiet.query("SELECT pgqr.check_alerts()")
        await receiver.wait_for(1)
        quiet.query("UPDATE public.evolution_instances SET instance_status = 'connected'")
        quiet.query("SELECT pgqr.check_alerts()")
        await receiver.wait_for(2)
        # a duplicate would come from a pass either replica runs for a notification: wait for them all
        await forwarders_done(quiet, one, two)
    assert stale_qr(receiver.received) == [("stale_qr", "firing", 1), ("stale_qr", "resolved", 0)]
    assert len(receiver.content_types) == len(receiver.received)  # every POST was a first one


async def test_no_listener_fired_while_none_ran_is_delivered_when_one_starts(
    quiet: Database, receiver: Receiver, simulator: Simulator
) -> None:
    quiet.query("UPDATE pgqr.migrations SET applied_at = now() - interval '1 hour'")  # no grace left
    quiet.query("SELECT * FROM pgqr.check_alerts()")  # its NOTIFY reaches nobody
    env = Env(quiet, simulator)
    async with running_service(env.settings(alert_webhook_url=Secret(receiver.url))) as service:
        await wait_until(lambda: quiet.value("SELECT count(*) FROM pgqr.listeners WHERE live"), what="a heartbeat")
        quiet.query("SELECT * FROM pgqr.check_alerts()")
        await wait_until(lambda: ("no_listener", "resolved") in [(a["rule"], a["state"]) for a in receiver.received],
                         what="the resolved no_listener")
        await forwarders_done(quiet, service)
    rules = [(a["rule"], a["state"]) for a in receiver.received]
    assert [r for r in rules if r[0] == "no_listener"] == [("no_listener", "firing"), ("no_listener", "resolved")]
    assert len(rules) == len(set(rules))  # the others (pg_cron is paused: ticks_not_firing) once each too


async def test_a_database_error_while_claiming_is_retried(
    quiet: Database, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgqr.alerts")
    fire(quiet)
    async with work_pool(quiet, name="pgqr-alerts-test") as pool:
        assert await pool.value("SELECT 1") == 1
        # the pool's connection dies under it: the first claim fails
        quiet.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                    ("pgqr-alerts-test",))
        forwarder = AlertForwarder(receiver.url, pool, "one")
        await forwarder.start()
        await receiver.wait_for(1, 15)
        await forwarder.close()
    actions = [getattr(r, "action", None) for r in caplog.records if r.name == "pgqr.alerts"]
    assert actions[:1] == ["alert_db_error"], actions
    assert stale_qr(receiver.received) == [("stale_qr", "firing", 1)]


async def test_a_forged_pgqr_alert_notification_delivers_nothing(
    quiet: Database, receiver: Receiver, simulator: Simulator
) -> None:
    env = Env(quiet, simulator)
    async with running_service(env.settings(alert_webhook_url=Secret(receiver.url))) as service:
        await settled(service)
        quiet.query("""NOTIFY pgqr_alert, '{"rule": "fake", "state": "firing", "detail": "pay me"}'""")
        quiet.query("SELECT pg_notify('pgqr_alert', 'not json')")
        await forwarders_done(quiet, service)  # the notifications woke it, and its passes are over
    assert receiver.content_types == [] and receiver.received == []


async def test_an_endpoint_failing_then_recovering_gets_the_alert_once(
    quiet: Database, receiver: Receiver, simulator: Simulator
) -> None:
    env = Env(quiet, simulator)
    receiver.replies = [503, 502]
    async with running_service(env.settings(alert_webhook_url=Secret(receiver.url))) as service:
        assert service.alerts is not None
        service.alerts.base_delay = 0.05
        env.add("waiting", sim_state=None, triggers=False)
        quiet.query("UPDATE pgqr.instance_state SET connecting_since = now() - interval '10 minutes'")
        quiet.query("SELECT pgqr.check_alerts()")
        await receiver.wait_for(1)
        await forwarders_done(quiet, service)
    assert stale_qr(receiver.received) == [("stale_qr", "firing", 1)]
    assert len(receiver.content_types) == 3
    assert [(d["attempts"], d["delivered"]) for d in deliveries(quiet)] == [(1, True)]
