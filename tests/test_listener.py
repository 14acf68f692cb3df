"""The long-lived service (`pgqr run`): wake-up sources, coalescing, reconnects, the probe, heartbeat,
shutdown, logs and readiness. Real PostgreSQL, the real simulator on loopback, real subprocesses."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from conftest import Database, run_pgqr
from service_fixtures import Env, metric, notifications, running_service, settled, start_pgqr, wait_until

from pgqr import db, listener
from pgqr.devdb import free_port
from pgqr.service import Service

QUIET = {"fallback_seconds": 3600.0}  # so only the wake-up under test can explain a refresh

pytestmark = pytest.mark.usefixtures("no_cron_ticks")


def reconnects(service: Service) -> float:
    return metric(service, "pgqr_listener_reconnects_total")


def listening(service: Service) -> bool:
    return service.listener.listening.is_set()


def terminate_listener(db: Database) -> int:
    rows = db.query(
        "SELECT pg_terminate_backend(pid) AS killed FROM pg_stat_activity "
        "WHERE application_name = 'pgqr-listener' AND datname = current_database()")
    return sum(bool(r["killed"]) for r in rows)


# -- wake-up sources ------------------------------------------------------------------------------


async def test_a_tick_notifies_the_listener_which_refreshes_the_instance(env: Env) -> None:
    async with running_service(env.settings(**QUIET)) as service:
        await settled(service)  # the engine asleep, no wake-up pending
        async with notifications(env.db.dsn, "pgqr_refresh") as wakeups:
            env.add("shop", triggers=False)
            assert await wakeups() == []  # every wake-up the insert sent has arrived by now: none
        assert not env.has_qr("shop")  # nothing but a wake-up would refresh it
        env.tick()
        await wait_until(lambda: env.has_qr("shop"), 10, "the ticked refresh")
        assert metric(service, "pgqr_wakeups_total", source="notify") >= 1
    assert [(r["source"], r["outcome"], r["owner"]) for r in env.log("shop")] == [("poll", "qr", service.owner)]


async def test_the_new_instance_trigger_wakes_the_listener_for_a_first_qr(env: Env) -> None:
    async with running_service(env.settings(**QUIET)) as service:
        await settled(service)
        env.add("fresh")
        await wait_until(lambda: env.has_qr("fresh"), 10, "the first QR")
        assert str(env.row("fresh")["qr_code"]).startswith("data:image/png;base64,")
        assert metric(service, "pgqr_wakeups_total", source="notify") >= 1
    assert env.db.value("SELECT count(*) FROM pgqr.ticks") == 0  # the trigger's NOTIFY, not a tick


async def test_the_trigger_wakes_listeners_with_the_key_never_the_name(env: Env) -> None:
    long_name = "shop-" + "x" * 9000  # a name in the payload would fail the app's INSERT (8000 bytes at most)
    async with notifications(env.db.dsn, "pgqr_refresh") as collect:
        env.add(long_name, sim_state=None)
        payloads = await collect()
    assert payloads == [{"reason": "waiting", "key": str(env.row(long_name)["id"])}]
    # positive control: a row that is not waiting wakes nobody
    async with notifications(env.db.dsn, "pgqr_refresh") as collect:
        env.add("linked", sim_state=None, status="connected")
        assert await collect() == []


async def test_the_fallback_timer_refreshes_without_any_notification(env: Env) -> None:
    async with running_service(env.settings(fallback_seconds=0.5)) as service:
        await settled(service)
        env.add("silent", triggers=False)
        await wait_until(lambda: env.has_qr("silent"), 10, "the fallback refresh")
        assert metric(service, "pgqr_wakeups_total", source="notify") == 0
        assert metric(service, "pgqr_wakeups_total", source="degraded_poll") == 0
    assert env.db.value("SELECT count(*) FROM pgqr.ticks") == 0


async def test_wake_ups_during_a_call_coalesce_into_no_extra_call(env: Env) -> None:
    env.sim.config.latency = 0.5
    async with running_service(env.settings(**QUIET)) as service:
        await settled(service)
        env.add("slow", triggers=False)
        env.tick()
        await wait_until(lambda: env.row("slow")["lease_owner"] == service.owner, 10, "the claim")
        for _ in range(4):
            env.tick()  # all while the call waits on Evolution
        await wait_until(lambda: metric(service, "pgqr_wakeups_total", source="notify") == 5, 10,
                         "the five wake-ups")
        await settled(service)
    assert env.sim.stats("slow").connect_calls == 1
    assert [r["outcome"] for r in env.log("slow")] == ["qr"]


# -- losing the LISTEN ----------------------------------------------------------------------------


async def test_a_terminated_listener_reconnects_and_ticks_refresh_again(env: Env) -> None:
    async with running_service(env.settings(**QUIET)) as service:
        await settled(service)
        assert terminate_listener(env.db) == 1
        await wait_until(lambda: reconnects(service) == 1 and listening(service), 10, "the reconnect")
        await settled(service)
        env.add("after", triggers=False)
        env.tick()
        await wait_until(lambda: env.has_qr("after"), 10, "a ticked refresh after the reconnect")
        env.add("triggered")
        await wait_until(lambda: env.has_qr("triggered"), 10, "a triggered refresh after the reconnect")


async def test_an_instance_added_while_disconnected_is_refreshed_by_the_catch_up(env: Env) -> None:
    async with running_service(env.settings(**QUIET)) as service:
        await settled(service)
        with env.db.connect() as conn:  # opened beforehand, so the insert fits in the reconnect delay
            assert terminate_listener(env.db) == 1
            await wait_until(lambda: not listening(service), 5, "the listener to notice")
            # the trigger's NOTIFY reaches nobody: only the catch-up after the reconnect can find it
            conn.execute("INSERT INTO public.evolution_instances (instance_name, instance_token, instance_status)"
                         " VALUES ('missed', %s, 'connecting')", (env.sim.add_instance("missed"),))
            assert not listening(service), "reconnected before the insert: premise broken"
        await wait_until(lambda: listening(service), 10, "the reconnect")
        await wait_until(lambda: env.has_qr("missed"), 10, "the catch-up refresh")
    assert env.db.value("SELECT count(*) FROM pgqr.ticks") == 0


async def test_reconnects_keep_trying_with_backoff_while_the_database_refuses(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pgqr.listener")
    admin = env.db.server.dsn("postgres")
    async with running_service(env.settings(**QUIET)) as service:
        await settled(service)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{env.db.name}" WITH ALLOW_CONNECTIONS false')
            try:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE application_name = 'pgqr-listener' AND datname = %s", (env.db.name,))
                await wait_until(lambda: reconnects(service) >= 4, 20, "four failed reconnects")
                assert not listening(service)
            finally:
                conn.execute(f'ALTER DATABASE "{env.db.name}" WITH ALLOW_CONNECTIONS true')
        delays = [r.__dict__["delay_s"] for r in caplog.records if getattr(r, "action", None) == "reconnect"]
        # capped exponential backoff with jitter: retrying, but never a hot loop
        assert len(delays) >= 4
        for attempt, delay in enumerate(delays[:4]):
            nominal = min(listener.Backoff().cap, listener.Backoff().base * 2**attempt)
            assert nominal / 2 - 0.01 <= delay <= nominal + 0.01, delays
        await wait_until(lambda: listening(service), 20, "the listener to come back")
        await settled(service)
        env.add("back")
        await wait_until(lambda: env.has_qr("back"), 10, "a refresh after the outage")


@pytest.fixture
def listen_connections(monkeypatch: pytest.MonkeyPatch) -> list[psycopg.AsyncConnection[Any]]:
    """Every LISTEN connection a service in this test opens (a spy on psycopg's connect)."""
    opened: list[psycopg.AsyncConnection[Any]] = []
    connect = psycopg.AsyncConnection.connect

    async def spy(*args: Any, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
        conn = await connect(*args, **kwargs)
        if kwargs.get("application_name") == "pgqr-listener":
            opened.append(conn)
        return conn

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", spy)
    return opened


async def test_the_probe_reconnects_a_listen_that_silently_stopped(
        env: Env, monkeypatch: pytest.MonkeyPatch, listen_connections: list[psycopg.AsyncConnection[Any]]) -> None:
    monkeypatch.setattr(listener, "PROBE_REPLY_SECONDS", 0.5)
    async with running_service(env.settings(probe_seconds=0.3, **QUIET)) as service:
        await settled(service)
        async with await psycopg.AsyncConnection.connect(env.db.dsn, autocommit=True) as watcher:
            await watcher.execute(f"LISTEN {listener.PROBE_CHANNEL}")
            probes = [n async for n in watcher.notifies(timeout=10, stop_after=3)]
        assert len(probes) == 3 and reconnects(service) == 0  # several probes on a healthy LISTEN
        [conn] = listen_connections
        await conn.execute("UNLISTEN *")  # what a transaction pooler does behind our back
        await wait_until(lambda: reconnects(service) == 1, 10, "the probe to notice")
        await wait_until(lambda: listening(service), 10, "listening again")
        await settled(service)
        env.add("probed", triggers=False)
        env.tick()
        await wait_until(lambda: env.has_qr("probed"), 10, "a ticked refresh after the probe's reconnect")
        assert reconnects(service) == 1


async def test_concurrent_users_of_the_work_pool_never_open_more_than_its_size(env: Env) -> None:
    """Claims, write-backs, webhooks and heartbeats each take a pooled connection; a burst waits for one
    instead of opening a connection each."""
    pool = db.Pool(env.db.dsn, size=3, name="pgqr-pool-test")
    await pool.open()
    try:
        busy = [asyncio.create_task(pool.value("SELECT pg_sleep(0.3)")) for _ in range(10)]

        def opened() -> int:
            return int(env.db.value("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                    "AND application_name = 'pgqr-pool-test'"))  # type: ignore[arg-type]

        await wait_until(lambda: opened() == 3, 10, "the pool to fill")
        while not all(t.done() for t in busy):
            assert opened() <= 3
            await asyncio.sleep(0.05)
        await asyncio.gather(*busy)
    finally:
        await pool.close()


# -- heartbeat and shutdown -----------------------------------------------------------------------


def heartbeat(env: Env, owner: str) -> dict[str, Any] | None:
    rows = env.db.query("SELECT * FROM pgqr.listener_heartbeats WHERE owner = %s", (owner,))
    return rows[0] if rows else None


async def test_the_heartbeat_advances_and_a_stop_marks_it_and_releases_leases(env: Env) -> None:
    env.sim.config.latency = 60.0  # a call far longer than the test: the stop must not wait for it
    service = Service(env.settings(heartbeat_seconds=0.2, grace_seconds=0.0, http_timeout=120.0, **QUIET))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    await wait_until(lambda: heartbeat(env, service.owner) is not None, 10, "the first heartbeat")
    first = heartbeat(env, service.owner)
    assert first is not None and first["pid"] == os.getpid() and first["stopped_at"] is None
    await wait_until(lambda: heartbeat(env, service.owner)["heartbeat_at"] > first["heartbeat_at"], 10,  # type: ignore[index]
                     "the heartbeat to advance")
    env.add("stuck")  # its call outlives the (zero) grace period
    await wait_until(lambda: env.row("stuck")["lease_owner"] == service.owner, 10, "the claim")
    stop.set()
    await asyncio.wait_for(task, 15)  # well before the call would end
    last = heartbeat(env, service.owner)
    assert last is not None and last["stopped_at"] is not None
    assert env.db.value("SELECT count(*) FROM pgqr.schedule WHERE lease_owner = %s", (service.owner,)) == 0
    assert env.row("stuck")["lease_expires_at"] is None


# -- the real command line ------------------------------------------------------------------------


async def test_sigterm_finishes_the_call_in_flight_and_exits_0_within_the_grace_period(
        env: Env, tmp_path: Path, children: list[asyncio.subprocess.Process]) -> None:
    env.sim.config.latency = 1.0
    env.add("inflight")
    proc = await start_pgqr(env.command_env(PGQR_GRACE_SECONDS="30"), tmp_path / "out.log", "run")
    children.append(proc)
    await wait_until(lambda: env.row("inflight")["lease_owner"] is not None or proc.returncode is not None, 15,
                     "the subprocess to claim the instance")
    owner = env.row("inflight")["lease_owner"]
    assert owner is not None, (tmp_path / "out.log").read_text()
    await wait_until(lambda: heartbeat(env, owner) is not None, 10, "the first heartbeat")
    proc.send_signal(signal.SIGTERM)
    status = await asyncio.wait_for(proc.wait(), 25)
    output = (tmp_path / "out.log").read_text()
    assert status == 0, output
    assert [(r["outcome"], r["written"], r["owner"]) for r in env.log("inflight")] == [("qr", True, owner)]
    row = env.row("inflight")
    assert row["qr_code"] is not None and row["lease_owner"] is None
    assert env.db.value("SELECT count(*) FROM pgqr.schedule WHERE lease_owner IS NOT NULL") == 0
    assert env.db.value("SELECT stopped_at IS NOT NULL FROM pgqr.listener_heartbeats WHERE owner = %s", (owner,))


async def test_no_secret_reaches_the_logs_and_every_log_line_has_an_action(
        env: Env, tmp_path: Path, children: list[asyncio.subprocess.Process]) -> None:
    api_key = "evo-GLOBAL-key-5f1e2d"
    hook_secret = "hook-SECRET-9c8b7a"
    db_password = "s3cret-pw"
    env.sim.config.api_key = api_key
    token = env.add("tokened", token="inst-TOKEN-4a3b2c")
    env.add("globalkey")
    env.add("badtoken")
    wrong_token = "wrong-TOKEN-1d2e3f"
    env.db.query("UPDATE public.evolution_instances SET instance_token = NULL WHERE instance_name = 'globalkey'")
    env.db.query("UPDATE public.evolution_instances SET instance_token = %s WHERE instance_name = 'badtoken'",
                 (wrong_token,))
    port = free_port()
    env.sim.config.global_webhook_url = f"http://127.0.0.1:{port}/webhooks/evolution/{hook_secret}"
    proc = await start_pgqr(env.command_env(
        DATABASE_URL=f"{env.db.dsn} password={db_password}", EVOLUTION_API_KEY=api_key,
        PGQR_WEBHOOK_SECRET=hook_secret, PGQR_HTTP_PORT=str(port), PGQR_GRACE_SECONDS="3"),
        tmp_path / "out.log", "run", "--log-level", "DEBUG")
    children.append(proc)
    await wait_until(lambda: env.has_qr("tokened") and env.has_qr("globalkey") and env.log("badtoken"), 15,
                     "the first reconcile")
    env.sim.rotate("tokened")  # its webhook envelope carries the instance token as `apikey`
    await wait_until(lambda: any(r["source"] == "webhook" and r["qr_updated"] for r in env.log("tokened")), 10,
                     "the webhook QR")
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{port}"
        async with http.post(f"{base}/webhooks/evolution/{hook_secret}x", json={}) as resp:
            assert resp.status == 401  # a wrong secret (issue 12), refused without echoing it
        async with http.get(f"{base}/metrics") as resp:
            assert resp.status == 200
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    output = (tmp_path / "out.log").read_text()
    for secret in (token, api_key, wrong_token, hook_secret, db_password):
        assert secret not in output, f"a secret leaked into the output: {secret[:4]}..."
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    ours = [line for line in lines if line["logger"].startswith("pgqr")]
    assert ours and all("action" in line for line in ours), [line for line in ours if "action" not in line]
    actions = {line["action"] for line in ours}
    assert {"start", "listen", "refresh", "webhook", "http", "stopped"} <= actions
    assert any(line["action"] == "refresh" and line.get("error_class") == "unauthorized" for line in ours)


def test_run_against_a_database_without_pgqr_exits_2_with_one_line(db: Database) -> None:
    # the fixture's teardown cleans pg_cron's jobs, so pg_cron must exist even if nothing migrated yet
    with psycopg.connect(db.server.dsn("postgres"), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
    result = run_pgqr("run", env={"DATABASE_URL": db.dsn, "EVOLUTION_API_URL": "http://127.0.0.1:9"})
    assert result.returncode == 2
    said, error = result.stderr.strip().splitlines()  # where it connects (a log line), then the one error line
    assert json.loads(said)["message"].startswith("connecting to the database: host 127.0.0.1")
    assert error == f"pgqr: pgqr is not installed in database {db.name}: run `pgqr migrate` first"
    assert result.stdout == ""


def test_run_with_a_bad_grace_period_exits_2_with_one_line() -> None:
    dsn = "postgresql://x@127.0.0.1:1/x"
    bad = run_pgqr("run", env={"DATABASE_URL": dsn, "PGQR_GRACE_SECONDS": "soon"})
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["pgqr: PGQR_GRACE_SECONDS must be a number, got 'soon'"]
    negative = run_pgqr("run", "--grace-seconds", "-1", env={"DATABASE_URL": dsn})
    assert negative.returncode == 2
    assert negative.stderr.strip().splitlines() == ["pgqr: --grace-seconds must not be negative, got -1"]


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_run_on_an_http_port_in_use_exits_2_with_one_line(taken_port: int) -> None:
    result = run_pgqr("run", env={"DATABASE_URL": "postgresql://x@127.0.0.1:1/x", "PGQR_HTTP_PORT": str(taken_port)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"pgqr: cannot serve HTTP on 127.0.0.1:{taken_port}: Address already in use"]


# -- readiness and metrics ------------------------------------------------------------------------


async def test_readyz_healthz_and_metrics_report_the_listener(env: Env) -> None:
    async with running_service(env.settings(http_port=0, **QUIET)) as service, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.http_port}"
        await settled(service)
        async with http.get(f"{base}/healthz") as resp:
            assert (resp.status, await resp.json()) == (200, {"status": "ok"})
        async with http.get(f"{base}/readyz") as resp:
            assert (resp.status, await resp.json()) == (200, {"ready": True, "problems": [], "degraded": []})
        env.add("shop")
        await wait_until(lambda: env.has_qr("shop"), 10, "a refresh")
        await wait_until(lambda: metric(service, "pgqr_refreshes_total", outcome="qr_stored", error_class="") == 1,
                         10, "the metrics to count it")
        async with http.get(f"{base}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        assert 'pgqr_refreshes_total{error_class="",outcome="qr_stored"} 1.0' in text
        assert "pgqr_listening 1.0" in text
        assert terminate_listener(env.db) == 1
        await wait_until(lambda: not listening(service), 5, "the listener to notice")
        async with http.get(f"{base}/readyz") as resp:  # inside the reconnect delay (>= 0.25 s)
            assert (resp.status, await resp.json()) == (
                503, {"ready": False, "problems": ["not listening"], "degraded": []})
        await wait_until(lambda: listening(service), 10, "the reconnect")
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 200
