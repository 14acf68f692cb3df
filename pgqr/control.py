"""`pgqr schedule/pause/resume/uninstall`: the control functions in sql/0008 (a psql user can call the same
ones), carried to pg_cron's own database where pg_cron lives elsewhere, and the DDL that removes pgqr."""

from __future__ import annotations

import psycopg
from psycopg import errors

from . import cron
from .admin import Conn, connect, cron_version, require_installed
from .errors import ConfigurationError, MigrationError
from .settings import ConfigError, Settings


def _resync(settings: Settings, conn: Conn, setup: cron.CronSetup) -> None:
    """pgqr.jobs changed: apply it in pg_cron's database (pgqr.sync_cron() can only do that from there)."""
    cron.schedule_jobs(settings.dsn, setup, cron.wanted_jobs(conn))


def schedule(settings: Settings, every: str) -> str:
    """Tick every `every`; returns the cron expression. ConfigError for a period pg_cron cannot run."""
    with connect(settings) as conn:
        require_installed(conn)
        setup = cron.cron_setup(conn)
        version = cron_version(settings.dsn, setup)
        try:
            # PostgreSQL parses the period: '5 minutes', '5m', '1 hour', '1 day', '30s'
            row = conn.execute("SELECT pgqr.schedule(%s::interval, %s)", (every, version)).fetchone()
        except (errors.InvalidDatetimeFormat, errors.DatetimeFieldOverflow, errors.IntervalFieldOverflow):
            raise ConfigError(f"--every must be an interval like '5 minutes', '5m' or '1 hour'; got {every!r}") \
                from None
        except (errors.InvalidParameterValue, errors.FeatureNotSupported) as exc:
            raise ConfigError(exc.diag.message_primary or str(exc)) from None
        _resync(settings, conn, setup)
    assert row is not None
    return str(row[0])


def set_active(settings: Settings, active: bool) -> int:
    """pgqr.pause() / pgqr.resume(), then pg_cron; returns how many jobs changed state."""
    with connect(settings) as conn:
        require_installed(conn)
        setup = cron.cron_setup(conn)
        row = conn.execute("SELECT pgqr.resume()" if active else "SELECT pgqr.pause()").fetchone()
        _resync(settings, conn, setup)
    return int(row[0]) if row else 0


def uninstall(settings: Settings, drop_data: bool) -> list[str]:
    """Unschedule pgqr's jobs and remove its trigger from the app's table (the app's writes then behave as
    before install); with drop_data also drop schema pgqr. Never touches the app's table or its rows.

    The role pgqr_monitor stays when another database still uses it (roles are cluster-wide).
    """
    done: list[str] = []
    with connect(settings) as conn:
        require_installed(conn)
        try:
            with conn.transaction():
                # a listener in mid-transaction would make us wait forever; fail with the fix instead (LOCAL: a
                # pooler hands this connection to someone else afterwards)
                conn.execute("SET LOCAL lock_timeout = '10s'")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (cron.LOCK_KEY,))  # not while a migrate runs
                done += _uninstall(settings, conn, drop_data)
        except errors.LockNotAvailable:
            raise MigrationError(
                "pgqr's tables are in use: stop every `pgqr run`, then uninstall again") from None
    return done


def _uninstall(settings: Settings, conn: Conn, drop_data: bool) -> list[str]:
    done: list[str] = []
    jobs = cron.wanted_jobs(conn)
    try:
        setup: cron.CronSetup | None = cron.cron_setup(conn)
    except ConfigurationError:
        setup = None  # no pg_cron, so nothing scheduled
    if setup is not None and jobs:
        if drop_data:
            _forget_history(settings.dsn, setup, jobs)
        removed = cron.unschedule_jobs(settings.dsn, setup, jobs)
        done.append(f"unscheduled {removed} pg_cron job(s) in database {setup.cron_database}")
    row = conn.execute("SELECT pgqr.qualified(to_regclass(table_name)) FROM pgqr.binding").fetchone()
    table = row[0] if row else None
    if table:
        conn.execute(f"DROP TRIGGER IF EXISTS pgqr_instance_change ON {table}".encode())
        done.append(f"removed pgqr's trigger from {table}; its rows are untouched")
    if drop_data:
        conn.execute("DROP SCHEMA IF EXISTS pgqr CASCADE")
        done.append("dropped schema pgqr (state, history, settings)")
        if _drop_monitor_role(conn):
            done.append("dropped role pgqr_monitor")
        elif conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'pgqr_monitor'").fetchone():
            done.append("kept role pgqr_monitor: another database still grants it rights")
    else:
        done.append("kept schema pgqr and its data; `pgqr migrate` installs the trigger and jobs again, "
                    "`--drop-data` removes everything")
    return done


def _drop_monitor_role(conn: Conn) -> bool:
    """Drop pgqr_monitor unless another database still has objects or privileges for it."""
    try:
        with conn.transaction():
            conn.execute("DROP ROLE IF EXISTS pgqr_monitor")
        return True
    except (errors.DependentObjectsStillExist, errors.InsufficientPrivilege):
        return False


def _forget_history(dsn: str, setup: cron.CronSetup, jobs: list[cron.Job]) -> None:
    with psycopg.connect(cron.cron_conninfo(dsn, setup), autocommit=True) as cron_db:
        for job in jobs:
            cron_db.execute(
                "DELETE FROM cron.job_run_details WHERE jobid IN "
                "(SELECT jobid FROM cron.job WHERE jobname = %s AND database = %s)",
                (setup.jobname(job.name), job.database(setup)),
            )


