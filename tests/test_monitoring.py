"""The monitoring views, the pgqr_monitor role, the alert rules and housekeeping, on real databases."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from conftest import Database, mark_qr
from psycopg import errors

from pgqr import devdb, migrations

VIEWS = ("instance_health", "freshness", "cron_runs", "refresh_stats", "listeners")
CLAIM = "SELECT * FROM pgqr.claim(%s, 10, interval '30 seconds')"


def installed_long_ago(db: Database) -> None:
    """Move pgqr's installation an hour back: the first-evaluation grace is over."""
    db.query("UPDATE pgqr.migrations SET applied_at = now() - interval '1 hour'")


def add_instance(db: Database, name: str, *, status: str = "connecting", waiting: str = "0 seconds",
                 qr_ago: str | None = None, token: str | None = "tok-" + "x" * 8) -> None:
    """An instance as the app adds it; `waiting`: how long ago pgqr saw it (re)turn connecting; `qr_ago`: how
    long ago its last QR stopped working (none when None)."""
    db.query(
        """INSERT INTO public.evolution_instances (instance_name, instance_status, instance_token,
                                                  last_qr_update, qr_code)
           VALUES (%s, %s, %s, now() - %s::interval,
                   CASE WHEN %s::text IS NULL THEN NULL ELSE 'data:image/png;base64,AAAA' END)""",
        (name, status, token, qr_ago, qr_ago),
    )
    db.query("UPDATE pgqr.instance_state SET connecting_since = now() - %s::interval WHERE name = %s",
             (waiting, name))
    if qr_ago is not None:
        mark_qr(db, name, f"-{qr_ago}")


MARKER = "pgqr_test_marker"


class Alerts:
    """check_alerts() on a connection that also LISTENs on pgqr_alert and keeps WARNINGs."""

    def __init__(self, db: Database) -> None:
        self.conn = psycopg.connect(db.dsn, autocommit=True)
        self.conn.execute("LISTEN pgqr_alert")
        self.conn.execute(f"LISTEN {MARKER}")
        self.warnings: list[str] = []
        self.conn.add_notice_handler(
            lambda d: self.warnings.append(d.message_primary or "") if d.severity_nonlocalized == "WARNING"
            else None
        )

    def check(self) -> dict[str, dict[str, Any]]:
        rows = self.conn.execute("SELECT rule, state, count, detail, changed FROM pgqr.check_alerts()")
        return {r[0]: {"state": r[1], "count": r[2], "detail": r[3], "changed": r[4]} for r in rows}

    def notified(self) -> list[dict[str, Any]]:
        """The pgqr_alert payloads committed before the call and not read yet: a marker NOTIFY sent now arrives
        after all of them (a session gets notifications in commit order), so no fixed wait decides "none"."""
        token = secrets.token_hex(8)
        self.conn.execute("SELECT pg_notify(%s, %s)", (MARKER, token))
        payloads: list[dict[str, Any]] = []
        for n in self.conn.notifies(timeout=30):
            if n.channel == MARKER and n.payload == token:
                return payloads
            if n.channel == "pgqr_alert":
                payloads.append(json.loads(n.payload))
        raise AssertionError("our own marker notification did not come back within 30s")

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def alerts(quiet: Database) -> Iterator[Alerts]:
    a = Alerts(quiet)
    yield a
    a.close()


# ------------------------------------------------------------------------------------------------- views


def test_instance_health_shows_each_instances_bookkeeping_from_claim_and_record_results(quiet: Database) -> None:
    add_instance(quiet, "alpha")
    add_instance(quiet, "beta")
    add_instance(quiet, "gamma", status="connected", qr_ago="1 day")
    claimed = {c["name"]: c for c in quiet.query(CLAIM, ("L1",))}
    assert sorted(claimed) == ["alpha", "beta"]
    results = [
        {"key": claimed["alpha"]["key"], "source": "poll", "outcome": "qr", "md5": "QQ",
         # 2 s: a connect slow enough to have gone through Evolution's close branch made this QR during the call
         "qr": "data:image/png;base64,QQ==", "qr_count": 1, "http_status": 200, "latency_ms": 2000,
         "claim_id": claimed["alpha"]["claim_id"]},
        {"key": claimed["beta"]["key"], "source": "poll", "outcome": "failed", "http_status": 401,
         "latency_ms": 12, "error_class": "unauthorized",
         "claim_id": claimed["beta"]["claim_id"]},
    ]
    quiet.query("SELECT * FROM pgqr.record_results('L1', %s::jsonb)", (json.dumps(results),))
    # nothing due: alpha's QR is new, beta is in backoff
    assert quiet.query(CLAIM, ("L2",)) == []

    rows = {r["instance_name"]: r for r in quiet.query("SELECT * FROM pgqr.instance_health")}
    assert set(rows) == {"alpha", "beta", "gamma"}
    alpha, beta, gamma = rows["alpha"], rows["beta"], rows["gamma"]
    assert (alpha["status"], alpha["has_qr"], alpha["last_outcome"], alpha["consecutive_failures"]) == (
        "connecting", True, "qr", 0)
    assert alpha["qr_age"].total_seconds() < 60 and alpha["lease_owner"] is None
    assert alpha["instance_key"] == claimed["alpha"]["key"]
    assert alpha["qr_valid"] is True
    assert alpha["qr_expires_at"] == claimed["alpha"]["claimed_at"] + timedelta(seconds=45)
    assert alpha["next_attempt_at"] > alpha["qr_expires_at"]  # the next poll is due just after the expiry
    assert (beta["last_outcome"], beta["last_error_class"], beta["last_http_status"]) == ("failed", "unauthorized",
                                                                                          401)
    assert beta["consecutive_failures"] == 1 and beta["next_attempt_at"] is not None
    assert beta["has_qr"] is False and beta["qr_age"] is None and beta["qr_valid"] is False
    assert gamma["status"] == "connected" and gamma["qr_age"].total_seconds() >= 86400


def test_instance_health_shows_the_lease_owner_while_claimed(quiet: Database) -> None:
    add_instance(quiet, "alpha")
    quiet.query(CLAIM, ("host:1:abc",))
    row = quiet.query("SELECT lease_owner, lease_expires_at, last_attempt_at FROM pgqr.instance_health")[0]
    assert row["lease_owner"] == "host:1:abc"
    assert row["lease_expires_at"] > row["last_attempt_at"]


def test_no_view_has_a_token_key_or_secret_column(quiet: Database) -> None:
    columns = quiet.query(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'pgqr' "
        "AND table_name = ANY(%s)", (list(VIEWS),))
    assert {c["table_name"] for c in columns} == set(VIEWS)
    leaky = [c for c in columns if any(w in c["column_name"] for w in ("token", "key", "secret", "qr_code",
                                                                           "pairing", "url"))]
    # the one "key" is the app row's primary key, the instance's identity (never a credential)
    assert leaky == [{"table_name": "instance_health", "column_name": "instance_key"}]


def test_cron_runs_lists_pgqr_jobs_with_ticks_standing_in_when_pg_cron_is_elsewhere(quiet: Database) -> None:
    first = quiet.value("SELECT pgqr.tick()")
    second = quiet.value("SELECT pgqr.tick()")
    rows = quiet.query("SELECT * FROM pgqr.cron_runs")
    ticks = [r for r in rows if r["jobname"] == "pgqr-tick"]
    assert [r["runid"] for r in ticks] == [second, first]  # newest first
    assert {(r["status"], r["source"]) for r in ticks} == {("succeeded", "pgqr.ticks")}
    others = {r["jobname"]: r for r in rows if r["jobname"] != "pgqr-tick"}
    assert set(others) == {"pgqr-alerts", "pgqr-housekeeping", "pgqr-cron-history"}
    assert others["pgqr-alerts"]["schedule"] == "*/5 * * * *" and others["pgqr-alerts"]["runid"] is None
    assert "cron.job_run_details in pg_cron's database" in others["pgqr-alerts"]["message"]


@pytest.fixture(scope="module")
def cron_here() -> Iterator[str]:
    """pgqr installed in the database pg_cron lives in, on a server of its own."""
    with devdb.running(cron_database="postgres") as server:
        dsn = server.dsn("postgres")
        migrations.migrate(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE cron.job SET active = false")  # keep real runs out of the assertions
        yield dsn


def test_cron_runs_reads_job_run_details_where_pg_cron_lives_in_this_database(cron_here: str) -> None:
    with psycopg.connect(cron_here, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO cron.job_run_details (jobid, runid, job_pid, database, username, command, status,
                                                 return_message, start_time, end_time)
               SELECT jobid, nextval('cron.runid_seq'), 1, database, username, command, s, m,
                      now() - interval '2 minutes', now() - interval '2 minutes' + interval '150 ms'
               FROM cron.job, (VALUES ('succeeded', 'SELECT 1'), ('failed', 'ERROR: boom')) v(s, m)
               WHERE jobname = 'pgqr-tick'""")
        conn.execute("SET ROLE pgqr_monitor")
        rows = conn.execute(
            "SELECT jobname, status, message, duration, source FROM pgqr.cron_runs WHERE jobname = 'pgqr-tick'"
        ).fetchall()
        jobs = {r[0] for r in conn.execute("SELECT jobname FROM pgqr.cron_runs")}
    assert sorted((r[1], r[2]) for r in rows) == [("failed", "ERROR: boom"), ("succeeded", "SELECT 1")]
    assert all(r[3].total_seconds() == pytest.approx(0.15) and r[4] == "cron.job_run_details" for r in rows)
    assert jobs == {"pgqr-tick", "pgqr-alerts", "pgqr-housekeeping", "pgqr-cron-history"}


def test_pause_in_sql_reaches_pg_cron_where_it_lives_in_this_database(cron_here: str) -> None:
    with psycopg.connect(cron_here, autocommit=True) as conn:
        conn.execute("SELECT pgqr.resume()")
        active = conn.execute("SELECT bool_and(active) FROM cron.job WHERE jobname LIKE 'pgqr-%'").fetchone()
        conn.execute("SELECT pgqr.pause()")
        paused = conn.execute("SELECT bool_or(active) FROM cron.job WHERE jobname LIKE 'pgqr-%'").fetchone()
    assert active == (True,) and paused == (False,)


def test_refresh_stats_counts_every_refresh_per_hour(quiet: Database) -> None:
    # one transaction: now() is the same for the inserts and the view, so no hour boundary can fall between.
    # The counts as pgqr.record_results() keeps them (latency histograms built by the same aggregate); the log
    # holds news, from which the hour's instances are counted.
    with psycopg.connect(quiet.dsn) as conn:
        conn.execute(
            """INSERT INTO pgqr.refresh_counts (minute, source, outcome, error_class, results, written, qr_updates,
                                                latency)
               SELECT v.minute, v.source, v.outcome, coalesce(v.error_class, ''), count(*), count(*),
                      count(*) FILTER (WHERE v.qr_updated), pgqr.histogram(v.latency_ms::real)
               FROM (VALUES
                      (date_trunc('hour', now()), 'poll'::pgqr.source, 'qr'::pgqr.outcome, true, 100, NULL),
                      (date_trunc('hour', now()), 'poll', 'qr', false, 300, NULL),
                      (date_trunc('hour', now()), 'poll', 'failed', false, 8000, 'timeout'),
                      (date_trunc('hour', now()), 'webhook', 'qr', true, NULL, NULL),
                      (date_trunc('hour', now()) - interval '2 hours', 'poll', 'failed', false, 5, 'unauthorized'),
                      (date_trunc('hour', now()) - interval '2 hours', 'poll', 'failed', false, 5, 'unauthorized'),
                      (date_trunc('minute', now() - interval '30 hours'), 'poll', 'failed', false, 5,
                       'server_error')
               ) v(minute, source, outcome, qr_updated, latency_ms, error_class)
               GROUP BY 1, 2, 3, 4""")
        conn.execute(
            """INSERT INTO pgqr.refresh_log (at, instance_key, source, outcome, written, qr_updated, error_class,
                                             instance_name)
               SELECT v.*, 'shop-' || v.key FROM (VALUES
                      (date_trunc('hour', now()), 'a', 'poll'::pgqr.source, 'qr'::pgqr.outcome, true, true, NULL),
                      (date_trunc('hour', now()), 'b', 'poll', 'failed', true, false, 'timeout'),
                      (date_trunc('hour', now()) - interval '2 hours', 'c', 'poll', 'failed', true, false,
                       'unauthorized')
               ) v(at, key, source, outcome, written, qr_updated, error_class)""")
        rows = conn.execute(
            """SELECT hour = date_trunc('hour', now()), hour = date_trunc('hour', now()) - interval '2 hours',
                      calls, webhook_events, successes, failures, failures_by_class, qr_updates, instances,
                      p50_latency_ms, p95_latency_ms
               FROM pgqr.refresh_stats""").fetchall()
    assert len(rows) == 24
    current = next(r for r in rows if r[0])
    earlier = next(r for r in rows if r[1])
    assert current[2:9] == (3, 1, 3, 1, {"timeout": 1}, 2, 2)
    # estimates from the buckets: the median of 100, 300 and 8000 ms falls in (250, 500], the 95th in (5 s, 10 s]
    assert 250 < current[9] <= 500 and 5000 < current[10] <= 10000
    assert earlier[2:9] == (2, 0, 0, 2, {"unauthorized": 2}, 0, 1)
    assert sum(r[2] + r[3] for r in rows) == 6  # the 30-hour-old row is out of the window


def test_listeners_shows_live_and_silent_listeners_but_not_stopped_ones(quiet: Database) -> None:
    for owner in ("live:1:a", "silent:2:b", "stopped:3:c"):
        host, pid, _ = owner.split(":")
        quiet.query("SELECT pgqr.heartbeat(%s, %s, %s, '0.1.0')", (owner, host, int(pid)))
    quiet.query("UPDATE pgqr.listener_heartbeats SET heartbeat_at = now() - interval '10 minutes' "
                "WHERE owner = 'silent:2:b'")
    quiet.query("SELECT pgqr.listener_stopped('stopped:3:c')")
    add_instance(quiet, "alpha")
    quiet.query(CLAIM, ("live:1:a",))
    rows = {r["owner"]: r for r in quiet.query("SELECT * FROM pgqr.listeners")}
    assert set(rows) == {"live:1:a", "silent:2:b"}
    assert (rows["live:1:a"]["live"], rows["live:1:a"]["leases_held"], rows["live:1:a"]["host"]) == (True, 1, "live")
    assert rows["silent:2:b"]["live"] is False and rows["silent:2:b"]["heartbeat_age"].total_seconds() >= 600
    assert rows["live:1:a"]["version"] == "0.1.0"


def test_pgqr_monitor_reads_every_view_and_is_denied_the_token_column(quiet: Database) -> None:
    add_instance(quiet, "alpha")
    quiet.query("SELECT pgqr.heartbeat('l:1:a', 'l', 1, '0.1.0')")
    with quiet.connect() as conn:
        conn.execute("SET ROLE pgqr_monitor")
        counts = {v: len(conn.execute(f"SELECT * FROM pgqr.{v}").fetchall()) for v in VIEWS}
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT instance_token FROM public.evolution_instances")
        for table in ("pgqr.instance_state", "pgqr.refresh_log", "pgqr.alerts", "pgqr.settings"):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(f"SELECT 1 FROM {table}")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM pgqr.check_alerts()")
    assert counts["instance_health"] == 1 and counts["listeners"] == 1 and counts["refresh_stats"] == 24
    assert counts["freshness"] == 1
    assert counts["cron_runs"] == 4


# ------------------------------------------------------------------------------------------------ alerts


def test_stale_instances_are_connecting_ones_without_a_qr_within_the_threshold(quiet: Database) -> None:
    add_instance(quiet, "never-got-one", waiting="10 minutes")
    add_instance(quiet, "old-qr", waiting="1 day", qr_ago="6 minutes")
    add_instance(quiet, "fresh-qr", waiting="1 day", qr_ago="1 minute")
    add_instance(quiet, "just-created", waiting="1 minute")
    add_instance(quiet, "connected", status="connected", waiting="1 day", qr_ago="1 day")
    stale = [r["instance_name"] for r in quiet.query("SELECT * FROM pgqr.stale_instances()")]
    assert stale == ["never-got-one", "old-qr"]  # longest waiting first
    tight = {r["instance_name"] for r in quiet.query("SELECT * FROM pgqr.stale_instances('30 seconds')")}
    assert tight == {"never-got-one", "old-qr", "fresh-qr", "just-created"}


def test_an_instance_switched_back_to_connecting_waits_from_that_moment_not_its_old_qr(quiet: Database) -> None:
    add_instance(quiet, "again", status="connected", waiting="2 days", qr_ago="1 day")
    quiet.query("UPDATE public.evolution_instances SET instance_status = 'connecting'")
    assert quiet.query("SELECT * FROM pgqr.stale_instances()") == []
    quiet.query("UPDATE pgqr.instance_state SET connecting_since = now() - interval '6 minutes'")
    assert [r["instance_name"] for r in quiet.query("SELECT * FROM pgqr.stale_instances()")] == ["again"]


def test_stale_instances_works_on_an_adopted_table_without_created_at_or_uuid_ids(db: Database) -> None:
    db.query("""CREATE TABLE public.evolution_instances (
                    id bigserial PRIMARY KEY, instance_name text NOT NULL UNIQUE, instance_token text,
                    instance_status text, qr_code text, last_qr_update timestamptz)""")
    db.query("INSERT INTO public.evolution_instances (instance_name, instance_status) VALUES ('old', 'connecting')")
    migrations.migrate(db.dsn)
    db.query("UPDATE pgqr.instance_state SET connecting_since = now() - interval '1 hour'")
    rows = db.query("SELECT instance_key, instance_name FROM pgqr.stale_instances()")
    assert rows == [{"instance_key": "1", "instance_name": "old"}]
    assert db.value("SELECT count(*) FROM pgqr.instance_health") == 1


def test_stale_qr_fires_once_then_resolves(quiet: Database, alerts: Alerts) -> None:
    add_instance(quiet, "alpha", waiting="10 minutes")
    fired = alerts.check()["stale_qr"]
    assert (fired["state"], fired["count"], fired["changed"]) == ("firing", 1, True)
    payloads = alerts.notified()
    assert payloads == [{"rule": "stale_qr", "state": "firing", "count": 1, "detail": fired["detail"],
                         "database": quiet.name, "at": payloads[0]["at"]}]
    assert "alpha" in fired["detail"] and "5 minutes" in fired["detail"]
    assert any("pgqr alert stale_qr firing" in w for w in alerts.warnings)

    mark_qr(quiet, "alpha", "45 seconds")  # a new QR
    resolved = alerts.check()["stale_qr"]
    assert (resolved["state"], resolved["changed"]) == ("resolved", True)
    assert [(p["rule"], p["state"], p["count"]) for p in alerts.notified()] == [("stale_qr", "resolved", 0)]
    row = quiet.query("SELECT state, resolved_at IS NOT NULL AS closed, count FROM pgqr.alerts")
    assert row == [{"state": "resolved", "closed": True, "count": 1}]


def test_a_second_check_with_nothing_changed_notifies_nothing(quiet: Database, alerts: Alerts) -> None:
    add_instance(quiet, "alpha", waiting="10 minutes")
    alerts.check()
    assert len(alerts.notified()) == 1
    warnings_after_first = len(alerts.warnings)
    again = alerts.check()
    assert alerts.notified() == []
    assert len(alerts.warnings) == warnings_after_first
    assert again["stale_qr"]["state"] == "firing" and not any(r["changed"] for r in again.values())
    assert quiet.value("SELECT count(*) FROM pgqr.alerts") == 1


def test_a_changed_count_while_firing_updates_the_alert_without_notifying(quiet: Database, alerts: Alerts) -> None:
    add_instance(quiet, "alpha", waiting="10 minutes")
    alerts.check()
    alerts.notified()
    add_instance(quiet, "beta", waiting="10 minutes")
    assert alerts.check()["stale_qr"]["count"] == 2
    assert alerts.notified() == []
    assert quiet.value("SELECT count FROM pgqr.alerts WHERE state = 'firing'") == 2


def test_no_listener_fires_when_the_only_listener_goes_silent_and_resolves_on_a_heartbeat(
    quiet: Database, alerts: Alerts
) -> None:
    quiet.query("SELECT pgqr.heartbeat('l:1:a', 'l', 1, '0.1.0')")
    assert alerts.check()["no_listener"]["state"] == "ok"
    quiet.query("UPDATE pgqr.listener_heartbeats SET heartbeat_at = now() - interval '3 minutes'")
    fired = alerts.check()["no_listener"]
    assert (fired["state"], fired["count"], fired["changed"]) == ("firing", 1, True)
    assert "last heartbeat 3 minutes ago" in fired["detail"]
    quiet.query("SELECT pgqr.heartbeat('l:1:a', 'l', 1, '0.1.0')")
    assert alerts.check()["no_listener"]["state"] == "resolved"
    assert [(p["rule"], p["state"]) for p in alerts.notified()] == [("no_listener", "firing"),
                                                                    ("no_listener", "resolved")]


def test_a_listener_that_stopped_cleanly_a_moment_ago_does_not_fire(quiet: Database, alerts: Alerts) -> None:
    installed_long_ago(quiet)
    quiet.query("SELECT pgqr.heartbeat('l:1:a', 'l', 1, '0.1.0')")
    quiet.query("SELECT pgqr.listener_stopped('l:1:a')")  # a rolling restart
    assert alerts.check()["no_listener"]["state"] == "ok"
    quiet.query("UPDATE pgqr.listener_heartbeats SET heartbeat_at = now() - interval '10 minutes', "
                "stopped_at = now() - interval '10 minutes'")
    assert alerts.check()["no_listener"]["state"] == "firing"


def test_first_evaluation_gives_a_fresh_install_grace_then_fires_for_a_listener_never_started(
    quiet: Database, alerts: Alerts
) -> None:
    fresh = alerts.check()
    assert {r: v["state"] for r, v in fresh.items()} == {
        "stale_qr": "ok", "no_listener": "ok", "ticks_not_firing": "ok", "evolution_failures": "ok",
        "connections_dropped": "ok", "evolution_server_missing": "ok"}
    assert alerts.notified() == []
    installed_long_ago(quiet)
    later = alerts.check()
    assert later["no_listener"]["state"] == "firing"
    assert "no listener has ever connected" in later["no_listener"]["detail"]
    assert later["ticks_not_firing"]["state"] == "firing"
    assert "no tick yet" in later["ticks_not_firing"]["detail"]


def test_ticks_not_firing_fires_after_three_minutes_and_resolves_on_a_tick(quiet: Database, alerts: Alerts) -> None:
    installed_long_ago(quiet)
    quiet.query("INSERT INTO pgqr.ticks (at) VALUES (now() - interval '2 minutes')")
    assert alerts.check()["ticks_not_firing"]["state"] == "ok"
    quiet.query("UPDATE pgqr.ticks SET at = now() - interval '4 minutes'")
    fired = alerts.check()["ticks_not_firing"]
    assert (fired["state"], fired["count"]) == ("firing", 4)
    quiet.query("SELECT pgqr.tick()")
    assert alerts.check()["ticks_not_firing"]["state"] == "resolved"
    assert [(p["rule"], p["state"]) for p in alerts.notified()] == [
        ("no_listener", "firing"), ("ticks_not_firing", "firing"), ("ticks_not_firing", "resolved")]


def test_ticks_not_firing_stays_quiet_while_paused_and_scales_with_the_tick_period(
    quiet: Database, alerts: Alerts
) -> None:
    installed_long_ago(quiet)
    quiet.query("INSERT INTO pgqr.ticks (at) VALUES (now() - interval '12 minutes')")
    quiet.query("UPDATE pgqr.jobs SET active = false WHERE name = 'pgqr-tick'")
    assert alerts.check()["ticks_not_firing"]["state"] == "ok"
    quiet.query("UPDATE pgqr.jobs SET active = true WHERE name = 'pgqr-tick'")
    quiet.query("UPDATE pgqr.settings SET value = '5 minutes' WHERE key = 'tick_every'")
    assert alerts.check()["ticks_not_firing"]["state"] == "ok"  # three periods are 15 minutes
    quiet.query("UPDATE pgqr.settings SET value = '1 minute' WHERE key = 'tick_every'")
    assert alerts.check()["ticks_not_firing"]["state"] == "firing"


def _log_calls(db: Database, outcome: str, n: int, error_class: str | None = None, ago: str = "0 seconds") -> None:
    """`n` polls counted as pgqr.record_results() counts them, `ago` before now."""
    db.query(
        """INSERT INTO pgqr.refresh_counts AS c (minute, source, outcome, error_class, results, written,
                                                 qr_updates, latency)
           VALUES (date_trunc('minute', now() - %s::interval), 'poll', %s, coalesce(%s, ''), %s, %s, 0,
                   '{0,0,0,0,0,0,0,0,0,0,0}')
           ON CONFLICT (minute, source, outcome, error_class) DO UPDATE SET results = c.results + excluded.results""",
        (ago, outcome, error_class, n, n))


def test_evolution_failures_fire_above_the_rate_and_resolve_below_it(quiet: Database, alerts: Alerts) -> None:
    _log_calls(quiet, "failed", 4, "timeout")
    _log_calls(quiet, "failed", 2, "unauthorized")
    _log_calls(quiet, "qr", 2)
    fired = alerts.check()["evolution_failures"]
    assert (fired["state"], fired["count"]) == ("firing", 6)
    assert fired["detail"].startswith("6 of 8 Evolution calls failed in the last 15 minutes (75%")
    assert "timeout 4, unauthorized 2" in fired["detail"]
    _log_calls(quiet, "no_qr", 10)
    assert alerts.check()["evolution_failures"]["state"] == "resolved"
    assert [(p["rule"], p["state"]) for p in alerts.notified()] == [("evolution_failures", "firing"),
                                                                    ("evolution_failures", "resolved")]


def test_evolution_failures_ignore_a_handful_of_calls_and_old_ones(quiet: Database, alerts: Alerts) -> None:
    _log_calls(quiet, "failed", 4, "timeout")  # 4 of 4, under alert_failure_min_calls (5)
    _log_calls(quiet, "failed", 50, ago="1 hour")
    assert alerts.check()["evolution_failures"]["state"] == "ok"


def test_thresholds_are_settings_changeable_with_update(quiet: Database, alerts: Alerts) -> None:
    add_instance(quiet, "alpha", waiting="10 minutes")
    quiet.query("UPDATE pgqr.settings SET value = '1 hour' WHERE key = 'alert_stale_after'")
    _log_calls(quiet, "failed", 3)
    _log_calls(quiet, "qr", 7)
    quiet.query("UPDATE pgqr.settings SET value = '0.2' WHERE key = 'alert_failure_rate'")
    result = alerts.check()
    assert result["stale_qr"]["state"] == "ok"
    assert result["evolution_failures"]["state"] == "firing"


def test_a_setting_is_validated_when_written_with_a_clear_message(quiet: Database) -> None:
    with pytest.raises(errors.InvalidParameterValue) as not_a_number:
        quiet.query("UPDATE pgqr.settings SET value = 'abc' WHERE key = 'lease_seconds'")
    assert not_a_number.value.diag.message_primary == "pgqr setting lease_seconds must be a number, not 'abc'"
    with pytest.raises(errors.InvalidParameterValue) as too_small:
        quiet.query("UPDATE pgqr.settings SET value = '1' WHERE key = 'lease_seconds'")
    assert too_small.value.diag.message_primary == "pgqr setting lease_seconds must be at least 5, not '1'"
    with pytest.raises(errors.InvalidParameterValue, match="must be an interval like '5 minutes', not 'soon'"):
        quiet.query("UPDATE pgqr.settings SET value = 'soon' WHERE key = 'alert_stale_after'")
    assert quiet.value("SELECT value FROM pgqr.settings WHERE key = 'lease_seconds'") == "30"
    # positive control: values that fit are written
    quiet.query("UPDATE pgqr.settings SET value = '45' WHERE key = 'lease_seconds'")
    quiet.query("UPDATE pgqr.settings SET value = '2 hours' WHERE key = 'alert_stale_after'")
    assert quiet.value("SELECT value FROM pgqr.settings WHERE key = 'lease_seconds'") == "45"
    assert quiet.value("SELECT pgqr.seconds('lease_seconds')") == timedelta(seconds=45)


# ------------------------------------------------------------------------------------------ housekeeping


def test_housekeeping_prunes_history_older_than_the_retention(quiet: Database) -> None:
    quiet.query("""INSERT INTO pgqr.refresh_log (at, instance_key, instance_name, source, outcome, written,
                                                 qr_updated)
                   VALUES (now() - interval '8 days', 'a', 'a', 'poll', 'qr', true, true),
                          (now() - interval '6 days', 'a', 'a', 'poll', 'qr', true, true)""")
    quiet.query("INSERT INTO pgqr.ticks (at) VALUES (now() - interval '8 days'), (now() - interval '1 hour')")
    _log_calls(quiet, "qr", 1, ago="8 days")
    _log_calls(quiet, "qr", 1, ago="6 days")
    quiet.query("""INSERT INTO pgqr.alerts (rule, state, count, detail, fired_at, resolved_at) VALUES
                   ('stale_qr', 'resolved', 1, 'old', now() - interval '9 days', now() - interval '8 days'),
                   ('stale_qr', 'resolved', 1, 'recent', now() - interval '2 days', now() - interval '1 day'),
                   ('no_listener', 'firing', 0, 'long-running', now() - interval '30 days', NULL)""")
    quiet.query("""INSERT INTO pgqr.listener_heartbeats (owner, host, pid, version, heartbeat_at, stopped_at)
                   VALUES ('gone', 'h', 1, 'v', now() - interval '8 days', now() - interval '8 days')""")
    quiet.query("INSERT INTO pgqr.trigger_errors (at, message) VALUES (now() - interval '8 days', 'old'), "
                "(now() - interval '2 days', 'recent')")
    deleted = {r["what"]: r["deleted"] for r in quiet.query("SELECT * FROM pgqr.housekeeping()")}
    assert deleted == {"refresh_log": 1, "refresh_counts": 1, "ticks": 1, "alerts": 1, "listener_heartbeats": 1,
                       "trigger_errors": 1}
    assert quiet.value("SELECT count(*) FROM pgqr.refresh_log") == 1
    assert [r["detail"] for r in quiet.query("SELECT detail FROM pgqr.alerts ORDER BY id")] == [
        "recent", "long-running"]
    quiet.query("UPDATE pgqr.settings SET value = '1 day' WHERE key = 'retention'")
    again = {r["what"]: r["deleted"] for r in quiet.query("SELECT * FROM pgqr.housekeeping()")}
    assert again == {"refresh_log": 1, "refresh_counts": 1, "ticks": 0, "alerts": 1,
                     "listener_heartbeats": 0, "trigger_errors": 1}
    assert quiet.value("SELECT string_agg(detail, ',') FROM pgqr.alerts") == "long-running"  # firing stays


def test_alert_and_housekeeping_jobs_are_scheduled_in_pg_cron(migrated: Database) -> None:
    jobs = {r["name"]: r for r in migrated.query("SELECT name, schedule, target FROM pgqr.jobs")}
    assert (jobs["pgqr-alerts"]["schedule"], jobs["pgqr-alerts"]["target"]) == ("*/5 * * * *", "app")
    assert jobs["pgqr-housekeeping"]["target"] == "app"
    assert jobs["pgqr-cron-history"]["target"] == "cron"
    with psycopg.connect(migrated.server.dsn("postgres")) as conn:
        scheduled = dict(conn.execute("SELECT jobname, database FROM cron.job WHERE jobname LIKE %s",
                                      (f"%@{migrated.name}",)).fetchall())
    n = migrated.name
    assert scheduled == {f"pgqr-tick@{n}": n, f"pgqr-alerts@{n}": n, f"pgqr-housekeeping@{n}": n,
                         f"pgqr-cron-history@{n}": "postgres"}


def test_the_cron_history_job_deletes_only_old_pgqr_runs_in_pg_crons_database(migrated: Database) -> None:
    command = migrated.value("SELECT command FROM pgqr.jobs WHERE name = 'pgqr-cron-history'")
    with psycopg.connect(migrated.server.dsn("postgres"), autocommit=True) as conn:
        conn.execute("SELECT cron.schedule('not-pgqr', '0 0 1 1 *', 'SELECT 1')")
        conn.execute(
            """INSERT INTO cron.job_run_details (jobid, runid, database, username, command, status, start_time)
               SELECT jobid, nextval('cron.runid_seq'), database, username, command, 'succeeded', now() - age
               FROM cron.job, (VALUES (interval '8 days'), (interval '1 day')) a(age)
               WHERE jobname IN (%s, 'not-pgqr')""", (f"pgqr-tick@{migrated.name}",))
        try:
            conn.execute(str(command).encode())
            left = conn.execute(
                """SELECT j.jobname, count(*) FROM cron.job_run_details d JOIN cron.job j USING (jobid)
                   WHERE j.jobname IN (%s, 'not-pgqr') AND d.start_time < now() - interval '1 hour'
                   GROUP BY 1""", (f"pgqr-tick@{migrated.name}",)).fetchall()  # not real runs of today
        finally:
            conn.execute("DELETE FROM cron.job_run_details WHERE jobid IN "
                         "(SELECT jobid FROM cron.job WHERE jobname = 'not-pgqr')")
            conn.execute("SELECT cron.unschedule('not-pgqr')")
    assert dict(left) == {f"pgqr-tick@{migrated.name}": 1, "not-pgqr": 2}
