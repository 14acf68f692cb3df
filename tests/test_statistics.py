"""Statistics that keep up with pgqr's tables (0013): a connection that planned its write path while pgqr's
tables were small stops reading every row of them once the tick, or a sidecar's heartbeat, has analyzed the
tables that outgrew their statistics; nothing is analyzed twice, a held lock or a role that does not own the
tables costs the tick nothing."""

from __future__ import annotations

import json

import psycopg
import pytest
from conftest import Database
from service_fixtures import Env, running_service, wait_until

pytestmark = pytest.mark.usefixtures("no_cron_ticks")

GROWN = 3000  # rows the app adds at once: instance_state goes from one page to a few hundred


def _no_autovacuum(db: Database) -> None:
    """autovacuum would analyze the grown tables too, in its own time: what a test sees must be pgqr's doing."""
    for table in ("pgqr.instance_state", "pgqr.schedule"):
        db.query(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")


def _add_rows(db: Database, prefix: str, count: int, *, bulk: bool, status: str = "connecting") -> None:
    """Rows in the app's table (waiting ones by default); bulk: with triggers off (a restore, a copy), taken in
    by the sync."""
    with db.connect() as conn:
        if bulk:
            conn.execute("SET session_replication_role = replica")
        conn.execute("INSERT INTO public.evolution_instances (instance_name, instance_status) "
                     "SELECT %s || g, %s FROM generate_series(1, %s) g", (prefix, status, count))
        if bulk:
            conn.execute("RESET session_replication_role")
            conn.execute("SELECT pgqr.sync_instances()")


def _estimated_rows(db: Database, table: str) -> float:
    return float(db.value("SELECT reltuples FROM pg_class WHERE oid = %s::regclass", (table,)))  # type: ignore[arg-type]


def _webhook_scans(conn: psycopg.Connection[dict[str, object]], key: str, n: int) -> int:
    """Write one webhook QR for `key` through the write path; the sequential scans of instance_state and
    schedule it made (this transaction's own counters)."""
    result = {"key": key, "source": "webhook", "outcome": "qr", "md5": f"m{n}", "qr": f"data:image/png;base64,{n}"}

    def scans() -> int:  # this backend's counts not yet flushed to the shared statistics (they add up)
        row = conn.execute("SELECT pg_stat_get_xact_numscans('pgqr.instance_state'::regclass) "
                           "     + pg_stat_get_xact_numscans('pgqr.schedule'::regclass) AS n").fetchone()
        assert row is not None
        return int(row["n"])  # type: ignore[call-overload]

    with conn.transaction():
        before = scans()
        [row] = conn.execute("SELECT * FROM pgqr.record_results('test', %s::jsonb)", (json.dumps([result]),)).fetchall()
        assert row["written"] and row["qr_updated"]
        return scans() - before


def test_a_connection_planned_on_small_tables_stops_scanning_them_once_the_tick_analyzed_them(quiet: Database
                                                                                           ) -> None:
    _no_autovacuum(quiet)
    _add_rows(quiet, "small-", 20, bulk=False)
    quiet.value("SELECT pgqr.tick()")
    key = str(quiet.value("SELECT key FROM pgqr.instance_state WHERE name = 'small-1'"))
    with quiet.connect() as conn:  # the sidecar's long-lived connection: its plans are cached
        for n in range(8):
            _webhook_scans(conn, key, n)
        _add_rows(quiet, "big-", GROWN, bulk=True)
        assert _estimated_rows(quiet, "pgqr.instance_state") < GROWN
        # positive control: the plans made for 20 rows read all of them, 3,000 now, on every write
        assert _webhook_scans(conn, key, 100) > 0
        quiet.value("SELECT pgqr.tick()")
        assert _estimated_rows(quiet, "pgqr.instance_state") >= GROWN
        assert _estimated_rows(quiet, "pgqr.schedule") >= GROWN
        assert _webhook_scans(conn, key, 101) == 0
    # analyzed once: the next tick finds nothing outgrown
    assert quiet.query("SELECT t::text FROM pgqr.analyze_grown() t") == []


def test_a_table_someone_holds_is_left_to_them_and_the_tick_goes_on(quiet: Database) -> None:
    _no_autovacuum(quiet)
    _add_rows(quiet, "big-", GROWN, bulk=True)
    with quiet.connect() as holder, quiet.connect() as conn:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE pgqr.instance_state IN SHARE UPDATE EXCLUSIVE MODE")  # what VACUUM holds
        conn.execute("LISTEN pgqr_refresh")
        conn.execute("SET statement_timeout = '20s'")  # a tick that waited would fail here, not hang the suite
        conn.execute("SELECT pgqr.tick()")
        assert [n.channel for n in conn.notifies(timeout=10, stop_after=1)] == ["pgqr_refresh"]
        assert _estimated_rows(quiet, "pgqr.instance_state") < GROWN
        assert _estimated_rows(quiet, "pgqr.schedule") >= GROWN  # the table nobody held was analyzed
        holder.execute("ROLLBACK")
        # positive control: released, it is analyzed by the next tick
        conn.execute("SELECT pgqr.tick()")
    assert _estimated_rows(quiet, "pgqr.instance_state") >= GROWN


def test_a_role_that_does_not_own_pgqrs_tables_analyzes_nothing_and_sees_no_error(quiet: Database) -> None:
    _no_autovacuum(quiet)
    _add_rows(quiet, "big-", GROWN, bulk=True)
    quiet.query("DROP ROLE IF EXISTS pgqr_stranger")
    quiet.query("CREATE ROLE pgqr_stranger")
    quiet.query("GRANT USAGE ON SCHEMA pgqr TO pgqr_stranger")
    try:
        with quiet.connect() as conn:
            conn.execute("SET ROLE pgqr_stranger")
            notices: list[str] = []
            conn.add_notice_handler(lambda d: notices.append(str(d.message_primary)))
            assert conn.execute("SELECT t::text AS t FROM pgqr.analyze_grown() t").fetchall() == []
            assert notices == []
        assert _estimated_rows(quiet, "pgqr.instance_state") < GROWN
        # positive control: the owner analyzes the same tables
        assert {"pgqr.instance_state", "pgqr.schedule"} <= {
            str(r["t"]) for r in quiet.query("SELECT t::text AS t FROM pgqr.analyze_grown() t")}
    finally:
        quiet.query("DROP OWNED BY pgqr_stranger")
        quiet.query("DROP ROLE pgqr_stranger")


async def test_the_sidecar_analyzes_what_an_import_outgrew_within_a_heartbeat(env: Env) -> None:
    _no_autovacuum(env.db)
    async with running_service(env.settings(heartbeat_seconds=0.2)):
        # the app's own INSERT (connected rows: nothing to poll), and no tick in sight
        _add_rows(env.db, "big-", GROWN, bulk=False, status="open")
        await wait_until(lambda: _estimated_rows(env.db, "pgqr.instance_state") >= GROWN, 30,
                         "the heartbeat's ANALYZE of pgqr.instance_state")
