"""What a Supabase Realtime subscriber to the app's table receives from pgqr: the table read through logical
decoding (a test_decoding slot on a server with wal_level = logical, the stream Realtime's postgres_changes come
from) while `pgqr run` polls the simulator and takes its webhooks. Each new QR is one UPDATE of the app's row,
carrying the bound QR, QR time and expiry columns; a poll or a webhook that brings the image the row already holds
sends nothing."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import psycopg
import pytest
from conftest import Database, run_pgqr
from service_fixtures import Env, running_service, settled, wait_until

from pgqr import devdb, migrations
from pgqr.service import Service
from pgqr.settings import Secret
from pgqr.simulator import Simulator, WebhookDelivery

SLOT = "pgqr_realtime_test"
BOUND = ("qr_code", "last_qr_update", "qr_expires_at")  # what the binding writes for a new QR
SECRET = "realtime-webhook-secret"
ROTATIONS = 3
UNCHANGED = 3  # polls of the same image before each rotation

CHANGE = re.compile(r"table public\.evolution_instances: (INSERT|UPDATE|DELETE): (.*)", re.DOTALL)
COLUMN = re.compile(r"(\w+)\[[^\]]+\]:('(?:[^']|'')*'|\S+)")  # name[type]:'quoted' or null, 42, unchanged-toast-datum

_counter = itertools.count()


# ----------------------------------------------------------------------------------------- the decoded stream


def decoded_row(columns: str) -> dict[str, str | None]:
    """test_decoding's columns as text, the way psql would show them (NULL as None)."""
    row: dict[str, str | None] = {}
    for name, value in COLUMN.findall(columns):
        row[name] = None if value == "null" else value[1:-1].replace("''", "'") if value.startswith("'") else value
    return row


class Slot:
    """A temporary test_decoding slot on one database, read from a connection of its own (the slot goes with it)."""

    def __init__(self, dsn: str) -> None:
        # a synchronous commit flushes the WAL, and a slot decodes flushed WAL only (the server's default is off)
        self.conn = psycopg.connect(dsn, autocommit=True, options="-c synchronous_commit=on")
        self.conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding', true)", (SLOT,))

    def updates(self) -> list[dict[str, str | None]]:
        """The app's rows as UPDATEd by every transaction committed since the last read, in commit order."""
        # a transactional message committed here moves the flushed WAL past every commit made before this read
        self.conn.execute("SELECT pg_logical_emit_message(true, 'pgqr-test', 'read')")
        rows = self.conn.execute("SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL, 'skip-empty-xacts', "
                                 "'1')", (SLOT,)).fetchall()
        return [decoded_row(m[2]) for (data,) in rows if (m := CHANGE.fullmatch(data)) and m[1] == "UPDATE"]

    def bound(self, name: str) -> dict[str, str | None]:
        """The bound columns of the app's row as they are now, as text in this session (the decoder's formats)."""
        cur = self.conn.execute("SELECT qr_code, last_qr_update::text, qr_expires_at::text "
                                "FROM public.evolution_instances WHERE instance_name = %s", (name,))
        row = cur.fetchone()
        assert row is not None, f"no app row {name}"
        return dict(zip(BOUND, row, strict=True))

    def drop(self) -> None:
        with self.conn:
            self.conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                              "WHERE slot_name = %s", (SLOT,))


@contextmanager
def decoding(dsn: str) -> Iterator[Slot]:
    slot = Slot(dsn)
    try:
        yield slot
    finally:
        slot.drop()  # a slot left behind would hold the server's WAL


def one_update(slot: Slot, name: str) -> dict[str, str | None]:
    """The one UPDATE decoded since the last read: the named row, carrying its bound columns as they are now."""
    [update] = slot.updates()
    assert update["instance_name"] == name
    assert {c: update[c] for c in BOUND} == slot.bound(name)
    assert all(update[c] is not None for c in BOUND) and str(update["qr_code"]).startswith("data:image/png;base64,")
    return update


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def logical_server() -> Iterator[devdb.DevServer]:
    with devdb.running(cron_database="postgres", logical=True) as server:
        yield server


@pytest.fixture(scope="module")
def realtime_template(logical_server: devdb.DevServer) -> str:
    """pgqr installed once, its binding also writing the QR's expiry into a column the app added for its page."""
    name = "realtime_template"
    with psycopg.connect(logical_server.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    migrations.migrate(logical_server.dsn(name))
    with psycopg.connect(logical_server.dsn(name), autocommit=True) as conn:
        conn.execute("ALTER TABLE public.evolution_instances ADD COLUMN qr_expires_at timestamptz")
    bound = run_pgqr("bind", "--qr-expires-column", "qr_expires_at", env={"DATABASE_URL": logical_server.dsn(name)})
    assert bound.returncode == 0, bound.stderr
    with psycopg.connect(logical_server.dsn(), autocommit=True) as conn:
        conn.execute("DELETE FROM cron.job WHERE database = %s", (name,))  # no pg_cron tick: the test ticks
    return name


@pytest.fixture
def env(logical_server: devdb.DevServer, realtime_template: str, simulator: Simulator) -> Env:
    """A clone of the template on the logical server, beside the simulator (this module's own `env`)."""
    name = f"realtime_{next(_counter)}"
    with psycopg.connect(logical_server.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                     (realtime_template,))
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{realtime_template}"')
    env = Env(Database(logical_server, name), simulator)
    env.set("slow_connect_ms", "40")  # as service_fixtures' env: the simulator's close branch sleeps 50 ms
    return env


async def poll_now(env: Env, service: Service, name: str) -> None:
    """Make the instance due, tick as pg_cron would (NOTIFY), and wait until the poll is written back."""
    calls = env.sim.stats(name).connect_calls
    env.make_due(name)
    env.tick()
    await settled(service)
    assert env.sim.stats(name).connect_calls > calls  # the poll really happened


def poll_counts(env: Env) -> dict[str, Any]:
    """pgqr's own count of its polls: all of them, those that found a QR, and those that stored a new one."""
    [row] = env.db.query("SELECT sum(results)::int AS polls, (sum(results) FILTER (WHERE outcome = 'qr'))::int AS qr, "
                         "sum(qr_updates)::int AS new FROM pgqr.refresh_counts WHERE source = 'poll'")
    return row


def qr_hook(name: str) -> Callable[[WebhookDelivery], bool]:
    """A QR webhook for `name` that pgqr answered 200 (it answers once the write is done)."""
    return lambda d: d.body["instance"] == name and d.body["event"] == "qrcode.updated" and d.status == 200


# ------------------------------------------------------------------------------------------------------ tests


async def test_each_polled_qr_reaches_a_subscriber_as_one_update_and_an_unchanged_poll_as_none(env: Env) -> None:
    with decoding(env.db.dsn) as slot:
        async with running_service(env.settings(fallback_seconds=3600.0)) as service:
            env.add("shop")
            await wait_until(lambda: env.has_qr("shop"), 15, "the first QR")
            await settled(service)
            seen = [one_update(slot, "shop")]
            for _ in range(ROTATIONS):
                for _ in range(UNCHANGED):
                    await poll_now(env, service, "shop")
                    assert slot.updates() == []  # Evolution showed the image the row holds: nothing to send
                env.sim.rotate("shop")
                await poll_now(env, service, "shop")
                seen.append(one_update(slot, "shop"))
        # every UPDATE brought a QR and an expiry of its own
        assert len({u["qr_code"] for u in seen}) == len({u["qr_expires_at"] for u in seen}) == ROTATIONS + 1
        # positive control: the polls of an unchanged image happened (pgqr counted them, as the simulator did)
        counts = poll_counts(env)
        assert counts["polls"] == env.sim.stats("shop").connect_calls
        assert counts["new"] == ROTATIONS + 1 and counts["qr"] - counts["new"] >= ROTATIONS * UNCHANGED
        # and the slot shows a rewrite with the image the row holds: had pgqr made one, it would have been seen.
        # It carries no image: a 13 KB data URL is stored out of line, and only a changed one is decoded
        env.db.query("UPDATE public.evolution_instances SET qr_code = qr_code WHERE instance_name = 'shop'")
        [rewrite] = slot.updates()
        assert rewrite["qr_code"] == "unchanged-toast-datum"


async def test_a_webhook_qr_is_one_update_and_neither_a_poll_nor_a_retried_webhook_of_it_sends_another(
        env: Env) -> None:
    settings = env.settings(http_port=0, webhook_secret=Secret(SECRET), fallback_seconds=3600.0)
    with decoding(env.db.dsn) as slot:
        async with running_service(settings) as service:
            url = f"http://127.0.0.1:{service.http_port}/webhooks/evolution/{SECRET}"
            env.sim.config.global_webhook_url = url
            # the first image comes by the first poll and by Evolution's webhook too: one UPDATE
            env.add("shop")
            [first] = await env.sim.wait_for_webhooks(qr_hook("shop"), timeout=15)
            await wait_until(lambda: env.has_qr("shop"), 15, "the first QR")
            await settled(service)
            assert one_update(slot, "shop")["qr_code"] == first.body["data"]["qrcode"]["base64"]
            assert env.sim.stats("shop").connect_calls >= 1
            # a rotation arrives by webhook
            env.sim.rotate("shop")
            *_, rotated = await env.sim.wait_for_webhooks(qr_hook("shop"), n=2, timeout=15)
            await settled(service)
            assert one_update(slot, "shop")["qr_code"] == rotated.body["data"]["qrcode"]["base64"]
            # the poll that finds that image, and the same webhook delivered again, write nothing
            await poll_now(env, service, "shop")
            assert slot.updates() == []
            assert await post(url, rotated) == (200, {"recorded": True, "qr_updated": False})
            assert slot.updates() == []
        # positive control: pgqr took a QR from each webhook (the retry too) and from at least two polls, and stored
        # two of them
        counts = {r["source"]: (r["results"], r["new"]) for r in env.db.query(
            "SELECT source::text, sum(results)::int AS results, sum(qr_updates)::int AS new FROM pgqr.refresh_counts "
            "WHERE outcome = 'qr' GROUP BY source")}
        assert counts["webhook"][0] >= 3 and counts["poll"][0] >= 2
        assert counts["webhook"][1] + counts["poll"][1] == 2


async def post(url: str, delivery: WebhookDelivery) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.post(url, json=delivery.body) as resp:
        return resp.status, await resp.json()
