"""Shared fixtures: one real PostgreSQL 15 with pg_cron for the session, a fresh database per test.

The server comes from pgqr.devdb (root-safe: as root it runs as the `postgres` account); databases come
from pytest-postgresql's DatabaseJanitor. pg_cron lives in the `postgres` database, so every test database
is an "application database elsewhere" and pgqr schedules its jobs with cron.schedule_in_database.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg.rows import dict_row
from pytest_postgresql.janitor import DatabaseJanitor

from pgqr import cron, devdb, migrations

pytest_plugins = ["sim_fixtures", "service_fixtures"]

_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[devdb.DevServer]:
    with devdb.running(cron_database="postgres") as server:
        yield server


@dataclass
class Database:
    """A fresh database on the session server."""

    server: devdb.DevServer
    name: str

    @property
    def dsn(self) -> str:
        return self.server.dsn(self.name)

    def connect(self) -> psycopg.Connection[dict[str, object]]:
        return psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row)

    def query(self, sql: str, params: object = None) -> list[dict[str, object]]:
        with self.connect() as conn:
            cur = conn.execute(sql.encode(), params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def value(self, sql: str, params: object = None) -> object:
        rows = self.query(sql, params)
        return next(iter(rows[0].values())) if rows else None

    def pause_cron(self) -> None:
        """Deactivate pg_cron's jobs for this database, so no real tick or alert run races a test."""
        with psycopg.connect(self.server.dsn("postgres"), autocommit=True) as conn:
            conn.execute("UPDATE cron.job SET active = false WHERE database = %s OR jobname LIKE %s",
                         (self.name, f"%@{self.name}"))


def _new_database(server: devdb.DevServer, template: str | None = None) -> Iterator[Database]:
    name = f"pgqr_t{os.getpid()}_{next(_counter)}"
    janitor = DatabaseJanitor(
        user=server.user, host=server.host, port=server.port, dbname=name, password=None, template_dbname=template
    )
    with janitor:
        yield Database(server, name)
        # drop the pg_cron jobs that point at this database, or pg_cron keeps trying to run them
        with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
            if conn.execute("SELECT to_regclass('cron.job')").fetchone() != (None,):
                conn.execute("DELETE FROM cron.job WHERE database = %s", (name,))
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )


@pytest.fixture
def db(pg_server: devdb.DevServer) -> Iterator[Database]:
    """An empty database."""
    yield from _new_database(pg_server)


@pytest.fixture(scope="session")
def pgqr_template(pg_server: devdb.DevServer) -> str:
    """A database migrated once (default layout); each test that needs pgqr gets a clone of it."""
    name = f"pgqr_template_{os.getpid()}"
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    migrations.migrate(pg_server.dsn(name))
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute("DELETE FROM cron.job WHERE database = %s", (name,))
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
    return name


@pytest.fixture
def migrated(pg_server: devdb.DevServer, pgqr_template: str) -> Iterator[Database]:
    """A database with pgqr installed (a clone of the template) and its pg_cron jobs scheduled."""
    for database in _new_database(pg_server, pgqr_template):
        with psycopg.connect(database.dsn, autocommit=True) as conn:
            # installed now, as far as the alert rules' first-evaluation grace is concerned (not when the
            # template was migrated, minutes ago)
            conn.execute("UPDATE pgqr.migrations SET applied_at = now()")
            setup = cron.cron_setup(conn)
            cron.schedule_jobs(database.dsn, setup, cron.wanted_jobs(conn))
        yield database


@pytest.fixture
def quiet(migrated: Database) -> Database:
    """A database with pgqr installed and its pg_cron jobs inactive."""
    migrated.pause_cron()
    return migrated


def command_env(**values: str) -> dict[str, str]:
    """This environment less any pgqr setting the machine may have, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGQR_", "EVOLUTION_", "DATABASE_URL"))}
    env.update(values)
    return env


def run_pgqr(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real `pgqr` command line in a subprocess, without standard input."""
    return subprocess.run(
        [sys.executable, "-m", "pgqr", *args],
        env=command_env(**(env or {})), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def end_process(process: subprocess.Popen[bytes], grace: float = 10) -> None:
    """SIGTERM a child started with subprocess.Popen; SIGKILL it when it has not exited `grace` seconds later."""
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def mark_qr(db: Database, name: str, expires_in: str) -> None:
    """pgqr's bookkeeping for `name` as after a new QR whose estimated expiry is `expires_in` from now
    ('-6 minutes': it stopped working 6 minutes ago), made one QR lifetime before that expiry."""
    db.query("UPDATE pgqr.instance_state s SET qr_md5 = md5(s.key), qr_expires_at = x.expires, "
             "qr_born_after = x.expires - x.life, qr_seen_at = x.expires - x.life "
             "FROM (SELECT now() + %s::interval AS expires, pgqr.seconds('qr_lifetime_seconds') AS life) x "
             "WHERE s.name = %s", (expires_in, name))
