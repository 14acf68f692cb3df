"""One reconcile against the simulator: each Evolution reply class lands in the rows as it should."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

from conftest import Database, run_pgqr
from service_fixtures import Env, notifications


async def test_a_new_qr_is_stored_logged_and_announced_without_the_image_or_token(env: Env) -> None:
    token = env.add("shop")
    async with notifications(env.db.dsn, "pgqr_qr_updated") as collect:
        summary = await env.reconcile()
        payloads = await collect(0.5)
    row = env.row("shop")
    assert str(row["qr_code"]).startswith("data:image/png;base64,")
    assert row["last_qr_update"] is not None
    assert row["last_outcome"] == "qr" and row["consecutive_failures"] == 0 and row["lease_owner"] is None
    assert [(r.instance_name, r.success, r.qr_updated) for r in summary.results] == [("shop", True, True)]
    assert payloads == [{"instance_id": str(row["id"]), "instance_name": "shop",
                         "user_id": str(row["user_id"]), "status": "connecting"}]
    [log] = env.log("shop")
    assert (log["source"], log["outcome"], log["applied"], log["qr_updated"], log["http_status"]) == (
        "poll", "qr", True, True, 200)
    assert log["latency_ms"] > 0
    assert token not in json.dumps(payloads) and token not in str(log)


async def test_an_unchanged_qr_refreshes_the_timestamp_but_is_not_rewritten_or_announced(env: Env) -> None:
    env.set("min_refresh_seconds", "0")
    env.add("shop")
    await env.reconcile()
    first = env.row("shop")
    async with notifications(env.db.dsn, "pgqr_qr_updated") as collect:
        summary = await env.reconcile()
        assert await collect(0.3) == []
    second = env.row("shop")
    assert second["qr_code"] == first["qr_code"]
    assert second["last_qr_update"] > first["last_qr_update"]
    assert [(r.success, r.qr_updated, r.outcome) for r in summary.results] == [(True, False, "qr")]
    assert [log["qr_updated"] for log in env.log("shop")] == [True, False]


async def test_a_rotated_qr_replaces_the_stored_one(env: Env) -> None:
    env.set("min_refresh_seconds", "0")
    env.add("shop")
    await env.reconcile()
    first = env.row("shop")["qr_code"]
    env.sim.rotate("shop")
    summary = await env.reconcile()
    assert summary.results[0].qr_updated
    assert env.row("shop")["qr_code"] != first
    assert env.row("shop")["qr_count"] == 2


async def test_count_zero_is_a_success_that_keeps_the_previous_qr(env: Env) -> None:
    env.sim.config.first_qr_delay = 5  # the socket gives no QR within the controller's sleep
    env.add("slow", qr_code="data:image/png;base64,OLD")
    summary = await env.reconcile()
    row = env.row("slow")
    assert [(r.success, r.outcome, r.qr_updated) for r in summary.results] == [(True, "no_qr", False)]
    assert row["qr_code"] == "data:image/png;base64,OLD"
    assert row["last_qr_update"] is None  # nothing was refreshed, so a stale-QR alert can still see it
    assert row["consecutive_failures"] == 0 and row["next_attempt_at"] is None


async def test_open_marks_the_instance_connected_and_clears_the_qr(env: Env) -> None:
    env.add("linked", sim_state="open", qr_code="data:image/png;base64,OLD")
    env.db.query("UPDATE public.evolution_instances SET pairing_code = 'WZYEH1YY' WHERE instance_name = 'linked'")
    async with notifications(env.db.dsn, "pgqr_qr_updated") as collect:
        summary = await env.reconcile()
        payloads = await collect(0.5)
    row = env.row("linked")
    assert (row["instance_status"], row["qr_code"], row["pairing_code"]) == ("connected", None, None)
    assert summary.results[0].outcome == "connected" and summary.results[0].status == "connected"
    assert [p["status"] for p in payloads] == ["connected"]
    # a connected instance is no longer due
    env.set("min_refresh_seconds", "0")
    assert (await env.reconcile()).results == []


async def _assert_permanent_failure(env: Env, name: str, error_class: str, http_status: int) -> None:
    summary = await env.reconcile()
    [result] = summary.results
    assert (result.success, result.error_class, result.http_status) == (False, error_class, http_status)
    row = env.row(name)
    assert row["consecutive_failures"] == 1 and row["last_error_class"] == error_class
    delay = row["next_attempt_at"] - row["last_attempt_at"]
    assert timedelta(minutes=29) < delay < timedelta(minutes=31)  # the long, permanent backoff
    env.set("min_refresh_seconds", "0")
    assert (await env.reconcile()).results == []  # in backoff: not claimed


async def test_instance_missing_in_evolution_is_a_permanent_not_found(env: Env) -> None:
    env.add("ghost", sim_state=None)
    await _assert_permanent_failure(env, "ghost", "not_found", 404)


async def test_a_wrong_token_is_a_permanent_unauthorized(env: Env) -> None:
    env.add("shop")
    env.db.query("UPDATE public.evolution_instances SET instance_token = 'wrong' WHERE instance_name = 'shop'")
    await _assert_permanent_failure(env, "shop", "unauthorized", 401)


async def test_an_error_object_with_200_is_a_permanent_api_error(env: Env) -> None:
    env.add("unloaded", mode="not_in_memory")
    await _assert_permanent_failure(env, "unloaded", "api_error", 200)


async def test_an_empty_200_body_is_a_permanent_empty_reply(env: Env) -> None:
    env.add("v1", mode="empty_reply")
    await _assert_permanent_failure(env, "v1", "empty_reply", 200)


async def test_server_errors_back_off_exponentially_with_jitter(env: Env) -> None:
    env.sim.config.error_rate = 1.0
    env.add("flaky")
    delays = []
    for attempt in range(1, 4):
        env.db.query("UPDATE pgqr.instance_state SET next_attempt_at = NULL, last_attempt_at = NULL")
        [result] = (await env.reconcile()).results
        assert (result.error_class, result.http_status) == ("server_error", 500)
        row = env.row("flaky")
        assert row["consecutive_failures"] == attempt
        delays.append((row["next_attempt_at"] - row["last_attempt_at"]).total_seconds())
    # base 30 s doubling per failure, jittered within [50%, 100%]
    assert 15 <= delays[0] <= 30.5 and 30 <= delays[1] <= 60.5 and 60 <= delays[2] <= 120.5
    env.sim.config.error_rate = 0.0
    env.db.query("UPDATE pgqr.instance_state SET next_attempt_at = NULL, last_attempt_at = NULL")
    await env.reconcile()
    assert env.row("flaky")["consecutive_failures"] == 0  # a success resets the count


async def test_a_hanging_server_is_a_transient_timeout(env: Env) -> None:
    env.sim.config.timeout_rate = 1.0
    env.sim.config.hang_seconds = 5
    env.add("hangs")
    [result] = (await env.reconcile(http_timeout=0.3)).results
    assert (result.success, result.error_class) == (False, "timeout")
    row = env.row("hangs")
    assert row["lease_owner"] is None and 0 < (row["next_attempt_at"] - row["last_attempt_at"]).total_seconds() <= 30.5


async def test_an_instance_without_token_uses_the_global_key_and_without_either_fails_as_config(env: Env) -> None:
    env.add("global-key", token="")
    env.db.query("UPDATE public.evolution_instances SET instance_token = NULL")
    results = {r.instance_name: r for r in (await env.reconcile(evolution_api_key=env.sim.config.api_key)).results}
    assert results["global-key"].outcome == "qr"
    env.add("nokey", sim_state="close")
    env.db.query("UPDATE public.evolution_instances SET instance_token = NULL WHERE instance_name = 'nokey'")
    [result] = (await env.reconcile()).results
    assert (result.success, result.error_class) == (False, "config")
    assert "EVOLUTION_API_KEY" in str(result.detail)


async def test_per_instance_evolution_url_wins_over_the_default(env: Env) -> None:
    env.add("elsewhere")
    env.db.query("UPDATE public.evolution_instances SET evolution_url = %s", (env.sim.base_url,))
    [result] = (await env.reconcile(evolution_api_url="http://127.0.0.1:9")).results
    assert result.outcome == "qr"


async def test_a_late_write_from_an_expired_lease_is_dropped(env: Env) -> None:
    env.add("shop")
    with env.db.connect() as conn:
        conn.execute("SELECT * FROM pgqr.claim('slow-replica', 10, now())")
        # a minute later: the slow replica's lease has run out
        conn.execute("UPDATE pgqr.instance_state SET lease_expires_at = now() - interval '1 second', "
                     "last_attempt_at = now() - interval '61 seconds'")
    assert [r.instance_name for r in (await env.reconcile(owner="fresh-replica")).results] == ["shop"]
    fresh_qr = env.row("shop")["qr_code"]
    with env.db.connect() as conn:
        rows = conn.execute(
            "SELECT * FROM pgqr.record_results('slow-replica', %s::jsonb)",
            (json.dumps([{"instance_name": "shop", "source": "poll", "outcome": "qr",
                          "qr": "data:image/png;base64,LATE", "claimed_at": "2000-01-01T00:00:00Z"}]),),
        ).fetchall()
    assert rows == [{"instance_name": "shop", "applied": False, "qr_updated": False, "status": None}]
    assert env.row("shop")["qr_code"] == fresh_qr
    assert [log["applied"] for log in env.log("shop")] == [True, False]


async def test_two_replicas_never_call_evolution_for_the_same_instance_at_once(env: Env) -> None:
    env.sim.config.latency = 0.2
    env.set("claim_batch", "5")  # small batches, so both replicas keep claiming while the other works
    names = [f"shop-{i:02d}" for i in range(20)]
    for name in names:
        env.add(name, triggers=False)
    a, b = await asyncio.gather(env.reconcile(owner="replica-a"), env.reconcile(owner="replica-b"))
    handled = sorted(r.instance_name for r in a.results + b.results)
    assert handled == names  # each instance exactly once between the two
    assert a.results and b.results  # and both replicas did work
    for name in names:
        stats = env.sim.stats(name)
        assert (stats.connect_calls, stats.max_concurrent_connects) == (1, 1)


async def test_refresh_once_json_reports_every_instance_and_exits_1_on_failure(env: Env) -> None:
    token = env.add("good")
    env.add("ghost", sim_state=None)
    result = await asyncio.to_thread(
        run_pgqr, "refresh", "--once", "--json",
        env={"DATABASE_URL": env.db.dsn, "EVOLUTION_API_URL": env.sim.base_url,
             "EVOLUTION_API_KEY": env.sim.config.api_key},
    )
    assert result.returncode == 1, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["success"], doc["total_instances"], doc["refreshed"], doc["failed"]) == (False, 2, 1, 1)
    by_name = {r["instance_name"]: r for r in doc["results"]}
    assert by_name["good"]["success"] and by_name["good"]["qr_updated"]
    assert not by_name["ghost"]["success"] and by_name["ghost"]["error_class"] == "not_found"
    for secret in (token, env.sim.config.api_key):
        assert secret not in result.stdout + result.stderr


async def test_refresh_once_exits_0_when_all_succeed(env: Env) -> None:
    env.add("good")
    result = await asyncio.to_thread(
        run_pgqr, "refresh", "--once", env={"DATABASE_URL": env.db.dsn, "EVOLUTION_API_URL": env.sim.base_url})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "1 instances, 1 refreshed, 0 failed"


def test_refresh_without_once_or_with_bad_settings_is_a_usage_error(migrated: Database) -> None:
    assert run_pgqr("refresh", env={"DATABASE_URL": "postgresql://x@127.0.0.1:1/x"}).returncode == 2
    bad = run_pgqr("refresh", "--once", env={"DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
                                               "PGQR_CONCURRENCY": "lots"})
    assert bad.returncode == 2 and bad.stderr.strip() == "pgqr: PGQR_CONCURRENCY must be a number, got 'lots'"
    url = run_pgqr("refresh", "--once", env={"DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
                                               "EVOLUTION_API_URL": "localhost:8080"})
    assert url.returncode == 2 and "EVOLUTION_API_URL must be an http(s) URL" in url.stderr


def test_refresh_without_any_evolution_url_for_an_instance_is_a_configuration_error(migrated: Database) -> None:
    migrated.query("INSERT INTO public.evolution_instances (instance_name, instance_token) VALUES ('a', 't')")
    result = run_pgqr("refresh", "--once", env={"DATABASE_URL": migrated.dsn})
    assert result.returncode == 2
    assert result.stderr == ("pgqr: EVOLUTION_API_URL is not set and 1 instance(s) have no evolution_url of "
                             "their own\n")
    assert migrated.value("SELECT count(*) FROM pgqr.refresh_log") == 0


async def test_a_row_the_app_keeps_locked_costs_that_instance_one_write_not_the_batch(env: Env) -> None:
    env.add("busy")
    env.add("free")
    with env.db.connect() as app:
        app.execute("BEGIN")
        app.execute("SELECT 1 FROM public.evolution_instances WHERE instance_name = 'busy' FOR UPDATE")
        summary = await env.reconcile()  # returns after the 5 s lock_timeout, not when the app commits
        app.execute("ROLLBACK")
    assert {r.instance_name for r in summary.results} == {"busy", "free"}
    assert env.row("free")["qr_code"] is not None
    busy = env.row("busy")
    assert busy["qr_code"] is None and busy["lease_owner"] == "test-owner"  # retried once the lease runs out
    assert [(log["applied"], log["qr_updated"]) for log in env.log("busy")] == [(False, False)]
