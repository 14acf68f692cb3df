"""Resilience: leases keep claimers apart, a killed replica's work is picked up, a server restart is survived,
one bad instance never spoils a batch, and every way of stopping stops cleanly. Real PostgreSQL, real HTTP on
loopback, real subprocesses and signals."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import web
from conftest import Database, command_env
from service_fixtures import Env, metric, running_service, settled, start_pgqr, wait_until
from sim_fixtures import serve

from pgqr import devdb, migrations
from pgqr.settings import Secret, Settings
from pgqr.simulator import Simulator

QUIET = {"fallback_seconds": 3600.0}  # so only the wake-up under test can explain a refresh
BAD_URL = "http://evo:80a"  # a port that is not a number: rejected only when the URL is used
NUL_QR = "data:image/png;base64,\u0000x"  # jsonb cannot hold \u0000


pytestmark = pytest.mark.usefixtures("no_cron_ticks")


def leases_held(db: Database) -> int:
    return int(db.value("SELECT count(*) FROM pgqr.schedule WHERE lease_owner IS NOT NULL"))  # type: ignore[arg-type]


def claim(db: Database, owner: str, max_rows: int) -> set[str]:
    """Claim under a long lease whatever is due at any time ('infinity'): only a lease can keep a row out."""
    rows = db.query("SELECT * FROM pgqr.claim(%s, %s, interval '1 hour', 'infinity')", (owner, max_rows))
    return {str(r["name"]) for r in rows}


@pytest.fixture
async def nul_evolution() -> AsyncIterator[str]:
    """An Evolution look-alike whose QR carries a NUL character; yields its base URL."""
    async def connect(request: web.Request) -> web.Response:
        return web.json_response({"pairingCode": None, "code": "2@nul", "base64": NUL_QR, "count": 1})

    app = web.Application()
    app.router.add_get("/instance/connect/{name}", connect)
    async with serve(app) as base_url:
        yield base_url


def add_bad_instances(env: Env, nul_url: str) -> None:
    env.add("malformed", sim_state=None, triggers=False)
    env.add("nul", sim_state=None, triggers=False)
    env.db.query("UPDATE public.evolution_instances SET evolution_url = %s WHERE instance_name = 'malformed'",
                 (BAD_URL,))
    env.db.query("UPDATE public.evolution_instances SET evolution_url = %s WHERE instance_name = 'nul'",
                 (nul_url,))


# -- leases ---------------------------------------------------------------------------------------


async def test_the_lease_alone_keeps_a_second_claimer_away_until_it_expires(env: Env) -> None:
    for name in ("one", "two", "three"):
        env.add(name, sim_state=None, triggers=False)
    assert claim(env.db, "a", 10) == {"one", "two", "three"}
    assert claim(env.db, "b", 10) == set()  # 'infinity': only the lease can be keeping b out
    env.db.query("UPDATE pgqr.schedule SET lease_expires_at = now() - interval '1 second' "
                 "WHERE lease_owner = 'a'")
    assert claim(env.db, "b", 10) == {"one", "two", "three"}
    assert env.db.value("SELECT array_agg(DISTINCT lease_owner) FROM pgqr.schedule") == ["b"]


async def test_two_concurrent_claims_over_fifty_due_rows_split_them_without_overlap(env: Env) -> None:
    with env.db.connect() as conn:
        conn.execute("SET session_replication_role = replica")  # a bulk load: no trigger, no NOTIFY
        conn.execute("INSERT INTO public.evolution_instances (instance_name, instance_token, instance_status) "
                     "SELECT 'bulk-' || g, 't', 'connecting' FROM generate_series(1, 50) g")
        conn.execute("SET session_replication_role = origin")
        conn.execute("SELECT pgqr.sync_instances()")  # what the next tick does
    everything = {f"bulk-{i}" for i in range(1, 51)}
    for round_ in range(5):  # a few rounds, so the two statements really do overlap in some of them
        barrier = threading.Barrier(2)
        got: dict[str, set[str]] = {}

        def claimer(owner: str, barrier: threading.Barrier, got: dict[str, set[str]]) -> None:
            with psycopg.connect(env.db.dsn, autocommit=True) as conn:
                barrier.wait()
                rows = conn.execute("SELECT name FROM pgqr.claim(%s, 30, interval '1 hour', 'infinity')",
                                    (owner,)).fetchall()
                got[owner] = {r[0] for r in rows}

        threads = [threading.Thread(target=claimer, args=(owner, barrier, got)) for owner in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert got["a"].isdisjoint(got["b"]), (round_, sorted(got["a"] & got["b"]))
        assert got["a"] | got["b"] == everything, (round_, sorted(everything - got["a"] - got["b"]))
        env.db.query("UPDATE pgqr.schedule SET lease_owner = NULL, lease_expires_at = NULL")


async def test_a_killed_replicas_lease_holds_until_it_expires_then_another_owner_refreshes(
        env: Env, tmp_path: Path, children: list[asyncio.subprocess.Process]) -> None:
    env.sim.config.timeout_rate = 1.0
    env.sim.config.hang_seconds = 30
    env.add("victim")
    out = tmp_path / "run.log"
    proc = await start_pgqr(env.command_env(PGQR_HTTP_TIMEOUT="20"), out, "run")
    children.append(proc)
    await wait_until(lambda: env.row("victim")["lease_owner"] is not None or proc.returncode is not None, 15,
                     "the replica to claim the instance")
    dead = env.row("victim")["lease_owner"]
    assert dead is not None, out.read_text()
    await wait_until(lambda: env.sim.stats("victim").connect_calls == 1, 10, "the replica's (hanging) call")
    proc.send_signal(signal.SIGKILL)
    assert await asyncio.wait_for(proc.wait(), 5) == -signal.SIGKILL

    row = env.row("victim")
    assert row["lease_owner"] == dead and row["qr_code"] is None
    assert env.row("victim")["lease_expires_at"] > env.db.value("SELECT now()")
    env.sim.config.timeout_rate = 0.0
    env.make_due("victim")  # so only the lease can keep the survivor away
    early = await env.reconcile(owner="survivor")
    assert early.results == []  # the dead owner's lease still stands
    assert env.sim.stats("victim").connect_calls == 1

    env.db.query("UPDATE pgqr.schedule SET lease_expires_at = now() - interval '1 second' "
                 "WHERE key IN (SELECT key FROM pgqr.instance_state WHERE name = 'victim')")
    summary = await env.reconcile(owner="survivor")
    assert [(r.instance_name, r.outcome) for r in summary.results] == [("victim", "qr_stored")]
    row = env.row("victim")
    assert str(row["qr_code"]).startswith("data:image/png;base64,") and row["lease_owner"] is None
    assert env.sim.stats("victim").connect_calls == 2
    assert [(r["owner"], r["outcome"], r["written"]) for r in env.log("victim")] == [("survivor", "qr", True)]


# -- the database going away ----------------------------------------------------------------------


async def test_the_listener_survives_a_real_server_restart_and_refreshes_a_new_instance(
        simulator: Simulator) -> None:
    with devdb.running(cron_database="postgres") as server:
        dsn = server.dsn("postgres")
        migrations.migrate(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE cron.job SET active = false")  # no real tick may explain the refresh
        settings = Settings(database_url=Secret(dsn), evolution_api_url=Secret(simulator.base_url),
                            http_timeout=2.0, heartbeat_seconds=0.5, **QUIET)
        async with running_service(settings) as service:
            await settled(service)
            await asyncio.to_thread(server.restart)
            await wait_until(
                lambda: metric(service, "pgqr_listener_reconnects_total") > 0
                and service.listener.listening.is_set(), 30, "the listener to reconnect")
            token = simulator.add_instance("after-restart")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO public.evolution_instances (instance_name, instance_token, "
                             "instance_status) VALUES ('after-restart', %s, 'connecting')", (token,))

            def qr_stored() -> bool:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    row = conn.execute("SELECT qr_code FROM public.evolution_instances "
                                       "WHERE instance_name = 'after-restart'").fetchone()
                return row is not None and row[0] is not None

            await wait_until(qr_stored, 15, "a QR for the instance inserted after the restart")
            assert service.listener.listening.is_set()


# -- stopping -------------------------------------------------------------------------------------


async def test_demo_stops_cleanly_on_ctrl_c_and_removes_its_server(
        tmp_path: Path, children: list[asyncio.subprocess.Process]) -> None:
    out = tmp_path / "demo.log"
    proc = await start_pgqr(command_env(), out, "demo")
    children.append(proc)

    def shows_table() -> bool:
        return proc.returncode is not None or any(
            line.startswith("acme-store") for line in out.read_text().splitlines())

    await wait_until(shows_table, 60, "the demo's first table")
    assert proc.returncode is None, out.read_text()
    server_dir = re.search(r"PostgreSQL in (\S+) on port", out.read_text())
    assert server_dir, out.read_text()
    proc.send_signal(signal.SIGINT)
    status = await asyncio.wait_for(proc.wait(), 15)
    output = out.read_text()
    assert status == 0, output
    assert "Traceback" not in output, output
    assert not Path(server_dir.group(1)).exists()
    assert output.rstrip().endswith("pgqr demo: stopped; the throwaway database is removed."), output


async def test_sigterm_with_a_backlog_finishes_the_batch_in_flight_and_takes_no_new_one(
        env: Env, tmp_path: Path, children: list[asyncio.subprocess.Process]) -> None:
    env.sim.config.latency = 1.0
    for i in range(10):
        env.add(f"backlog-{i}", triggers=False)
    out = tmp_path / "run.log"
    # two call slots: two claims at a time
    proc = await start_pgqr(env.command_env(PGQR_GRACE_SECONDS="5", PGQR_CONCURRENCY="2"), out, "run")
    children.append(proc)
    await wait_until(lambda: leases_held(env.db) > 0 or proc.returncode is not None, 15, "the first leases")
    assert proc.returncode is None, out.read_text()
    proc.send_signal(signal.SIGTERM)
    status = await asyncio.wait_for(proc.wait(), 30)
    output = out.read_text()
    assert status == 0, output
    attempted = env.db.value("SELECT count(*) FROM pgqr.refresh_log")
    claimed = env.db.value("SELECT count(*) FROM pgqr.schedule WHERE last_attempt_at IS NOT NULL")
    assert attempted < 10, output  # type: ignore[operator]
    # the batch in flight (and at most one claimed as the signal landed) finishes; no further batch starts
    assert claimed <= 4, (claimed, attempted)  # type: ignore[operator]
    assert attempted == claimed, "a claimed instance was neither finished nor logged"
    assert leases_held(env.db) == 0


# -- one bad instance -----------------------------------------------------------------------------


async def test_a_malformed_url_and_a_nul_in_the_qr_never_spoil_the_batch(env: Env, nul_evolution: str) -> None:
    env.add("healthy", triggers=False)
    add_bad_instances(env, nul_evolution)
    summary = await env.reconcile()
    outcomes = {r.instance_name: (r.success, r.outcome) for r in summary.results}
    assert outcomes == {"healthy": (True, "qr_stored"), "malformed": (False, "failed"), "nul": (False, "failed")}
    assert str(env.row("healthy")["qr_code"]).startswith("data:image/png;base64,")
    assert env.row("nul")["qr_code"] is None
    logged = {name: [(r["outcome"], r["written"]) for r in env.log(name)] for name in ("healthy", "malformed", "nul")}
    assert logged == {"healthy": [("qr", True)], "malformed": [("failed", True)], "nul": [("failed", True)]}
    assert env.row("malformed")["consecutive_failures"] == 1 and env.row("nul")["consecutive_failures"] == 1
    assert leases_held(env.db) == 0


async def test_refresh_once_json_with_bad_instances_exits_1_with_valid_json_and_no_traceback(
        env: Env, nul_evolution: str) -> None:
    env.add("healthy", triggers=False)
    add_bad_instances(env, nul_evolution)
    proc = await asyncio.create_subprocess_exec(  # async: the NUL server answers from this event loop
        sys.executable, "-m", "pgqr", "refresh", "--once", "--json",
        env=env.command_env(),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1, stderr.decode()
    assert "Traceback" not in stderr.decode(), stderr.decode()
    doc: dict[str, Any] = json.loads(stdout)
    assert (doc["success"], doc["total_instances"], doc["refreshed"], doc["failed"]) == (False, 3, 1, 2)
    assert {r["instance_name"]: r["outcome"] for r in doc["results"]} == {
        "healthy": "qr_stored", "malformed": "failed", "nul": "failed"}
    assert env.has_qr("healthy")
    assert leases_held(env.db) == 0


# -- backoff and re-connecting --------------------------------------------------------------------


@pytest.mark.parametrize("failures", [5000, 2_147_483_647])
def test_backoff_never_overflows_past_its_cap(quiet: Database, failures: int) -> None:
    rows = quiet.query("SELECT error_class, pgqr.backoff(error_class, %s) <= backoff_max AS within "
                       "FROM pgqr.error_classes", (failures,))
    assert rows and all(r["within"] for r in rows), [r for r in rows if not r["within"]]
    # a class the table does not know yet waits like an internal error, also capped
    assert quiet.value("SELECT pgqr.backoff('unheard_of', %s) <= interval '30 seconds'", (failures,)) is True


async def test_an_instance_switched_back_to_connecting_is_refreshed_at_once(env: Env) -> None:
    async with running_service(env.settings(**QUIET)) as service:
        await settled(service)
        env.add("flip")
        await wait_until(lambda: env.has_qr("flip"), 10, "the first QR")
        await wait_until(lambda: env.row("flip")["lease_owner"] is None, 10, "the first write-back")
        env.db.query("UPDATE public.evolution_instances SET instance_status = 'connected' "
                     "WHERE instance_name = 'flip'")
        await asyncio.sleep(0.5)
        env.db.query("UPDATE public.evolution_instances SET instance_status = 'connecting' "
                     "WHERE instance_name = 'flip'")
        # no tick, no fallback and a next poll due in about 45 s: only the trigger's wake-up explains it
        await wait_until(lambda: len(env.log("flip")) >= 2, 10, "a new attempt for the re-connecting instance")
    assert [r["outcome"] for r in env.log("flip")] == ["qr", "qr"]
