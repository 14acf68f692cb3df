"""pg_cron: where it lives relative to the application database, and pgqr's jobs there.

pg_cron lives in one database (cron.database_name). When that is another database than the application's,
pgqr's jobs are created there with cron.schedule_in_database and named `<job>@<app database>`, so several
application databases on one server never overwrite each other's jobs. `pgqr.jobs` in the application
database is what pgqr wants; this module makes pg_cron match it.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg.conninfo import make_conninfo

from .errors import ConfigurationError

LOCK_KEY = 0x70677172  # "pgqr": the one advisory lock of every pgqr migrate, bind and uninstall


def connect(dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    """Every connection migrate, verify and the pg_cron calls make: autocommit, and never a server-side prepared
    statement (psycopg prepares a query it ran five times; through a transaction pooler that statement stays
    on a server connection the next client gets, or is missing on the one this client gets next)."""
    return psycopg.connect(dsn, autocommit=True, prepare_threshold=None)


@dataclass(frozen=True)
class CronSetup:
    """Where pg_cron lives relative to the application database."""

    app_database: str
    cron_database: str

    @property
    def same_database(self) -> bool:
        return self.app_database == self.cron_database

    def jobname(self, name: str) -> str:
        # pg_cron job names are unique per user in its one database; several application databases on
        # one server would overwrite each other's jobs, so jobs for another database carry its name.
        return name if self.same_database else f"{name}@{self.app_database}"


def cron_setup(conn: psycopg.Connection[tuple[object, ...]]) -> CronSetup:
    """Check pg_cron is usable; raise ConfigurationError with what to set otherwise. Changes nothing."""
    app_db = str(conn.info.dbname)
    if not _pg_cron_loaded(conn):
        raise ConfigurationError(
            "pg_cron is not loaded: set shared_preload_libraries = 'pg_cron' and "
            f"cron.database_name = '{app_db}' in postgresql.conf, then restart PostgreSQL "
            "(Debian: apt-get install postgresql-15-cron)"
        )
    row = conn.execute("SELECT current_setting('cron.database_name', true)").fetchone()
    cron_db = str(row[0]) if row and row[0] else "postgres"
    return CronSetup(app_database=app_db, cron_database=cron_db)


def _pg_cron_loaded(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    try:
        row = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()
    except psycopg.errors.InsufficientPrivilege:
        # pg_cron's own settings (cron.database_name) are just as hidden, so there is no other way to look
        raise ConfigurationError(
            f"role {conn.info.user} cannot check pg_cron's settings: run pgqr migrate as a superuser, or "
            f"GRANT pg_read_all_settings TO {conn.info.user}"
        ) from None
    return "pg_cron" in [x.strip().strip('"') for x in str(row[0] if row else "").split(",")]


def cron_conninfo(dsn: str, setup: CronSetup) -> str:
    """Same server and credentials, pg_cron's database."""
    return make_conninfo(dsn, dbname=setup.cron_database)


@dataclass(frozen=True)
class Job:
    name: str
    schedule: str
    command: str
    active: bool
    target: str  # 'app': runs in the application database; 'cron': in pg_cron's own

    def database(self, setup: CronSetup) -> str:
        return setup.cron_database if self.target == "cron" else setup.app_database


def wanted_jobs(conn: psycopg.Connection[tuple[object, ...]]) -> list[Job]:
    rows = conn.execute("SELECT name, schedule, command, active, target FROM pgqr.jobs ORDER BY name").fetchall()
    return [Job(str(n), str(s), str(c), bool(a), str(t)) for n, s, c, a, t in rows]


def ensure_extension(dsn: str, setup: CronSetup) -> None:
    """pg_cron's extension in its database, before the migrations (views may read cron.* there)."""
    with connect(cron_conninfo(dsn, setup)) as cron, cron.transaction():
        # two first migrates at once (of two databases, or two replicas) would race to create it
        cron.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        cron.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")


def schedule_jobs(dsn: str, setup: CronSetup, jobs: list[Job]) -> None:
    """Create or update pgqr's jobs in pg_cron (cron.schedule_in_database upserts by name)."""
    with connect(cron_conninfo(dsn, setup)) as cron:
        for job in jobs:
            row = cron.execute(
                "SELECT cron.schedule_in_database(%s, %s, %s, %s, NULL, %s)",
                (setup.jobname(job.name), job.schedule, job.command, job.database(setup), job.active),
            ).fetchone()
            # pg_cron 1.4's upsert by name updates only schedule and command: pause/resume need `active`
            assert row is not None
            cron.execute(
                "SELECT cron.alter_job(%s, database => %s, active => %s)",
                (row[0], job.database(setup), job.active),
            )


def unschedule_jobs(dsn: str, setup: CronSetup, jobs: list[Job]) -> int:
    with connect(cron_conninfo(dsn, setup)) as cron:
        removed = 0
        for job in jobs:
            row = cron.execute(
                "SELECT cron.unschedule(jobid) FROM cron.job WHERE jobname = %s AND database = %s",
                (setup.jobname(job.name), job.database(setup)),
            ).fetchone()
            removed += 1 if row else 0
        return removed


def missing_jobs(dsn: str, setup: CronSetup, jobs: list[Job]) -> list[str]:
    with connect(cron_conninfo(dsn, setup)) as cron:
        has_cron = cron.execute("SELECT to_regclass('cron.job') IS NOT NULL").fetchone()
        if not has_cron or not has_cron[0]:
            return [f"missing extension: pg_cron in database {setup.cron_database}"]
        problems = []
        for job in jobs:
            row = cron.execute(
                "SELECT 1 FROM cron.job WHERE jobname = %s AND database = %s",
                (setup.jobname(job.name), job.database(setup)),
            ).fetchone()
            if not row:
                problems.append(f"missing cron job: {setup.jobname(job.name)}")
        return problems


