"""What the operator commands share: a connection to the application database and "is pgqr installed here"."""

from __future__ import annotations

from typing import Any

import psycopg

from . import cron
from .errors import NotInstalled
from .settings import Settings

Conn = psycopg.Connection[tuple[Any, ...]]

# `pgqr migrate` installs everything in one transaction, so any one of its tables says "installed"
INSTALLED = "SELECT to_regclass('pgqr.jobs') IS NOT NULL"


def connect(settings: Settings) -> Conn:
    return psycopg.connect(settings.dsn, autocommit=True, prepare_threshold=None)


def installed(conn: Conn) -> bool:
    row = conn.execute(INSTALLED).fetchone()
    return bool(row and row[0])


def require_installed(conn: Conn) -> None:
    """Raise NotInstalled (exit status 2, the one line every command prints) unless pgqr is installed here."""
    if not installed(conn):
        raise NotInstalled(str(conn.info.dbname))


def ensure_installed(settings: Settings) -> None:
    """require_installed() on a connection of its own, for commands whose work opens others."""
    with connect(settings) as conn:
        require_installed(conn)


def cron_version(dsn: str, setup: cron.CronSetup) -> str | None:
    """pg_cron's extversion in its database ('1.4-1'), None when the extension is not created there."""
    with cron.connect(cron.cron_conninfo(dsn, setup)) as cron_db:
        row = cron_db.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'").fetchone()
    return str(row[0]) if row else None
