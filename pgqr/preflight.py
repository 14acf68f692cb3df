"""Before `pgqr run` or `refresh` starts work: fail fast, with one line, on what no retry can fix, and wait (saying
so) for a database that is still starting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import psycopg

from . import admin
from .errors import NotInstalled
from .settings import ConfigError, Settings, database_refusal, database_target, first_line, rejected_dsn

WAIT_REPORT_SECONDS = 10.0


class DatabaseUnreachable(RuntimeError):
    """The database did not answer within the wait (exit 1: nothing to fix in pgqr's settings, maybe)."""


async def preflight(settings: Settings, wait: float = 0.0, say: Callable[[str], None] | None = None) -> None:
    """Fail fast, with one line, on what no retry can fix: refused credentials, a database without pgqr, or
    waiting instances that have no Evolution URL to call. A database that is down or starting, or a role or
    database that does not exist yet (it may still be being created), is tried again for `wait` seconds, said
    every WAIT_REPORT_SECONDS through `say`, then reported once: exit 2 for a refusal, 1 for no answer."""
    target = database_target(settings.dsn)
    if say:
        say(f"connecting to the database: {target}")
    start = time.monotonic()
    deadline, report_at = start + wait, start + WAIT_REPORT_SECONDS
    while True:
        try:
            row = await _installed_and_unreachable_rows(settings)
            break
        except psycopg.Error as exc:
            if rejected := rejected_dsn(exc):
                raise rejected from None
            if not isinstance(exc, psycopg.OperationalError):
                raise
            refusal = database_refusal(exc, settings.dsn)
            if refusal and refusal.lasting:
                raise refusal from None
            now = time.monotonic()
            if now >= deadline:
                waited = f" (waited {wait:g} s)" if wait else ""
                if refusal:
                    raise ConfigError(f"{refusal}{waited}") from None
                raise DatabaseUnreachable(f"cannot reach the database{waited}: {first_line(exc)}") from None
            if say and now >= report_at:
                why = str(refusal).removeprefix("the database refused the connection: ") if refusal \
                    else first_line(exc)
                say(f"still waiting for the database ({now - start:.0f} s of {wait:g} s): {why}")
                report_at += WAIT_REPORT_SECONDS
            await asyncio.sleep(min(1.0, max(0.0, deadline - now)))
    if row:
        raise ConfigError(f"EVOLUTION_API_URL is not set and {row} instance(s) have no Evolution URL of their own")


async def _installed_and_unreachable_rows(settings: Settings) -> int:
    """Raise unless pgqr is installed; the number of waiting instances without any Evolution URL."""
    async with await psycopg.AsyncConnection.connect(settings.dsn, connect_timeout=10,
                                                     prepare_threshold=None) as conn:
        cur = await conn.execute(admin.INSTALLED)
        row = await cur.fetchone()
        if not row or not row[0]:
            raise NotInstalled(str(conn.info.dbname))
        if settings.evolution_api_url:
            return 0
        cur = await conn.execute("SELECT count(*) FROM pgqr.app_instances WHERE coalesce(url, '') = ''")
        row = await cur.fetchone()
        return int(row[0]) if row else 0
