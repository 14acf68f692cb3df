"""One reconcile against the simulator: each Evolution reply class lands in the rows as it should."""

from __future__ import annotations

import asyncio
import json

from conftest import Database, run_pgqr
from service_fixtures import Env, notifications

from pgqr.engine import Summary
from pgqr.evolution import ERROR_CLASSES
from pgqr.settings import Secret


def backoff_seconds(row: dict[str, object]) -> float:
    """How long after its last attempt the instance is due again."""
    return (row["due_at"] - row["last_attempt_at"]).total_seconds()  # type: ignore[operator, no-any-return]


async def test_a_new_qr_is_stored_logged_and_announced_without_the_image_or_token(env: Env) -> None:
    token = env.add("shop")
    async with notifications(env.db.dsn, "pgqr_qr_updated") as collect:
        summary = await env.reconcile()
        payloads = await collect()
    row = env.row("shop")
    assert str(row["qr_code"]).startswith("data:image/png;base64,")
    assert row["last_qr_update"] is not None
    assert row["last_outcome"] == "qr" and row["consecutive_failures"] == 0 and row["lease_owner"] is None
    assert [(r.instance_name, r.success, r.outcome) for r in summary.results] == [("shop", True, "qr_stored")]
    assert payloads == [{"key": str(row["id"]), "event": "qr", "expires_at": payloads[0]["expires_at"]}]
    [log] = env.log("shop")
    assert (log["source"], log["outcome"], log["written"], log["qr_updated"], log["http_status"]) == (
        "poll", "qr", True, True, 200)
    assert log["instance_key"] == str(row["id"]) and log["latency_ms"] > 0
    assert token not in json.dumps(payloads) and token not in str(log)


async def test_an_unchanged_qr_is_not_rewritten_or_announced(env: Env) -> None:
    env.add("shop")
    await env.reconcile()
    first = env.row("shop")
    env.make_due("shop")
    async with notifications(env.db.dsn, "pgqr_qr_updated") as collect:
        summary = await env.reconcile()
        assert await collect() == []
    second = env.row("shop")
    assert second["qr_code"] == first["qr_code"]
    assert second["last_qr_update"] == first["last_qr_update"]  # only a new QR moves it
    assert [(r.success, r.outcome) for r in summary.results] == [(True, "qr_unchanged")]
    # the log keeps news only; the counts have both polls
    assert [log["qr_updated"] for log in env.log("shop")] == [True]
    assert env.db.query("SELECT sum(results)::int AS polls, sum(qr_updates)::int AS new FROM pgqr.refresh_counts "
                        "WHERE source = 'poll'") == [{"polls": 2, "new": 1}]


async def test_a_rotated_qr_replaces_the_stored_one(env: Env) -> None:
    env.add("shop")
    await env.reconcile()
    first = env.row("shop")["qr_code"]
    env.sim.rotate("shop")
    env.make_due("shop")
    summary = await env.reconcile()
    assert [r.outcome for r in summary.results] == ["qr_stored"]
    assert env.row("shop")["qr_code"] != first
    assert env.row("shop")["qr_count"] == 2


async def test_count_zero_is_a_success_that_keeps_the_previous_qr(env: Env) -> None:
    env.sim.config.first_qr_delay = 5  # the socket gives no QR within the controller's sleep
    env.add("slow", qr_code="data:image/png;base64,OLD")
    summary = await env.reconcile()
    row = env.row("slow")
    assert [(r.success, r.outcome) for r in summary.results] == [(True, "no_qr")]
    assert row["qr_code"] == "data:image/png;base64,OLD"
    assert row["last_qr_update"] is None  # nothing was refreshed, so a stale-QR alert can still see it
    assert row["consecutive_failures"] == 0 and row["last_error_class"] is None
    # not a backoff: the QR is on its way, so it is asked again within seconds
    assert 0 < backoff_seconds(row) <= 3.5


async def test_open_marks_the_instance_connected_and_clears_the_qr(env: Env) -> None:
    env.add("linked", sim_state="open", qr_code="data:image/png;base64,OLD")
    env.db.query("UPDATE public.evolution_instances SET pairing_code = 'WZYEH1YY' WHERE instance_name = 'linked'")
    async with notifications(env.db.dsn, "pgqr_qr_updated") as collect:
        summary = await env.reconcile()
        payloads = await collect()
    row = env.row("linked")
    assert (row["instance_status"], row["qr_code"], row["pairing_code"]) == ("connected", None, None)
    assert [r.outcome for r in summary.results] == ["connected"]
    assert [p["event"] for p in payloads] == ["connected"]
    # a connected instance is no longer due
    env.make_due()
    assert (await env.reconcile()).results == []


async def _assert_failure_backs_off(env: Env, name: str, error_class: str, http_status: int) -> None:
    summary = await env.reconcile()
    [result] = summary.results
    assert (result.success, result.error_class, result.http_status) == (False, error_class, http_status)
    row = env.row(name)
    assert row["consecutive_failures"] == 1 and row["last_error_class"] == error_class
    info = ERROR_CLASSES[error_class]
    # a permanent class waits its whole (long) backoff; a transient one starts at [50%, 100%] of its base
    low = info.backoff_base if not info.transient else info.backoff_base / 2
    assert low - 0.5 < backoff_seconds(row) < info.backoff_base + 1
    assert (await env.reconcile()).results == []  # in backoff: not claimed


async def test_instance_missing_in_evolution_is_a_permanent_not_found(env: Env) -> None:
    env.add("ghost", sim_state=None)
    assert not ERROR_CLASSES["not_found"].transient
    await _assert_failure_backs_off(env, "ghost", "not_found", 404)


async def test_a_wrong_token_is_a_permanent_unauthorized(env: Env) -> None:
    env.add("shop")
    env.db.query("UPDATE public.evolution_instances SET instance_token = 'wrong' WHERE instance_name = 'shop'")
    assert not ERROR_CLASSES["unauthorized"].transient
    await _assert_failure_backs_off(env, "shop", "unauthorized", 401)


async def test_an_error_object_with_200_is_a_transient_not_loaded(env: Env) -> None:
    # {"error":true,"message":"[object Object]"}: not loaded in Evolution's memory yet, recovers in seconds
    env.add("unloaded", mode="not_in_memory")
    assert ERROR_CLASSES["not_loaded"].transient
    await _assert_failure_backs_off(env, "unloaded", "not_loaded", 200)


async def test_an_empty_200_body_is_a_permanent_empty_reply(env: Env) -> None:
    env.add("v1", mode="empty_reply")
    assert not ERROR_CLASSES["empty_reply"].transient
    await _assert_failure_backs_off(env, "v1", "empty_reply", 200)


async def test_server_errors_back_off_exponentially_with_jitter(env: Env) -> None:
    env.sim.config.error_rate = 1.0
    env.add("flaky")
    delays = []
    for attempt in range(1, 4):
        env.make_due("flaky")
        [result] = (await env.reconcile()).results
        assert (result.error_class, result.http_status) == ("server_error", 500)
        row = env.row("flaky")
        assert row["consecutive_failures"] == attempt
        delays.append(backoff_seconds(row))
    # the base doubling per failure, jittered within [50%, 100%]
    base = ERROR_CLASSES["server_error"].backoff_base
    for n, delay in enumerate(delays):
        assert base * 2**n / 2 <= delay <= base * 2**n + 0.5, (n, delays)
    env.sim.config.error_rate = 0.0
    env.make_due("flaky")
    await env.reconcile()
    assert env.row("flaky")["consecutive_failures"] == 0  # a success resets the count


async def test_a_hanging_server_is_a_transient_timeout(env: Env) -> None:
    env.sim.config.timeout_rate = 1.0
    env.sim.config.hang_seconds = 5
    env.add("hangs")
    [result] = (await env.reconcile(http_timeout=0.3)).results
    assert (result.success, result.error_class) == (False, "timeout")
    row = env.row("hangs")
    assert row["lease_owner"] is None
    assert 0 < backoff_seconds(row) <= ERROR_CLASSES["timeout"].backoff_base + 0.5


async def test_an_instance_without_token_uses_the_global_key_and_without_either_fails_as_config(env: Env) -> None:
    env.add("global-key", token="")
    env.db.query("UPDATE public.evolution_instances SET instance_token = NULL")
    summary = await env.reconcile(evolution_api_key=Secret(env.sim.config.api_key))
    assert {r.instance_name: r.outcome for r in summary.results} == {"global-key": "qr_stored"}
    env.add("nokey", sim_state="close")
    env.db.query("UPDATE public.evolution_instances SET instance_token = NULL WHERE instance_name = 'nokey'")
    [result] = (await env.reconcile()).results
    assert (result.success, result.error_class) == (False, "config")
    assert "EVOLUTION_API_KEY" in str(result.detail)


async def test_per_instance_evolution_url_wins_over_the_default(env: Env) -> None:
    env.add("elsewhere")
    env.db.query("UPDATE public.evolution_instances SET evolution_url = %s", (env.sim.base_url,))
    [result] = (await env.reconcile(evolution_api_url=Secret("http://127.0.0.1:9"))).results
    assert result.outcome == "qr_stored"


async def test_a_late_write_from_an_expired_lease_is_dropped(env: Env) -> None:
    env.add("shop")
    key = str(env.row("shop")["id"])
    with env.db.connect() as conn:
        [slow] = conn.execute("SELECT * FROM pgqr.claim('slow-replica', 10, interval '30 seconds')").fetchall()
        # later: the slow replica's lease has run out (and with it the due time the claim moved past it)
        conn.execute("UPDATE pgqr.schedule SET lease_expires_at = now() - interval '1 second', "
                     "due_at = now() - interval '1 second'")
    assert [r.instance_name for r in (await env.reconcile(owner="fresh-replica")).results] == ["shop"]
    fresh_qr = env.row("shop")["qr_code"]
    with env.db.connect() as conn:
        rows = conn.execute(
            "SELECT * FROM pgqr.record_results('slow-replica', %s::jsonb)",
            (json.dumps([{"key": key, "source": "poll", "outcome": "qr", "md5": "late",
                          "qr": "data:image/png;base64,LATE", "claim_id": slow["claim_id"]}]),),
        ).fetchall()
    assert rows == [{"key": key, "written": False, "claim_held": False, "busy": False, "qr_updated": False,
                     "outcome": "qr", "reason": "superseded"}]
    assert env.row("shop")["qr_code"] == fresh_qr
    assert [(log["written"], log["detail"]) for log in env.log("shop")] == [(True, None), (False, "superseded")]


async def test_two_replicas_never_call_evolution_for_the_same_instance_at_once(env: Env) -> None:
    env.sim.config.latency = 0.2
    names = [f"shop-{i:02d}" for i in range(20)]
    for name in names:
        env.add(name, triggers=False)
    # few slots each, so both replicas keep claiming while the other works
    a, b = await asyncio.gather(env.reconcile(owner="replica-a", concurrency=5),
                                env.reconcile(owner="replica-b", concurrency=5))
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
        env=env.command_env(EVOLUTION_API_KEY=env.sim.config.api_key),
    )
    assert result.returncode == 1, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["success"], doc["total_instances"], doc["refreshed"], doc["failed"]) == (False, 2, 1, 1)
    assert (doc["qr_stored"], doc["failed_by_class"]) == (1, {"not_found": 1})
    by_name = {r["instance_name"]: r for r in doc["results"]}
    assert by_name["good"]["outcome"] == "qr_stored" and by_name["good"]["key"] == str(env.row("good")["id"])
    assert (by_name["ghost"]["outcome"], by_name["ghost"]["error_class"]) == ("failed", "not_found")
    for secret in (token, env.sim.config.api_key):
        assert secret not in result.stdout + result.stderr


async def test_refresh_once_exits_0_when_all_succeed(env: Env) -> None:
    env.add("good")
    result = await asyncio.to_thread(run_pgqr, "refresh", "--once", env=env.command_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "1 instances: 1 new QR, 0 QR unchanged, 0 no QR yet, 0 connected, 0 failed")


def test_refresh_without_once_or_with_bad_settings_is_a_usage_error(migrated: Database) -> None:
    assert run_pgqr("refresh", env={"DATABASE_URL": "postgresql://x@127.0.0.1:1/x"}).returncode == 2
    bad = run_pgqr("refresh", "--once", env={"DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
                                               "PGQR_CONCURRENCY": "lots"})
    assert bad.returncode == 2 and bad.stderr.strip() == "pgqr: PGQR_CONCURRENCY must be a whole number, got 'lots'"
    url = run_pgqr("refresh", "--once", env={"DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
                                               "EVOLUTION_API_URL": "localhost:8080"})
    assert url.returncode == 2 and "EVOLUTION_API_URL must be an http(s) URL" in url.stderr


def test_refresh_without_any_evolution_url_for_an_instance_is_a_configuration_error(migrated: Database) -> None:
    migrated.query("INSERT INTO public.evolution_instances (instance_name, instance_token) VALUES ('a', 't')")
    result = run_pgqr("refresh", "--once", env={"DATABASE_URL": migrated.dsn})
    assert result.returncode == 2
    assert result.stderr == ("pgqr: EVOLUTION_API_URL is not set and 1 instance(s) have no Evolution URL of "
                             "their own\n")
    assert migrated.value("SELECT count(*) FROM pgqr.refresh_log") == 0


async def reconcile_while_the_app_locks(env: Env, name: str) -> Summary:
    """One reconcile while the app holds `name`'s row in an open transaction; it returns once that write is
    given up, not when the app commits."""
    with env.db.connect() as app:
        app.execute("BEGIN")
        app.execute("SELECT 1 FROM public.evolution_instances WHERE instance_name = %s FOR UPDATE", (name,))
        try:
            return await env.reconcile()
        finally:
            app.execute("ROLLBACK")


async def test_a_row_the_app_keeps_locked_costs_that_instance_one_write_not_the_batch(env: Env) -> None:
    env.add("busy")
    env.add("free")
    summary = await reconcile_while_the_app_locks(env, "busy")
    assert {r.instance_name: r.outcome for r in summary.results} == {"busy": "not_applied", "free": "qr_stored"}
    assert env.row("free")["qr_code"] is not None
    busy = env.row("busy")
    assert busy["qr_code"] is None and busy["lease_owner"] == "test-owner"  # retried once the lease runs out


async def test_a_poll_whose_write_the_app_kept_locked_is_still_logged_as_not_applied(env: Env) -> None:
    env.add("busy")
    await reconcile_while_the_app_locks(env, "busy")
    assert env.sim.stats("busy").connect_calls == 1  # Evolution was called
    assert [(log["written"], log["qr_updated"]) for log in env.log("busy")] == [(False, False)]


def test_nothing_waiting_means_no_due_time_and_a_waiting_instance_is_due_now(quiet: Database) -> None:
    """The engine sleeps until pgqr.next_due_in(): NULL (nothing to wait for) must not read as 0 (poll again)."""
    assert quiet.value("SELECT pgqr.next_due_in()") is None
    quiet.query("INSERT INTO public.evolution_instances (instance_name, instance_status) VALUES ('a', 'connected')")
    assert quiet.value("SELECT pgqr.next_due_in()") is None
    quiet.query("INSERT INTO public.evolution_instances (instance_name) VALUES ('b')")
    assert quiet.value("SELECT pgqr.next_due_in()") == 0
