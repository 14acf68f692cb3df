"""One clock, one claim, no refused webhook: a claim is a fence its write must present, a QR never comes back,
a webhook waits for pgqr's own write, and whatever the app's table refuses costs one row."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from aiohttp import web
from service_fixtures import Env, log_records, running_service, settled, start_pgqr, stop_group, wait_until
from sim_fixtures import hanging_evolution, serve

from pgqr import db, writeback
from pgqr.service import Service
from pgqr.settings import Secret

SECRET = "fence-SECRET-4d2c"
CLAIM = "SELECT * FROM pgqr.claim(%s, 10, interval '30 seconds')"


def record(env: Env, owner: str, *results: dict[str, Any]) -> list[dict[str, Any]]:
    return env.db.query("SELECT * FROM pgqr.record_results(%s, %s::jsonb)", (owner, json.dumps(list(results))))


def poll(claimed: dict[str, Any], md5: str, qr: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"key": claimed["key"], "source": "poll", "outcome": "qr", "md5": md5,
            "qr": qr or f"data:image/png;base64,{md5}", "latency_ms": 20, "claim_id": claimed["claim_id"], **extra}


def hook(key: str, md5: str) -> dict[str, Any]:
    return {"key": key, "source": "webhook", "outcome": "qr", "md5": md5, "qr": f"data:image/png;base64,{md5}"}


def claim_all(env: Env, owner: str = "replica") -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in env.db.query(CLAIM, (owner,))}


# --------------------------------------------------------------------------------------------- the fence


def test_claim_numbers_never_repeat_and_a_reclaimed_rows_old_result_writes_nothing(env: Env) -> None:
    env.add("shop", sim_state=None)
    first = claim_all(env)["shop"]
    # the write-back stalls past the lease; the same process claims the row again
    env.db.query("UPDATE pgqr.schedule SET due_at = now(), lease_expires_at = now()")
    second = claim_all(env)["shop"]
    assert second["claim_id"] > first["claim_id"]
    [stale] = record(env, "replica", poll(first, "old-call"))
    assert (stale["written"], stale["claim_held"], stale["reason"]) == (False, False, "superseded")
    assert env.row("shop")["qr_code"] is None and env.row("shop")["qr_md5"] is None
    # positive control: the current claim's result writes
    [fresh] = record(env, "replica", poll(second, "new-call"))
    assert (fresh["written"], fresh["qr_updated"]) == (True, True)
    assert env.row("shop")["qr_code"] == "data:image/png;base64,new-call"


@pytest.mark.parametrize("change", [
    "instance_name = 'shop-renamed'",
    "evolution_url = 'http://127.0.0.1:9/other'",
    "instance_token = 'another-token'",
])
def test_a_call_made_for_the_rows_old_name_server_or_token_writes_nothing(env: Env, change: str) -> None:
    env.add("shop", sim_state=None)
    claimed = claim_all(env)["shop"]
    env.db.query(f"UPDATE public.evolution_instances SET {change}")
    [row] = record(env, "replica", poll(claimed, "for-the-old-target"))
    assert (row["written"], row["reason"]) == (False, "superseded")
    state = env.db.query("SELECT qr_md5, qr_expires_at, claim_id, due_at <= now() AS due "
                         "FROM pgqr.instance_state JOIN pgqr.schedule USING (key)")
    # nothing written: neither the app's QR nor pgqr's estimate; due again at once for the new target
    assert state == [{"qr_md5": None, "qr_expires_at": None, "claim_id": None, "due": True}]
    assert env.db.value("SELECT qr_code FROM public.evolution_instances") is None
    assert env.db.query("SELECT written, detail FROM pgqr.refresh_log") == [{"written": False, "detail": "superseded"}]


def test_an_unrelated_column_change_keeps_the_claim(env: Env) -> None:
    """Positive control for the test above: a change pgqr does not call with leaves the claim standing."""
    env.add("shop", sim_state=None)
    claimed = claim_all(env)["shop"]
    env.db.query("UPDATE public.evolution_instances SET created_at = now() - interval '1 day'")
    [row] = record(env, "replica", poll(claimed, "fine"))
    assert (row["written"], row["qr_updated"]) == (True, True)


def test_a_status_flip_during_the_call_supersedes_it_and_adds_no_call_past_the_cap(env: Env) -> None:
    env.add("shop", sim_state=None)
    env.set("max_calls_per_minute", "2")
    first = claim_all(env)["shop"]
    env.db.query("UPDATE pgqr.schedule SET due_at = now(), lease_expires_at = now()")  # the lease ran out
    second = claim_all(env)["shop"]
    # two claims in this minute: the cap is reached. The app parks the row and asks again.
    env.db.query("UPDATE public.evolution_instances SET instance_status = 'paused'")
    env.db.query("UPDATE public.evolution_instances SET instance_status = 'connecting'")
    assert record(env, "replica", poll(second, "late"))[0]["reason"] == "superseded"
    row = env.row("shop")
    # due when the oldest of the two claims is a minute old, not at once
    assert (row["due_at"] - first["claimed_at"]).total_seconds() == 60
    assert claim_all(env) == {}
    # positive control: with the cap back at 12 the flip makes it due at once
    env.set("max_calls_per_minute", "12")
    env.db.query("UPDATE public.evolution_instances SET instance_status = 'paused'")
    env.db.query("UPDATE public.evolution_instances SET instance_status = 'connecting'")
    assert list(claim_all(env)) == ["shop"]


def test_the_trigger_and_the_tick_agree_on_what_turning_waiting_resets(env: Env) -> None:
    env.add("by-trigger", sim_state=None)
    env.add("by-sync", sim_state=None)
    env.db.query("UPDATE pgqr.schedule SET consecutive_failures = 7, repeats = 3")
    env.db.query("UPDATE pgqr.instance_state SET qr_md5 = 'x'")
    env.db.query("UPDATE public.evolution_instances SET instance_status = 'paused'")
    # one row comes back through the trigger, the other written with triggers off and found by the tick's sync
    env.db.query("UPDATE public.evolution_instances SET instance_status = 'connecting' "
                 "WHERE instance_name = 'by-trigger'")
    with env.db.connect() as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE public.evolution_instances SET instance_status = 'connecting' "
                     "WHERE instance_name = 'by-sync'")
        conn.execute("SET session_replication_role = origin")
    assert env.row("by-sync")["waiting"] is False
    env.tick()
    rows = [env.row(name) for name in ("by-trigger", "by-sync")]
    assert [(r["waiting"], r["consecutive_failures"], r["repeats"], r["qr_md5"]) for r in rows] == \
        [(True, 0, 0, None)] * 2


# ------------------------------------------------------------------------------------- a QR never comes back


def test_an_image_already_replaced_is_never_written_again_by_a_retried_webhook_or_a_late_poll(env: Env) -> None:
    env.add("shop", sim_state=None)
    key = str(env.row("shop")["id"])
    claimed = claim_all(env)["shop"]
    assert record(env, "hooks", hook(key, "first"))[0]["qr_updated"] is True
    assert record(env, "hooks", hook(key, "second"))[0]["qr_updated"] is True
    # Evolution retries the first webhook; the poll claimed before both returns the first image too
    [retried] = record(env, "hooks", hook(key, "first"))
    assert (retried["written"], retried["qr_updated"], retried["reason"]) == (True, False, "image_already_replaced")
    [late] = record(env, "replica", poll(claimed, "first", qr="data:image/png;base64,first"))
    assert late["qr_updated"] is False
    assert env.row("shop")["qr_code"] == "data:image/png;base64,second"
    assert env.row("shop")["qr_history"] == [None] * 0 + ["first"]
    # positive control: an image it never had is written
    assert record(env, "hooks", hook(key, "third"))[0]["qr_updated"] is True
    assert env.row("shop")["qr_history"] == ["first", "second"]


# ----------------------------------------------------------------------------- webhooks wait for pgqr's write


@pytest.fixture
async def hooked(env: Env) -> AsyncIterator[Service]:
    env.db.pause_cron()
    settings = env.settings(http_port=0, webhook_secret=Secret(SECRET), fallback_seconds=3600.0)
    async with running_service(settings) as service:
        await settled(service)
        yield service


def quiet_rows(env: Env, *names: str) -> dict[str, str]:
    """App rows nothing polls (not due for an hour); returns their keys."""
    for name in names:
        env.add(name, sim_state=None)
    env.db.query("UPDATE pgqr.schedule SET due_at = now() + interval '1 hour'")
    return {name: str(env.row(name)["id"]) for name in names}


async def post_qr(service: Service, name: str, image: str) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{service.http_port}/webhooks/evolution/{SECRET}"
    body = {"event": "qrcode.updated", "instance": name,
            "data": {"qrcode": {"instance": name, "code": "2@x", "base64": f"data:image/png;base64,{image}"}}}
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def hold(env: Env, sql: str, params: tuple[Any, ...]) -> psycopg.AsyncConnection[Any]:
    """A session holding the rows `sql` locks, until it commits."""
    conn = await psycopg.AsyncConnection.connect(env.db.dsn)
    await conn.execute(sql, params)
    return conn


async def test_a_webhook_that_meets_a_write_of_its_instance_waits_for_it_and_applies(
        env: Env, hooked: Service) -> None:
    keys = quiet_rows(env, "shop", "other")
    # pgqr's own write-back of the same instance holds the state row (a few hundred ms on a loaded machine)
    holder = await hold(env, "SELECT 1 FROM pgqr.schedule WHERE key = %s FOR UPDATE", (keys["shop"],))
    waiting = asyncio.create_task(post_qr(hooked, "shop", "WAITED"))
    # one waiting webhook never holds up the rest of its group
    assert await post_qr(hooked, "other", "OTHER") == (200, {"recorded": True, "qr_updated": True})
    assert not waiting.done()
    await asyncio.sleep(0.3)
    await holder.commit()
    await holder.close()
    assert await waiting == (200, {"recorded": True, "qr_updated": True})
    assert env.row("shop")["qr_code"] == "data:image/png;base64,WAITED"


async def test_only_a_lock_the_app_holds_past_the_wait_earns_a_503(env: Env, hooked: Service) -> None:
    keys = quiet_rows(env, "shop")
    holder = await hold(env, "SELECT 1 FROM public.evolution_instances WHERE id::text = %s FOR UPDATE",
                        (keys["shop"],))
    try:
        status, body = await post_qr(hooked, "shop", "HELD")
    finally:
        await holder.rollback()
        await holder.close()
    assert (status, body) == (503, {"error": "instance busy, retry"})
    # positive control: once the app lets go, Evolution's retry applies
    assert await post_qr(hooked, "shop", "HELD") == (200, {"recorded": True, "qr_updated": True})


# ------------------------------------------------------------------------------ the app's refusal costs one row


def refuse_images_with(env: Env, marker: str) -> None:
    env.db.query(f"ALTER TABLE public.evolution_instances ADD CONSTRAINT no_{marker.lower()} "
                 f"CHECK (qr_code NOT LIKE '%%{marker}%%')")


async def test_a_qr_the_apps_table_refuses_costs_only_its_own_instance(env: Env) -> None:
    async def connect(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        image = "REFUSED" if name == "bad" else f"GOOD-{name}"
        return web.json_response({"code": "2@a", "base64": f"data:image/png;base64,{image}", "count": 1})

    app = web.Application()
    app.router.add_get("/instance/connect/{name}", connect)
    refuse_images_with(env, "REFUSED")
    async with serve(app) as base_url:
        for i in range(20):
            env.add(f"good-{i:02d}", sim_state=None)
        env.add("bad", sim_state=None)
        summary = await env.reconcile(evolution_api_url=Secret(base_url))
    outcomes = {r.instance_name: r for r in summary.results}
    bad = outcomes.pop("bad")
    assert bad.outcome == "app_refused" and bad.detail is not None and "23514" in bad.detail
    assert {r.outcome for r in outcomes.values()} == {"qr_stored"} and len(outcomes) == 20
    assert env.row("good-07")["qr_code"] == "data:image/png;base64,GOOD-good-07"
    row = env.row("bad")
    assert (row["qr_code"], row["qr_md5"], row["last_outcome"], row["last_error_class"]) == (
        None, None, "app_refused", "app_refused")
    assert row["due_at"] > row["last_poll_at"]  # backs off, no hot loop
    [logged] = env.log("bad")
    assert (logged["outcome"], logged["written"]) == ("app_refused", False)
    assert logged["detail"].startswith("23514: new row for relation \"evolution_instances\" violates check")


async def test_a_webhook_the_apps_table_refuses_gets_a_4xx_and_its_group_200(env: Env, hooked: Service) -> None:
    quiet_rows(env, *(f"ok-{i}" for i in range(5)), "bad")
    refuse_images_with(env, "REFUSED")
    answers = await asyncio.gather(post_qr(hooked, "bad", "REFUSED"),
                                   *(post_qr(hooked, f"ok-{i}", f"FINE{i}") for i in range(5)))
    assert answers[0] == (422, {"error": "the app's table refused this write"})
    assert answers[1:] == [(200, {"recorded": True, "qr_updated": True})] * 5
    assert env.row("ok-3")["qr_code"] == "data:image/png;base64,FINE3"
    assert hooked.metrics.registry.get_sample_value(
        "pgqr_webhook_rejections_total", {"reason": "app_refused"}) == 1.0


# --------------------------------------------------------------------------------- backpressure, the due index


async def test_a_full_write_back_buffer_makes_put_wait_instead_of_growing(env: Env) -> None:
    env.add("shop", sim_state=None)
    key = str(env.row("shop")["id"])
    pool = db.Pool(env.db.dsn, size=2)
    await pool.open()
    writer = writeback.ResultWriter(pool, "w", capacity=2, patience=30)
    # the database stalls every write: another session holds the log table
    blocker = await hold(env, "LOCK TABLE pgqr.refresh_log IN ACCESS EXCLUSIVE MODE", ())
    try:
        event = db.Result(key=key, source="webhook", outcome="event", evolution_state="connecting")
        first = await writer.put(event)
        second = await writer.put(db.Result(key=key, source="webhook", outcome="event", evolution_state="close"))
        third = asyncio.create_task(writer.put(event))
        # the first write-back is in the database, waiting for the lock: nothing leaves the buffer before it ends
        await wait_until(lambda: env.db.value(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
            "AND query LIKE '%%record_results%%'"), 10, "the write-back to wait for the lock")
        assert not third.done()  # two results buffered: the third waits for room
        await blocker.commit()
        await asyncio.wait_for(third, 30)
        results = await asyncio.wait_for(asyncio.gather(first, second, await third), 30)
        assert [r is not None and r.written for r in results] == [True, True, True]
    finally:
        await blocker.close()
        await writer.close()
        await pool.close()


def test_a_leased_row_is_not_at_the_head_of_the_due_index(env: Env) -> None:
    env.db.pause_cron()  # a tick or an alert check between the two readings of the scan counts scans the schedule
    env.add("leased", sim_state=None)
    env.add("later", sim_state=None)
    env.db.query("UPDATE pgqr.schedule SET due_at = now() + interval '10 seconds' "
                 "WHERE key IN (SELECT key FROM pgqr.instance_state WHERE name = 'later')")
    assert env.db.value("SELECT pgqr.next_due_in()") == 0.0
    assert list(claim_all(env)) == ["leased"]
    # the claim moved its due time to its lease's end: the index's head is 'later', not a row already taken
    leased = env.row("leased")
    assert leased["due_at"] == leased["lease_expires_at"]
    assert env.db.value("SELECT name FROM pgqr.instance_state JOIN pgqr.schedule USING (key) "
                        "WHERE waiting ORDER BY due_at LIMIT 1") == "later"
    assert 8 < env.db.value("SELECT pgqr.next_due_in()") <= 10  # type: ignore[operator]
    # and it is read from the due index, one step, not by scanning every waiting row
    with env.db.connect() as conn:
        def scans() -> tuple[int, int]:
            conn.execute("SELECT pg_stat_force_next_flush()")
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(
                "SELECT i.idx_scan, t.seq_scan FROM pg_stat_user_indexes i JOIN pg_stat_user_tables t USING (relid) "
                "WHERE i.indexrelname = 'schedule_due_idx'").fetchone()
            assert row is not None
            return int(row["idx_scan"]), int(row["seq_scan"])  # type: ignore[call-overload]

        before = scans()
        conn.execute("SELECT pgqr.next_due_in()")
        after = scans()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 0)


# ----------------------------------------------------------------------------------- the sidecar's clock is off


@pytest.mark.parametrize("skew", ["+20s", "-20s"])
async def test_a_late_poll_never_overwrites_a_newer_webhook_qr_whatever_the_sidecars_clock(
        env: Env, tmp_path: Path, children: list[asyncio.subprocess.Process], skew: str) -> None:
    """`pgqr run` under faketime; its poll is in flight when a webhook brings a newer QR; the poll then returns
    the image Evolution showed when it was called."""
    called, release = asyncio.Event(), asyncio.Event()
    env.db.pause_cron()
    async with serve(hanging_evolution(called, release)) as base_url:
        port = free_port()
        environment = env.command_env(EVOLUTION_API_URL=base_url, PGQR_HTTP_PORT=str(port),
                                      PGQR_WEBHOOK_SECRET=SECRET)
        output = tmp_path / "run.log"
        proc = await start_pgqr(environment, output, "run", skew=skew)
        children.append(proc)
        await wait_until(lambda: env.db.value("SELECT count(*) FROM pgqr.listeners") == 1, 60, "pgqr run to start")
        env.add("shop", sim_state=None)
        await asyncio.wait_for(called.wait(), 60)
        url = f"http://127.0.0.1:{port}/webhooks/evolution/{SECRET}"
        body = {"event": "qrcode.updated", "instance": "shop",
                "data": {"qrcode": {"instance": "shop", "code": "2@b", "base64": "data:image/png;base64,HOOK"}}}
        async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
            assert (resp.status, await resp.json()) == (200, {"recorded": True, "qr_updated": True})
        release.set()
        await wait_until(lambda: any(r["source"] == "poll" for r in env.log("shop")), 30, "the poll's write-back")
        stop_group(proc)
        await wait_until(lambda: env.db.value("SELECT count(*) FROM pgqr.listener_heartbeats WHERE stopped_at IS NULL")
                         == 0, 30, "pgqr run to stop")
    assert env.row("shop")["qr_code"] == "data:image/png;base64,HOOK"
    assert [(r["source"], r["qr_updated"]) for r in env.log("shop")] == [("webhook", True), ("poll", False)]
    # the child's clock really was off by about `skew` (its log lines are stamped with it)
    stamped = [datetime.fromisoformat(r["ts"]) for r in log_records(output) if "ts" in r]
    offset = (stamped[-1] - datetime.now(UTC)).total_seconds()
    assert (offset > 10) if skew.startswith("+") else (offset < -10), offset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_result_whose_row_left_waiting_during_the_call_is_reported_not_applied(env: Env) -> None:
    """`pgqr refresh --once --json` says what happened: not written, and why (it used to say qr_unchanged)."""
    async def connect(request: web.Request) -> web.Response:
        # the app moves the row out of waiting while Evolution answers
        env.db.query("UPDATE public.evolution_instances SET instance_status = 'paused' WHERE instance_name = %s",
                     (request.match_info["name"],))
        return web.json_response({"code": "2@a", "base64": "data:image/png;base64,LATE", "count": 1})

    app = web.Application()
    app.router.add_get("/instance/connect/{name}", connect)
    async with serve(app) as base_url:
        env.add("leaving", sim_state=None)
        env.add("staying", sim_state=None, status="connecting")
        env.db.query("UPDATE pgqr.schedule SET due_at = now() + interval '1 hour' "
                     "WHERE key IN (SELECT key FROM pgqr.instance_state WHERE name = 'staying')")
        summary = await env.reconcile(evolution_api_url=Secret(base_url))
    [result] = summary.results
    assert (result.instance_name, result.outcome) == ("leaving", "not_applied")
    assert result.detail is not None and "stopped waiting" in result.detail
    assert summary.as_json()["not_applied"] == 1 and summary.as_json()["success"] is False
    assert env.row("leaving")["qr_code"] is None and env.row("leaving")["qr_md5"] is None
