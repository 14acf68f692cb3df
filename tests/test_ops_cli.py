"""`pgqr status/doctor/schedule/pause/resume/uninstall` as subprocesses against real databases."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import timedelta

import psycopg
import pytest
from conftest import Database, run_pgqr

from pgqr import ops
from pgqr.config import ConfigError
from pgqr.simulator import Simulator

TOKEN = "instance-token-" + "z" * 12


def cron_jobs(db: Database) -> dict[str, tuple[str, bool, str]]:
    """This database's jobs in pg_cron: name -> (schedule, active, database)."""
    with psycopg.connect(db.server.dsn("postgres")) as conn:
        rows = conn.execute("SELECT jobname, schedule, active, database FROM cron.job WHERE jobname LIKE %s",
                            (f"%@{db.name}",)).fetchall()
    return {str(n).split("@")[0]: (str(s), bool(a), str(d)) for n, s, a, d in rows}


def pgqr(db: Database, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_pgqr(*args, env={"DATABASE_URL": db.dsn, **env})


def add(db: Database, name: str, token: str | None = TOKEN, status: str = "connecting") -> None:
    db.query("INSERT INTO public.evolution_instances (instance_name, instance_token, instance_status) "
             "VALUES (%s, %s, %s)", (name, token, status))


# ------------------------------------------------------------------------------------------------ status


def test_status_prints_each_instance_as_a_table(migrated: Database) -> None:
    add(migrated, "alpha")
    add(migrated, "beta", status="connected")
    migrated.query("SELECT pgqr.heartbeat('h:1:x', 'h', 1, '0.1.0')")
    result = pgqr(migrated, "status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["INSTANCE", "STATUS", "QR", "AGE", "LAST", "ATTEMPT", "OUTCOME", "FAILURES",
                                "NEXT", "ATTEMPT", "LEASE"]
    assert lines[1].split()[:2] == ["alpha", "connecting"] and lines[2].split()[:2] == ["beta", "connected"]
    assert "listeners: 1 live" in result.stdout and "jobs: 4/4 active" in result.stdout
    assert TOKEN not in result.stdout


def test_status_json_is_the_pgqr_status_document(migrated: Database) -> None:
    add(migrated, "alpha")
    migrated.query("SELECT pgqr.tick()")
    result = pgqr(migrated, "status", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [i["instance_name"] for i in doc["instances"]] == ["alpha"]
    assert doc["instances"][0]["status"] == "connecting" and doc["instances"][0]["qr_age_seconds"] is None
    assert {j["name"] for j in doc["jobs"]} == {"pgqr-tick", "pgqr-alerts", "pgqr-housekeeping",
                                                "pgqr-cron-history"}
    assert doc["last_tick_at"] is not None and doc["alerts_firing"] == [] and doc["listeners"] == []
    assert TOKEN not in result.stdout and "token" not in result.stdout


def test_status_on_a_database_without_pgqr_says_to_migrate(db: Database) -> None:
    result = pgqr(db, "status")
    assert result.returncode == 1
    assert "run `pgqr migrate`" in result.stderr


def test_commands_without_a_database_url_exit_2() -> None:
    for command in ("status", "uninstall"):
        result = run_pgqr(command)
        assert result.returncode == 2, command
        assert "DATABASE_URL is not set" in result.stderr


# ------------------------------------------------------------------------------------------------ doctor


async def test_doctor_passes_every_check_on_a_healthy_installation(migrated: Database, simulator: Simulator) -> None:
    add(migrated, "alpha")
    migrated.query("SELECT pgqr.heartbeat('h:1:x', 'h', 1, '0.1.0')")
    result = await asyncio.to_thread(
        pgqr, migrated, "doctor", EVOLUTION_API_URL=simulator.base_url, EVOLUTION_API_KEY=simulator.config.api_key)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = result.stdout.splitlines()[:-1]
    assert [c.split()[1].rstrip(":") for c in checks] == [
        "pg_cron", "schema", "jobs", "job", "listener", "tokens", "evolution"]
    assert all(c.startswith("PASS") for c in checks)
    assert "lives in database postgres" in result.stdout
    assert simulator.config.api_key not in result.stdout + result.stderr


async def test_doctor_explains_each_failure_with_its_fix(migrated: Database, simulator: Simulator) -> None:
    add(migrated, "alpha", token=None)
    result = await asyncio.to_thread(
        pgqr, migrated, "doctor", EVOLUTION_API_URL=simulator.base_url)
    assert result.returncode == 1
    lines = {line.split()[1].rstrip(":"): line for line in result.stdout.splitlines() if line[:4] in ("PASS", "FAIL")}
    assert lines["listener"].startswith("FAIL") and "fix: start `pgqr run`" in lines["listener"]
    assert lines["tokens"].startswith("FAIL") and "1 instance(s) have no instance_token" in lines["tokens"]
    assert "fix: set EVOLUTION_API_KEY" in lines["tokens"]
    assert lines["evolution"].startswith("PASS")  # reachable; nothing to check the key with
    assert lines["jobs"].startswith("PASS")


async def test_doctor_fails_on_a_wrong_key_and_on_paused_jobs(migrated: Database, simulator: Simulator) -> None:
    add(migrated, "alpha")
    migrated.query("SELECT pgqr.heartbeat('h:1:x', 'h', 1, '0.1.0')")
    assert pgqr(migrated, "pause").returncode == 0
    result = await asyncio.to_thread(
        pgqr, migrated, "doctor", EVOLUTION_API_URL=simulator.base_url, EVOLUTION_API_KEY="wrong-key-123")
    assert result.returncode == 1
    lines = {line.split()[1].rstrip(":"): line for line in result.stdout.splitlines() if line[:4] in ("PASS", "FAIL")}
    assert lines["evolution"].startswith("FAIL") and "rejects EVOLUTION_API_KEY" in lines["evolution"]
    assert lines["jobs"].startswith("FAIL") and "fix: run `pgqr resume`" in lines["jobs"]
    assert "wrong-key-123" not in result.stdout + result.stderr


def test_doctor_reports_a_failed_last_job_run(migrated: Database) -> None:
    migrated.query("SELECT pgqr.heartbeat('h:1:x', 'h', 1, '0.1.0')")
    with psycopg.connect(migrated.server.dsn("postgres"), autocommit=True) as conn:
        # A real run at a minute boundary would be newer than the failure: stop real runs, and date the
        # failure after any run pg_cron may still start before it notices.
        migrated.pause_cron()
        conn.execute(
            """INSERT INTO cron.job_run_details (jobid, runid, database, username, command, status,
                                                 return_message, start_time, end_time)
               SELECT jobid, nextval('cron.runid_seq'), database, username, command, 'failed',
                      'ERROR:  relation "pgqr.ticks" does not exist', now() + interval '5 seconds',
                      now() + interval '5 seconds'
               FROM cron.job WHERE jobname = %s""", (f"pgqr-tick@{migrated.name}",))
    result = pgqr(migrated, "doctor", EVOLUTION_API_KEY="k")
    line = next(x for x in result.stdout.splitlines() if " job runs:" in x)
    assert result.returncode == 1
    assert line.startswith("FAIL") and f"pgqr-tick@{migrated.name}" in line and "does not exist" in line


def test_doctor_on_a_database_without_pgqr_says_to_migrate(db: Database) -> None:
    result = pgqr(db, "doctor")
    assert result.returncode == 1
    assert "FAIL  schema: pgqr is not installed" in result.stdout and "fix: run `pgqr migrate`" in result.stdout


# ----------------------------------------------------------------------------- schedule, pause, resume


def test_schedule_every_five_minutes_changes_the_tick_job_in_pg_cron(migrated: Database) -> None:
    result = pgqr(migrated, "schedule", "--every", "5 minutes")
    assert result.returncode == 0, result.stderr
    assert "*/5 * * * *" in result.stdout
    assert cron_jobs(migrated)["pgqr-tick"] == ("*/5 * * * *", True, migrated.name)
    assert migrated.value("SELECT schedule FROM pgqr.jobs WHERE name = 'pgqr-tick'") == "*/5 * * * *"
    assert migrated.value("SELECT value FROM pgqr.settings WHERE key = 'tick_every'") == "00:05:00"
    assert pgqr(migrated, "schedule", "--every", "1h").returncode == 0
    assert cron_jobs(migrated)["pgqr-tick"][0] == "0 * * * *"


def test_schedule_sub_minute_on_pg_cron_1_4_names_the_version_needed(migrated: Database) -> None:
    result = pgqr(migrated, "schedule", "--every", "30s")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "pg_cron 1.5 or later" in result.stderr and "1.4" in result.stderr
    assert cron_jobs(migrated)["pgqr-tick"][0] == "* * * * *"


def test_schedule_refuses_periods_it_cannot_express(migrated: Database) -> None:
    for every, message in (("7 fortnights", "--every must be"), ("7 minutes", "minutes that divide an hour")):
        result = pgqr(migrated, "schedule", "--every", every)
        assert result.returncode == 2, every
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_pause_and_resume_switch_every_pgqr_job_in_pg_cron(migrated: Database) -> None:
    paused = pgqr(migrated, "pause")
    assert paused.returncode == 0, paused.stderr
    assert {name: active for name, (_, active, _) in cron_jobs(migrated).items()} == {
        "pgqr-tick": False, "pgqr-alerts": False, "pgqr-housekeeping": False, "pgqr-cron-history": False}
    assert migrated.value("SELECT bool_or(active) FROM pgqr.jobs") is False
    resumed = pgqr(migrated, "resume")
    assert resumed.returncode == 0, resumed.stderr
    assert all(active for _, active, _ in cron_jobs(migrated).values())
    assert cron_jobs(migrated)["pgqr-cron-history"][2] == "postgres"  # still runs in pg_cron's database


# --------------------------------------------------------------------------------------------- uninstall


def test_uninstall_unschedules_but_keeps_everything_working(migrated: Database) -> None:
    add(migrated, "alpha")
    result = pgqr(migrated, "uninstall")
    assert result.returncode == 0, result.stderr
    assert cron_jobs(migrated) == {}
    assert migrated.value("SELECT to_regclass('pgqr.jobs') IS NOT NULL") is True
    add(migrated, "beta")  # the trigger still works
    assert migrated.value("SELECT count(*) FROM pgqr.instance_state") == 2
    assert pgqr(migrated, "migrate").returncode == 0  # and migrate schedules again
    assert len(cron_jobs(migrated)) == 4


def test_uninstall_drop_data_drops_schema_and_trigger_but_never_instance_rows(migrated: Database) -> None:
    add(migrated, "alpha")
    migrated.query("UPDATE public.evolution_instances SET qr_code = 'data:x', last_qr_update = now()")
    result = pgqr(migrated, "uninstall", "--drop-data")
    assert result.returncode == 0, result.stderr
    assert cron_jobs(migrated) == {}
    assert migrated.value("SELECT to_regnamespace('pgqr') IS NULL") is True
    assert migrated.query("SELECT tgname FROM pg_trigger WHERE tgrelid = 'public.evolution_instances'::regclass "
                          "AND NOT tgisinternal") == []
    rows = migrated.query("SELECT instance_name, instance_token, qr_code FROM public.evolution_instances")
    assert rows == [{"instance_name": "alpha", "instance_token": TOKEN, "qr_code": "data:x"}]
    add(migrated, "beta")  # inserts work without pgqr
    assert migrated.value("SELECT count(*) FROM public.evolution_instances") == 2
    assert migrated.value("SELECT count(*) FROM pg_roles WHERE rolname = 'pgqr_monitor'") == 1
    assert pgqr(migrated, "status").returncode == 1
    assert pgqr(migrated, "migrate").returncode == 0  # a clean reinstall
    assert migrated.value("SELECT count(*) FROM pgqr.instance_state") == 2


def test_every_accepts_a_number_and_a_unit_only() -> None:
    assert ops.parse_every("30s") == timedelta(seconds=30)
    assert ops.parse_every(" 5 Minutes ") == timedelta(minutes=5)
    assert ops.parse_every("2h") == timedelta(hours=2)
    assert ops.parse_every("1 day") == timedelta(days=1)
    for bad in ("0s", "5", "fortnight", "1.5 minutes", "-1m", "7 fortnights"):
        with pytest.raises(ConfigError):
            ops.parse_every(bad)
