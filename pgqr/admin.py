"""What the operator commands share: a connection to the application database and "is pgqr installed here"."""

from __future__ import annotations

from typing import Any

import psycopg

from . import cron
from .errors import MigrationError
from .settings import Settings

Conn = psycopg.Connection[tuple[Any, ...]]


class NotInstalled(MigrationError):
    """The database has no pgqr schema (exit status 1, with the fix)."""


def connect(settings: Settings) -> Conn:
    return psycopg.connect(settings.dsn, autocommit=True, prepare_threshold=None)


def installed(conn: Conn) -> bool:
    row = conn.execute("SELECT to_regclass('pgqr.jobs') IS NOT NULL").fetchone()
    return bool(row and row[0])


def require_installed(conn: Conn) -> None:
    if not installed(conn):
        raise NotInstalled(f"pgqr is not installed in database {conn.info.dbname}: run `pgqr migrate`")



def cron_version(dsn: str, setup: cron.CronSetup) -> str | None:
    """pg_cron's extversion in its database ('1.4-1'), None when the extension is not created there."""
    with cron.connect(cron.cron_conninfo(dsn, setup)) as cron_db:
        row = cron_db.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'").fetchone()
    return str(row[0]) if row else None
