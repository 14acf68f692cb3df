"""One bench database on the throwaway server: its queries, its waits, and what pgqr has cost it (WAL, rows,
bytes on disk)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Sequence
from typing import Any

import psycopg

from .. import devdb, migrations


class Db:
    """One bench database on the throwaway server."""

    def __init__(self, server: devdb.DevServer, name: str) -> None:
        self.server, self.name = server, name
        self.dsn = server.dsn(name)

    @classmethod
    def create(cls, server: devdb.DevServer, name: str, *, cron: bool = False) -> Db:
        with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        migrations.migrate(server.dsn(name))
        d = cls(server, name)
        d.set_cron(cron)
        return d

    def set_cron(self, active: bool) -> None:
        """pg_cron's jobs for this database on or off (off: no tick, no housekeeping in the figures)."""
        with psycopg.connect(self.server.dsn("postgres"), autocommit=True) as conn:
            conn.execute("UPDATE cron.job SET active = %s WHERE database = %s OR jobname LIKE %s",
                         (active, self.name, f"%@{self.name}"))

    async def connect(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)

    async def value(self, sql: str, params: Sequence[Any] = ()) -> Any:
        async with await self.connect() as conn:
            row = await (await conn.execute(sql.encode(), params)).fetchone()
            return row[0] if row else None

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        async with await self.connect() as conn:
            await conn.execute(sql.encode(), params)

    async def load(self, tokens: dict[str, str], status: str = "connecting") -> None:
        """The app's rows for these instances, as a bulk load does it (no trigger, no NOTIFY), then the sync a
        tick would run: they are due now, but nobody has been woken."""
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            await conn.execute("SET session_replication_role = replica")
            async with conn.cursor().copy("COPY public.evolution_instances (instance_name, instance_token, "
                                          "instance_status) FROM STDIN") as copy:
                for name, token in tokens.items():
                    await copy.write_row((name, token, status))
            await conn.execute("SET session_replication_role = origin")
            await conn.execute("SELECT pgqr.sync_instances()")
            await conn.commit()

    async def quiesce(self) -> None:
        """Before a WAL window: vacuum this database now, and wait until no autovacuum worker runs anywhere, so
        the window holds what the phase writes, not a cleanup that happens to fall into it."""
        async with await self.connect() as conn:
            await conn.execute("VACUUM (ANALYZE)")
            for _ in range(600):
                cur = await conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                                         "'autovacuum worker'")
                row = await cur.fetchone()
                if row and row[0] == 0:
                    return
                await asyncio.sleep(0.1)

    def drop(self) -> None:
        self.set_cron(False)
        with psycopg.connect(self.server.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'.encode())

    async def wal_lsn(self) -> int:
        return int(await self.value("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn"))

    async def wal_lsn_text(self) -> str:
        return str(await self.value("SELECT pg_current_wal_insert_lsn()::text"))

    def wal_by_kind(self, start: str, end: str, by: str = "rmgr") -> dict[str, int]:
        """Bytes of WAL between two LSNs by resource manager (pg_waldump --stats; by="record": by record type,
        Heap2/PRUNE, Heap/INSERT, ...): Heap, Btree, ... are writes to tables and indexes; Standby and
        Transaction records come from the server and other sessions."""
        if start == end:
            return {}
        out = subprocess.run([str(self.server.bindir / "pg_waldump"), f"--stats={by}", "-p",
                              str(self.server.datadir / "pg_wal"), "-s", start, "-e", end],
                             capture_output=True, text=True, check=False).stdout
        pct = r"\(\s*[\d.]+\)"
        row = re.compile(rf"^(\S+)\s+\d+\s+{pct}\s+\d+\s+{pct}\s+\d+\s+{pct}\s+(\d+)\s+{pct}")
        return {m[1]: int(m[2]) for line in out.splitlines() if (m := row.match(line)) and m[1] != "Total"}

    async def wait(self, sql: str, what: str, timeout: float, params: Sequence[Any] = ()) -> float:
        """Poll until `sql` returns true; the seconds it took."""
        started = time.monotonic()
        while not await self.value(sql, params):
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
            await asyncio.sleep(0.05)
        return time.monotonic() - started


async def cost_point(d: Db) -> dict[str, float]:
    """What pgqr has cost the database so far: WAL position, log and count rows, bytes on disk of pgqr's tables
    and the app's (with indexes and TOAST)."""
    async with await d.connect() as conn:
        cur = await conn.execute(
            "SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn, (SELECT count(*) FROM pgqr.refresh_log), "
            "(SELECT count(*) FROM pgqr.refresh_counts), "
            "(SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            " WHERE c.relkind = 'r' AND (n.nspname = 'pgqr' OR c.oid = 'public.evolution_instances'::regclass))")
        row = await cur.fetchone()
    assert row is not None
    return dict(zip(("wal", "log_rows", "count_rows", "bytes"), (float(v) for v in row), strict=True))


# WAL records of cleanup, which any reader of a page with dead rows on it may write (a prune, a visibility-map
# bit): PostgreSQL's, not the writes of the phase being measured
CLEANUP_RECORDS = ("Heap2/PRUNE", "Heap2/VACUUM", "Heap2/VISIBLE", "Heap2/FREEZE_PAGE", "Btree/DELETE",
                   "Btree/VACUUM", "Heap/INPLACE")


async def polls_counted(d: Db) -> int:
    """Every poll made so far (pgqr.refresh_counts counts each; the log keeps news only)."""
    return int(await d.value("SELECT coalesce(sum(results), 0) FROM pgqr.refresh_counts WHERE source = 'poll'"))
