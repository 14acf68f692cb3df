"""A quiet neighbour (0010): an unchanged poll writes nothing durable and no log row, every result is counted, an
app row is never rewritten with what it holds, the scheduling state comes back by itself after a crash, and at
100,000 rows the hot path reads indexes, not every row."""

from __future__ import annotations

import asyncio
import json

import psycopg
import pytest
from conftest import Database
from service_fixtures import Env, running_service, wait_until

from pgqr import devdb, migrations
from pgqr.settings import Secret, Settings
from pgqr.simulator import SimConfig, Simulator

pytestmark = pytest.mark.usefixtures("no_cron_ticks")


def durable_version(env: Env, name: str) -> tuple[str, str]:
    """The xmin (the transaction that last wrote) of pgqr's durable row and of the app's row for `name`."""
    [row] = env.db.query("SELECT s.xmin::text AS state, e.xmin::text AS app FROM pgqr.instance_state s "
                         "JOIN public.evolution_instances e ON e.id::text = s.key WHERE s.name = %s", (name,))
    return str(row["state"]), str(row["app"])


async def test_an_unchanged_poll_writes_no_durable_row_and_no_log_row_but_is_counted(env: Env) -> None:
    env.add("shop")
    await env.reconcile()
    before = durable_version(env, "shop")
    log_rows = len(env.log("shop"))
    for _ in range(3):
        env.make_due("shop")
        assert [r.outcome for r in (await env.reconcile()).results] == ["qr_unchanged"]
    assert durable_version(env, "shop") == before
    assert len(env.log("shop")) == log_rows
    # every call is counted: the rollup equals what the simulator saw
    assert env.db.value("SELECT sum(results) FROM pgqr.refresh_counts WHERE source = 'poll'") \
        == env.sim.stats("shop").connect_calls == 4
    # the poll narrowed the estimate in the schedule; the estimate served takes it
    assert env.db.value("SELECT q.qr_alive_at IS NOT NULL FROM pgqr.schedule q") is True
    # positive control: a new image writes both rows and logs it
    env.sim.rotate("shop")
    env.make_due("shop")
    assert [r.outcome for r in (await env.reconcile()).results] == ["qr_stored"]
    after = durable_version(env, "shop")
    assert after[0] != before[0] and after[1] != before[1]
    assert len(env.log("shop")) == log_rows + 1


async def test_the_first_poll_does_not_rewrite_the_qr_the_app_row_already_holds(env: Env) -> None:
    env.add("shop")
    await env.reconcile()
    qr = env.row("shop")["qr_code"]
    # pgqr forgets the image (as after a restart of the row's wait): the next poll brings what the row holds
    env.db.query("UPDATE pgqr.instance_state SET qr_md5 = NULL")
    before = durable_version(env, "shop")[1]
    env.make_due("shop")
    await env.reconcile()
    assert env.row("shop")["qr_code"] == qr
    assert durable_version(env, "shop")[1] == before  # the app's row was not written (its triggers did not fire)
    # positive control: another image is written
    env.sim.rotate("shop")
    env.make_due("shop")
    await env.reconcile()
    assert env.row("shop")["qr_code"] != qr and durable_version(env, "shop")[1] != before


def _valid(dsn: str, names: list[str], since: dict[str, str]) -> bool:
    """Every instance waits with a valid QR that differs from the one it had in `since`."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = dict(conn.execute("SELECT instance_name, qr_code FROM public.evolution_instances").fetchall())
        valid = conn.execute("SELECT qr_valid = waiting AND waiting = %s FROM pgqr.freshness",
                             (len(names),)).fetchone()
    return bool(valid and valid[0]) and all(rows.get(n) and rows[n] != since.get(n) for n in names)


async def test_after_an_immediate_stop_every_instance_is_served_again_without_a_tick() -> None:
    # QRs that rotate every 6 s: serving them again takes polls scheduled by the rebuilt schedule
    sim = Simulator(SimConfig(qr_ttl=6, connect_sleep=0.02, first_qr_delay=0.01))
    await sim.start("127.0.0.1", 0)
    names = [f"crash-{i}" for i in range(5)]
    try:
        with devdb.running(cron_database="postgres") as server:
            dsn = server.dsn("postgres")
            migrations.migrate(dsn)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("UPDATE cron.job SET active = false")  # no tick may rebuild anything
                conn.execute("UPDATE pgqr.settings SET value = '6' WHERE key = 'qr_lifetime_seconds'")
                for name in names:
                    token = sim.add_instance(name)
                    conn.execute("INSERT INTO public.evolution_instances (instance_name, instance_token, "
                                 "instance_status) VALUES (%s, %s, 'connecting')", (name, token))
            settings = Settings(database_url=Secret(dsn), evolution_api_url=Secret(sim.base_url),
                                http_timeout=2.0, heartbeat_seconds=0.5, fallback_seconds=3600.0)
            async with running_service(settings):
                await wait_until(lambda: _valid(dsn, names, {}), 60, "a valid QR for every instance")
                with psycopg.connect(dsn, autocommit=True) as conn:
                    built = conn.execute("SELECT at FROM pgqr.schedule_built").fetchone()
                await asyncio.to_thread(server.stop, "immediate")
                await asyncio.to_thread(server.start)
                with psycopg.connect(dsn, autocommit=True) as conn:
                    # the app's table is intact; what survived is what pgqr keeps durably
                    seen = dict(conn.execute("SELECT instance_name, qr_code FROM public.evolution_instances")
                                .fetchall())
                    assert sorted(seen) == names and all(seen.values())
                    assert conn.execute("SELECT count(*) FROM pgqr.instance_state WHERE waiting").fetchone() == (5,)
                    ticks = conn.execute("SELECT count(*) FROM pgqr.ticks").fetchone()
                # every instance gets new images again, from polls the rebuilt schedule planned
                await wait_until(lambda: _valid(dsn, names, seen), 90, "new valid QRs after the crash")
                with psycopg.connect(dsn, autocommit=True) as conn:
                    # the schedule was lost with the crash and built again, by `pgqr run` itself
                    rebuilt = conn.execute("SELECT at FROM pgqr.schedule_built").fetchone()
                    assert built is not None and rebuilt is not None and rebuilt[0] > built[0]
                    assert conn.execute("SELECT count(*) FROM pgqr.ticks").fetchone() == ticks
    finally:
        await sim.stop()


# ------------------------------------------------------------------------------------------- at 100,000 rows

BIG = 100_000
WAITING = 10_000


@pytest.fixture
def big(quiet: Database) -> Database:
    """The app's table with 100,000 rows, 10,000 of them waiting, loaded the way a bulk load would (triggers off)
    and taken in by the tick's sync."""
    with quiet.connect() as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("INSERT INTO public.evolution_instances (instance_name, instance_status) "
                     "SELECT 'big-' || g, CASE WHEN g <= %s THEN 'connecting' ELSE 'open' END "
                     "FROM generate_series(1, %s) g", (WAITING, BIG))
        conn.execute("RESET session_replication_role")
        conn.execute("SELECT pgqr.sync_instances()")
        conn.execute("ANALYZE public.evolution_instances")
        conn.execute("ANALYZE pgqr.instance_state")
        conn.execute("ANALYZE pgqr.schedule")
    return quiet


def seq_scans(conn: psycopg.Connection[dict[str, object]]) -> dict[str, int]:
    """Sequential scans so far of every table with 100,000 rows."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = conn.execute("SELECT schemaname || '.' || relname AS t, seq_scan FROM pg_stat_user_tables "
                        "WHERE n_live_tup >= %s OR relname IN ('schedule', 'instance_state', 'evolution_instances')",
                        (BIG // 2,)).fetchall()
    return {str(r["t"]): int(r["seq_scan"]) for r in rows}  # type: ignore[call-overload]


def test_at_100000_rows_claim_next_due_and_write_back_scan_no_table(big: Database) -> None:
    assert big.value("SELECT count(*) FROM pgqr.schedule WHERE due_at IS NOT NULL") == WAITING
    with big.connect() as conn:
        before = seq_scans(conn)
        claimed = conn.execute("SELECT key, claim_id FROM pgqr.claim('big', 64, interval '30 seconds')").fetchall()
        conn.execute("SELECT pgqr.next_due_in()")
        results = [{"key": r["key"], "source": "poll", "outcome": "qr", "md5": f"m{i}",
                    "qr": f"data:image/png;base64,Q{i}", "latency_ms": 100, "claim_id": r["claim_id"]}
                   for i, r in enumerate(claimed)]
        written = conn.execute("SELECT * FROM pgqr.record_results('big', %s::jsonb)", (json.dumps(results),)).fetchall()
        after = seq_scans(conn)
    assert len(claimed) == 64 and all(w["written"] for w in written)
    assert {t: after[t] - before[t] for t in before} == {t: 0 for t in before}
    # positive control: counting every waiting row does scan
    with big.connect() as conn:
        before = seq_scans(conn)
        conn.execute("SELECT count(*) FROM pgqr.instance_state WHERE waiting")
        after = seq_scans(conn)
    assert after["pgqr.instance_state"] - before["pgqr.instance_state"] == 1
