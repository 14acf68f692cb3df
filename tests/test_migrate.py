"""`pgqr migrate`: pglast-checked, transactional, locked, idempotent migrations and pgqr's pg_cron jobs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from conftest import Database, run_pgqr
from psycopg.conninfo import make_conninfo

from pgqr import devdb, migrations

VERSIONS = [m.version for m in migrations.load()]


def test_migrate_twice_applies_once_then_is_a_no_op(db: Database) -> None:
    first = run_pgqr("migrate", env={"DATABASE_URL": db.dsn})
    assert first.returncode == 0, first.stderr
    assert [line for line in first.stdout.splitlines() if line.startswith("applied")] == [
        f"applied {m.name}" for m in migrations.load()
    ]
    assert first.stdout.splitlines()[-3:] == [
        "created public.evolution_instances (the default layout)", "bound public.evolution_instances (key id)",
        "binding: public.evolution_instances: key id, name instance_name, status instance_status (waiting "
        "connecting; connected connected; gave up -), token instance_token, url evolution_url, qr qr_code, qr at "
        "last_qr_update, pairing pairing_code"]
    second = run_pgqr("migrate", env={"DATABASE_URL": db.dsn})
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "nothing to migrate"
    assert [r["version"] for r in db.query("SELECT version FROM pgqr.migrations ORDER BY 1")] == VERSIONS


def test_tick_job_is_scheduled_in_pg_crons_database_for_this_one(migrated: Database) -> None:
    with psycopg.connect(migrated.server.dsn("postgres")) as cron:
        rows = cron.execute(
            "SELECT jobname, schedule, command, active FROM cron.job WHERE database = %s", (migrated.name,)
        ).fetchall()
    assert ("pgqr-tick@" + migrated.name, "* * * * *", "SELECT pgqr.tick()", True) in rows
    # no secret can hide in a command that is all pgqr's own SQL
    assert all(command.startswith("SELECT pgqr.") for _, _, command, _ in rows)


def test_two_concurrent_migrate_processes_both_succeed_and_apply_each_version_once(db: Database) -> None:
    env = {"DATABASE_URL": db.dsn}
    cmd = [sys.executable, "-m", "pgqr", "migrate"]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    applied_lines = sum(out.count("applied ") for out, _ in outputs)
    assert applied_lines == len(VERSIONS)
    assert [r["version"] for r in db.query("SELECT version FROM pgqr.migrations ORDER BY 1")] == VERSIONS


def test_a_syntax_error_is_reported_as_file_line_column_and_nothing_is_applied(
    db: Database, tmp_path: Path
) -> None:
    for path in migrations.sql_dir().glob("*.sql"):
        shutil.copy(path, tmp_path)
    (tmp_path / "0099_broken.sql").write_text("-- a broken migration\nCREATE TABLE pgqr.ok (id int);\nSELEC 1;\n")
    with pytest.raises(migrations.MigrationError) as err:
        migrations.migrate(db.dsn, migrations.load(tmp_path))
    assert str(err.value) == f'{tmp_path / "0099_broken.sql"}:3:1: syntax error at or near "SELEC"'
    assert db.value("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgqr'") == 0
    assert db.value("SELECT to_regclass('public.evolution_instances')") is None


def test_a_failing_migration_leaves_the_database_as_it_was(migrated: Database, tmp_path: Path) -> None:
    for path in migrations.sql_dir().glob("*.sql"):
        shutil.copy(path, tmp_path)
    (tmp_path / "0098_fine.sql").write_text("CREATE TABLE pgqr.fine (id int);\n")
    (tmp_path / "0099_fails.sql").write_text("CREATE TABLE pgqr.half (id int);\nSELECT 1 / 0;\n")
    with pytest.raises(migrations.MigrationError, match=r"^0099_fails.sql:2: division by zero$"):
        migrations.migrate(migrated.dsn, migrations.load(tmp_path))
    assert migrated.value("SELECT to_regclass('pgqr.half')") is None
    assert migrated.value("SELECT to_regclass('pgqr.fine')") is None  # pending files apply together or not at all
    assert [r["version"] for r in migrated.query("SELECT version FROM pgqr.migrations ORDER BY 1")] == VERSIONS
    # positive control: without the failing file, the other one applies
    (tmp_path / "0099_fails.sql").unlink()
    assert migrations.migrate(migrated.dsn, migrations.load(tmp_path))[0] == "applied 0098_fine.sql"
    assert migrated.value("SELECT to_regclass('pgqr.fine')") == "pgqr.fine"


def test_an_existing_app_table_keeps_its_rows_and_columns_and_is_bound_as_it_is(db: Database) -> None:
    db.query("""
        CREATE TABLE public.evolution_instances (
            id bigserial PRIMARY KEY,
            user_id uuid,
            instance_name text NOT NULL CONSTRAINT app_unique_name UNIQUE,
            instance_token text,
            instance_status text,
            qr_code text,
            last_qr_update timestamptz,
            plan text DEFAULT 'pro'
        );
        INSERT INTO public.evolution_instances (user_id, instance_name, instance_token, instance_status, qr_code)
        SELECT gen_random_uuid(), 'shop-' || g, 'tok-' || g, CASE WHEN g % 2 = 0 THEN 'connected' ELSE 'connecting' END,
               'data:image/png;base64,AAAA' || g
        FROM generate_series(1, 25) g;
    """)
    before = db.query("SELECT * FROM public.evolution_instances ORDER BY id")
    columns_before = {r["column_name"] for r in db.query(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'evolution_instances'")}
    assert migrations.migrate(db.dsn)[-2] == "bound public.evolution_instances (key id)"  # not created
    after = db.query(
        "SELECT id, user_id, instance_name, instance_token, instance_status, qr_code, last_qr_update, plan "
        "FROM public.evolution_instances ORDER BY id"
    )
    assert after == before
    columns = {r["column_name"] for r in db.query(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'evolution_instances'")}
    assert columns == columns_before  # pgqr adds no column to the app's table
    # what the table lacks is simply not bound
    binding = db.query("SELECT qr_column, pairing_column, url_column, token_column FROM pgqr.binding")
    assert binding == [{"qr_column": "qr_code", "pairing_column": None, "url_column": None,
                        "token_column": "instance_token"}]
    # the app's own unique constraint serves pgqr; no second index was added
    assert db.value("SELECT count(*) FROM pg_index WHERE indrelid = 'public.evolution_instances'::regclass "
                    "AND indisunique AND NOT indisprimary") == 1
    assert db.value("SELECT count(*) FROM pgqr.instance_state") == 25


def test_pg_cron_absent_gives_one_clear_line_and_leaves_the_database_unchanged() -> None:
    with devdb.running(cron_database=None) as server:
        result = run_pgqr("migrate", env={"DATABASE_URL": server.dsn("postgres")})
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1
        assert "pg_cron is not loaded" in result.stderr and "shared_preload_libraries" in result.stderr
        with psycopg.connect(server.dsn("postgres")) as conn:
            assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgqr'").fetchone() == (0,)
            assert conn.execute("SELECT to_regclass('public.evolution_instances')").fetchone() == (None,)


def test_verify_fails_while_pending_and_passes_after_migrate(db: Database) -> None:
    before = run_pgqr("migrate", "--verify", env={"DATABASE_URL": db.dsn})
    assert before.returncode == 1
    assert "pending: 0001_settings.sql" in before.stdout
    assert db.value("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgqr'") == 0  # verify changes nothing
    run_pgqr("migrate", env={"DATABASE_URL": db.dsn})
    after = run_pgqr("migrate", "--verify", env={"DATABASE_URL": db.dsn})
    assert after.returncode == 0, after.stdout
    assert after.stdout.strip() == "pgqr schema is up to date"


def test_verify_reports_a_missing_object_a_changed_file_and_a_missing_cron_job(migrated: Database) -> None:
    migrated.query("DROP FUNCTION pgqr.tick()")
    migrated.query("UPDATE pgqr.migrations SET checksum = 'edited' WHERE version = 2")
    with psycopg.connect(migrated.server.dsn("postgres"), autocommit=True) as cron:
        cron.execute("DELETE FROM cron.job WHERE database = %s", (migrated.name,))
    result = run_pgqr("migrate", "--verify", env={"DATABASE_URL": migrated.dsn})
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "missing function: pgqr.tick" in lines
    assert "changed since applied: 0002_state.sql" in lines
    assert f"missing cron job: pgqr-tick@{migrated.name}" in lines


def test_no_migration_file_changes_once_recorded() -> None:
    """Each file in sql/ is the one recorded in tests/golden/migrations.sha256: an applied file is never edited
    (a change is a new numbered file, whose line is added to the record)."""
    recorded = dict(line.split()[::-1] for line in
                    (Path(__file__).parent / "golden" / "migrations.sha256").read_text().splitlines())
    assert {m.name: m.checksum for m in migrations.load()} == recorded


def test_a_database_that_applied_the_first_0002_verifies_and_any_other_checksum_does_not(
        migrated: Database) -> None:
    [first] = migrations.SUPERSEDED[2]
    migrated.query("UPDATE pgqr.migrations SET checksum = %s WHERE version = 2", (first,))
    assert run_pgqr("migrate", "--verify", env={"DATABASE_URL": migrated.dsn}).returncode == 0
    migrated.query("UPDATE pgqr.migrations SET checksum = %s WHERE version = 2", ("0" * 64,))
    result = run_pgqr("migrate", "--verify", env={"DATABASE_URL": migrated.dsn})
    assert result.returncode == 1 and "changed since applied: 0002_state.sql" in result.stdout.splitlines()


def test_a_database_newer_than_the_code_is_refused(migrated: Database) -> None:
    migrated.query("INSERT INTO pgqr.migrations (version, name, checksum) VALUES (9999, '9999_future.sql', 'x')")
    result = run_pgqr("migrate", env={"DATABASE_URL": migrated.dsn})
    assert result.returncode == 1
    assert "version 9999, newer than this pgqr" in result.stderr


def test_dry_run_prints_the_sql_and_changes_nothing(db: Database) -> None:
    result = run_pgqr("migrate", "--dry-run", env={"DATABASE_URL": db.dsn})
    assert result.returncode == 0, result.stderr
    assert "-- 0001_settings.sql" in result.stdout
    assert "CREATE TABLE public.evolution_instances" in result.stdout  # the default layout's table
    assert db.value("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgqr'") == 0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "pgqr: DATABASE_URL is not set"),
        ({"DATABASE_URL": "host=localhost port"}, "pgqr: DATABASE_URL is not a valid libpq URL or DSN"),
        ({"DATABASE_URL": "postgresql://u@127.0.0.1:1/x?sslmode=bogus"},
         'pgqr: DATABASE_URL is not usable: invalid sslmode value: "bogus"'),
    ],
)
def test_missing_or_invalid_database_url_is_one_line_and_exit_2(env: dict[str, str], message: str) -> None:
    result = run_pgqr("migrate", env=env)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_roles_without_privileges_get_one_line_saying_what_to_grant(db: Database) -> None:
    role = f"weak_{db.name}"
    db.query(f'CREATE ROLE "{role}" LOGIN')
    try:
        env = {"DATABASE_URL": make_conninfo(db.dsn, user=role)}
        result = run_pgqr("migrate", env=env)
        assert result.returncode == 2
        assert result.stderr == (f"pgqr: role {role} cannot check pg_cron's settings: run pgqr migrate as a "
                                 f"superuser, or GRANT pg_read_all_settings TO {role}\n")
        db.query(f'GRANT pg_read_all_settings TO "{role}"')
        result = run_pgqr("migrate", env=env)  # now it gets as far as creating the schema
        assert result.returncode == 1
        assert result.stderr.startswith("pgqr: database error: permission denied") and result.stderr.count("\n") == 1
        assert db.value("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgqr'") == 0
    finally:
        db.query(f'DROP OWNED BY "{role}"; DROP ROLE "{role}"')
