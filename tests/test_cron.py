"""pg_cron in the application's own database, and the one test that waits for a real pg_cron minute."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest

from pgqr import devdb, migrations


@pytest.fixture(scope="module")
def same_db_server() -> Iterator[str]:
    """A server whose pg_cron lives in the database pgqr is installed in (the Supabase layout)."""
    with devdb.running(cron_database="postgres") as server:
        migrations.migrate(server.dsn("postgres"))
        yield server.dsn("postgres")


def test_tick_job_runs_every_minute_and_is_active(same_db_server: str) -> None:
    with psycopg.connect(same_db_server) as conn:
        rows = conn.execute("SELECT schedule, active FROM cron.job WHERE jobname = 'pgqr-tick'").fetchall()
    assert rows == [("* * * * *", True)]


def test_tick_records_a_tick_and_notifies_its_id(same_db_server: str) -> None:
    with psycopg.connect(same_db_server, autocommit=True) as listener, psycopg.connect(same_db_server) as conn:
        listener.execute("LISTEN pgqr_refresh")
        tick_id = conn.execute("SELECT pgqr.tick()").fetchone()
        conn.commit()
        payloads = [json.loads(n.payload) for n in listener.notifies(timeout=5, stop_after=1)]
    assert tick_id is not None
    assert payloads[0]["tick"] == tick_id[0]
    assert "at" in payloads[0]


@pytest.mark.slow
def test_a_real_pg_cron_minute_delivers_the_tick_notification(same_db_server: str) -> None:
    with psycopg.connect(same_db_server, autocommit=True) as listener:
        listener.execute("LISTEN pgqr_refresh")
        received = list(listener.notifies(timeout=75, stop_after=1))
        assert len(received) == 1, "pg_cron did not tick within 75 s"
        payload = json.loads(received[0].payload)
        row = listener.execute("SELECT id FROM pgqr.ticks WHERE id = %s", (payload["tick"],)).fetchone()
        assert row == (payload["tick"],)
