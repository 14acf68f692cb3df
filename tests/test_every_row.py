"""Evolution's state for every bound row (issue 21): a table without a status column, and connected instances that
drop. Real PostgreSQL with pg_cron, the simulator on loopback, the sidecar in this event loop, Chromium for the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from conftest import Database, run_pgqr
from playwright.async_api import Browser, async_playwright, expect
from service_fixtures import Env, running_service, wait_until
from test_adopt import SUPABASE, UPDATED_AT, rls_policies
from test_page import CHROMIUM_ARGS, LINK_SECRET, SLOW, link, open_page

from pgqr import db as pgqr_db
from pgqr.devdb import free_port
from pgqr.evolution import EvolutionClient
from pgqr.metrics import Metrics
from pgqr.settings import Secret, Settings
from pgqr.simulator import Simulator
from pgqr.sweep import Sweep

# The eighth app's table (a Supabase app): uuid key, RLS per user, names unique per user, the token in api_key, a
# per-row base_url, a phone, an active flag, an updated_at trigger; no status column and no QR column.
STATUSLESS = SUPABASE + UPDATED_AT + """
CREATE TABLE public.evolution_instances (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id       uuid NOT NULL DEFAULT auth.uid(),
    instance_name text NOT NULL,
    api_key       text,
    base_url      text,
    phone_number  text,
    active        boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, instance_name)
);
CREATE TRIGGER evolution_instances_updated_at BEFORE UPDATE ON public.evolution_instances
    FOR EACH ROW EXECUTE FUNCTION public.touch_updated_at();
""" + rls_policies("public.evolution_instances")

STATUSLESS_FLAGS = ("--table", "public.evolution_instances", "--name-column", "instance_name", "--status-column",
                    "none", "--token-column", "api_key", "--url-column", "base_url", "--qr-column", "none",
                    "--qr-at-column", "none", "--pairing-column", "none")


def statusless(db: Database, sim: Simulator, *, create: bool = True) -> Env:
    if create:
        db.query(STATUSLESS)
    result = run_pgqr("migrate", *STATUSLESS_FLAGS, env={"DATABASE_URL": db.dsn})
    assert result.returncode == 0, result.stderr
    assert "no status column (waiting while Evolution says connecting)" in result.stdout
    db.pause_cron()
    env = Env(db, sim)
    env.set("slow_connect_ms", "40")
    return env


def app_row(env: Env, name: str) -> dict[str, Any]:
    return env.db.query("SELECT e.*, e.xmin::text AS version FROM public.evolution_instances e "
                        "WHERE instance_name = %s", (name,))[0]


def add_statusless(env: Env, name: str, token: str) -> str:
    env.db.query("INSERT INTO public.evolution_instances (user_id, instance_name, api_key, base_url) "
                 "VALUES (gen_random_uuid(), %s, %s, %s)", (name, token, env.sim.base_url))
    return str(app_row(env, name)["id"])


def state_of(env: Env, key: str) -> dict[str, Any]:
    return env.db.query("SELECT s.*, q.due_at, q.state_checked_at FROM pgqr.instance_state s "
                        "LEFT JOIN pgqr.schedule q USING (key) WHERE s.key = %s", (key,))[0]


def observe(env: Env, key: str, state: str, *, source: str = "sweep", checked: bool = False,
            reason: str | None = None) -> list[dict[str, Any]]:
    return env.db.query("SELECT pgqr.observe('test', %s::jsonb)", (json.dumps(
        [{"key": key, "state": state, "source": source, "checked": checked, "reason": reason}]),))


@pytest.fixture
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


# -- a table without a status column -------------------------------------------------------------------------


async def test_a_statusless_table_binds_and_a_connecting_instance_gets_its_qr_and_page_without_any_app_write(
        db: Database, simulator: Simulator, chromium: Browser) -> None:
    env = statusless(db, simulator)
    token = simulator.add_instance("shop", state="close")
    key = add_statusless(env, "shop", token)
    before = app_row(env, "shop")
    settings = env.settings(http_port=0, link_secret=Secret(LINK_SECRET), fallback_seconds=3600.0)
    async with running_service(settings) as service:
        await service.sweep.sweep_once()
        assert state_of(env, key)["evolution_state"] == "close"  # read, and nothing polled: it is not waiting
        assert not state_of(env, key)["waiting"]
        # the app (not pgqr) asks Evolution for a QR: the instance turns connecting
        async with aiohttp.ClientSession() as http, http.get(
                f"{simulator.base_url}/instance/connect/shop", headers={"apikey": token}) as reply:
            assert reply.status == 200
        await service.sweep.sweep_once()
        await wait_until(lambda: state_of(env, key)["qr"] is not None, 15, "the QR in pgqr.instance_state")
        qr = state_of(env, key)["qr"]
        assert pgqr_db.image_md5(qr) == simulator.current()["shop"]["md5"]  # Evolution's current image
        assert state_of(env, key)["waiting"]
        page = await open_page(chromium, link(service, key))
        await expect(page.locator("#qr")).to_have_attribute("src", qr, timeout=SLOW)
        health = env.db.query("SELECT * FROM pgqr.instance_health WHERE instance_key = %s", (key,))[0]
        assert (health["waiting"], health["has_qr"], health["evolution_state"]) == (True, True, "connecting")
    after = app_row(env, "shop")
    assert after["version"] == before["version"] and after["updated_at"] == before["updated_at"]
    shown = run_pgqr("status", env={"DATABASE_URL": db.dsn})
    assert shown.returncode == 0, shown.stderr
    assert any(line.startswith("shop") and "evolution: connecting" in line for line in shown.stdout.splitlines())


async def test_a_statusless_row_learns_connecting_from_a_webhook_at_once(db: Database, simulator: Simulator) -> None:
    env = statusless(db, simulator)
    token = simulator.add_instance("cafe", state="close")
    key = add_statusless(env, "cafe", token)
    secret = "wh-secret-every-row"
    settings = env.settings(http_port=0, webhook_secret=Secret(secret), fallback_seconds=3600.0)
    async with running_service(settings) as service:
        simulator.config.global_webhook_url = f"http://127.0.0.1:{service.http_port}/webhooks/evolution/{secret}"
        simulator.start_socket(simulator.get("cafe"), None)  # connecting, then qrcode.updated, pushed
        await wait_until(lambda: state_of(env, key)["qr"] is not None, 15, "the webhook's QR")
        assert state_of(env, key)["evolution_state"] == "connecting"
        simulator.scan("cafe")
        await wait_until(lambda: state_of(env, key)["evolution_state"] == "open", 15, "open")
        await wait_until(lambda: not state_of(env, key)["waiting"], 15, "no longer waiting")


async def test_a_statusless_poll_reads_the_state_first_and_never_connects_a_closed_instance(
        db: Database, simulator: Simulator) -> None:
    env = statusless(db, simulator)
    token = simulator.add_instance("shut", state="connecting")
    key = add_statusless(env, "shut", token)
    observe(env, key, "connecting")  # pgqr last heard `connecting`; Evolution closed since, silently
    assert state_of(env, key)["waiting"]
    simulator.close_instance("shut")
    summary = await env.reconcile()
    assert [r.outcome for r in summary.results] == ["closed"]
    assert simulator.stats("shut").connect_calls == 0  # read connectionState, and stopped there
    assert simulator.stats("shut").state_calls == 1
    assert (state_of(env, key)["evolution_state"], state_of(env, key)["waiting"]) == ("close", False)


def test_a_statusless_binding_refuses_values_it_cannot_write(db: Database) -> None:
    db.query(STATUSLESS)
    result = run_pgqr("migrate", *STATUSLESS_FLAGS, "--disconnected-value", "close", env={"DATABASE_URL": db.dsn})
    assert result.returncode == 2
    assert result.stderr.strip() == ("pgqr: cannot bind: the gave-up and disconnected values need a status column "
                                     "to be written to")


# -- connected instances that drop ---------------------------------------------------------------------------


def connected_env(migrated: Database, simulator: Simulator, *, disconnected: str | None = "close") -> Env:
    args = ("--disconnected-value", disconnected) if disconnected else ("--disconnected-value", "none")
    result = run_pgqr("bind", *args, env={"DATABASE_URL": migrated.dsn})
    assert result.returncode == 0, result.stderr
    migrated.pause_cron()
    env = Env(migrated, simulator)
    env.set("disconnect_after_seconds", "0")
    return env


def status(env: Env, name: str) -> str:
    return str(env.db.value("SELECT instance_status FROM public.evolution_instances WHERE instance_name = %s",
                            (name,)))


async def test_a_connected_row_is_written_disconnected_after_a_logout_webhook(migrated: Database,
                                                                             simulator: Simulator) -> None:
    env = connected_env(migrated, simulator)
    env.set("disconnect_after_seconds", "600")  # a logout needs no hold: Evolution never reconnects from it
    env.add("shop", sim_state="open", status="connected")
    env.add("cafe", sim_state="open", status="connected")  # the positive control's neighbour: left alone
    secret = "wh-secret-logout"
    settings = env.settings(http_port=0, webhook_secret=Secret(secret), fallback_seconds=3600.0)
    async with running_service(settings) as service:
        simulator.config.global_webhook_url = f"http://127.0.0.1:{service.http_port}/webhooks/evolution/{secret}"
        simulator.logout(simulator.get("shop"))
        await wait_until(lambda: status(env, "shop") == "close", 20, "the disconnected value")
    assert status(env, "cafe") == "connected"
    row = env.row("shop")
    assert (row["evolution_state"], row["evolution_reason"]) == ("close", "logged_out")
    assert row["dropped_at"] is not None
    logged = [r for r in env.log("shop") if r["source"] == "sweep"]
    assert [(r["outcome"], r["written"], r["detail"]) for r in logged] == [
        ("closed", True, "dropped: Evolution says close (logged_out); wrote 'close'")]


async def test_a_sweep_finds_a_dropped_connection_and_confirms_it_before_writing(migrated: Database,
                                                                                 simulator: Simulator) -> None:
    env = connected_env(migrated, simulator)
    env.set("disconnect_after_seconds", "60")
    env.add("shop", sim_state="open", status="connected")
    env.add("cafe", sim_state="open", status="connected")
    async with swept(env, evolution_api_key=Secret(simulator.config.api_key)) as sweep:
        await sweep.sweep_once()
        assert env.row("shop")["evolution_state"] == "open"
        simulator.close_instance("shop", 428)  # a final close that is not a logout: it must hold first
        await sweep.sweep_once()  # fetchInstances lists it closed; connectionState agrees
        assert (env.row("shop")["evolution_state"], env.row("shop")["drop_pending_since"] is not None) == (
            "close", True)
        await sweep.confirm_once(0.0)
        assert status(env, "shop") == "connected"  # not yet: it has not held for a minute
        key = str(env.row("shop")["key"])
        env.db.query("UPDATE pgqr.instance_state SET evolution_state_at = evolution_state_at - interval "
                     "'61 seconds' WHERE key = %s", (key,))
        env.db.query("UPDATE pgqr.schedule SET state_checked_at = state_checked_at - interval '61 seconds' "
                     "WHERE key = %s", (key,))
        await sweep.confirm_once(100.0)  # a minute later: read once more, and it still says close
        assert status(env, "shop") == "close"
    assert status(env, "cafe") == "connected"
    assert [simulator.stats(name).connect_calls for name in ("shop", "cafe")] == [0, 0]


@asynccontextmanager
async def swept(env: Env, **settings: Any) -> AsyncIterator[Sweep]:
    """The sweep alone, driven by the test (no service: no sweep or confirmation of its own races the test)."""
    pool = pgqr_db.Pool(env.db.dsn, size=2)
    await pool.open()
    try:
        async with EvolutionClient(timeout=2.0) as client:
            yield Sweep(env.settings(**settings), pool, client, "test", Metrics())
    finally:
        await pool.close()


async def test_the_sweep_reads_only_and_never_calls_connect(migrated: Database, simulator: Simulator) -> None:
    env = connected_env(migrated, simulator)
    for name, state in (("a", "close"), ("b", "open"), ("c", "close")):
        env.add(name, sim_state=state, status="connected" if state == "open" else "close")  # type: ignore[arg-type]
    metrics = Metrics()
    for key in (None, Secret(simulator.config.api_key)):  # instance tokens only, then the global key
        async with swept(env, evolution_api_key=key) as sweep:
            sweep.metrics = metrics
            await sweep.sweep_once()
    for name in ("a", "b", "c"):
        assert (simulator.stats(name).connect_calls, simulator.stats(name).sockets_started) == (0, 0), name
    assert {r["instance_name"]: r["evolution_state"] for r in env.db.query(
        "SELECT instance_name, evolution_state FROM pgqr.instance_health")} == {"a": "close", "b": "open", "c": "close"}
    assert metrics.registry.get_sample_value("pgqr_sweep_calls_total", {"call": "fetchInstances"}) == 1
    # 3 reads one by one without the global key; with it, none (fetchInstances agrees with what pgqr holds)
    assert metrics.registry.get_sample_value("pgqr_sweep_calls_total", {"call": "connectionState"}) == 3


def test_the_disconnected_value_is_not_written_once_the_app_changed_the_row(migrated: Database,
                                                                           simulator: Simulator) -> None:
    env = connected_env(migrated, simulator)
    env.add("shop", sim_state=None, status="connected")
    env.add("cafe", sim_state=None, status="connected")
    keys = {n: str(env.row(n)["key"]) for n in ("shop", "cafe")}
    for key in keys.values():
        observe(env, key, "close", source="webhook", reason="logged_out")
    env.db.query("UPDATE public.evolution_instances SET instance_status = 'disabled' WHERE instance_name = 'shop'")
    for key in keys.values():
        observe(env, key, "close", checked=True)
    assert status(env, "shop") == "disabled"  # the app's later write wins
    assert status(env, "cafe") == "close"     # positive control: the same drop, the row untouched by the app
    assert env.row("shop")["dropped_at"] is not None
    assert env.log("shop")[-1]["detail"] == (
        "dropped: Evolution says close (logged_out); the row no longer holds the connected value")


def test_a_flapping_instance_is_not_written_disconnected(migrated: Database, simulator: Simulator) -> None:
    env = connected_env(migrated, simulator)
    env.set("disconnect_after_seconds", "60")
    env.add("shop", sim_state=None, status="connected")
    key = str(env.row("shop")["key"])
    observe(env, key, "open", checked=True)
    for _ in range(5):  # Evolution's reconnect loop: close (silent or not) and connecting, over and over
        observe(env, key, "close", source="webhook", reason="428")
        observe(env, key, "connecting", source="webhook")
        observe(env, key, "close", checked=True)
    assert env.row("shop")["drop_pending_since"] is not None
    assert status(env, "shop") == "connected"
    assert env.db.value("SELECT count(*) FROM pgqr.drops_to_confirm()") == 0  # not held for 60 s yet
    # positive control: a minute passes without another word from Evolution (the clock moved back instead), and
    # one more read confirms it
    env.db.query("UPDATE pgqr.instance_state SET evolution_state_at = evolution_state_at - interval '61 seconds' "
                 "WHERE key = %s", (key,))
    env.db.query("UPDATE pgqr.schedule SET state_checked_at = state_checked_at - interval '61 seconds' "
                 "WHERE key = %s", (key,))
    assert env.db.value("SELECT count(*) FROM pgqr.drops_to_confirm()") == 1
    observe(env, key, "close", checked=True)
    assert status(env, "shop") == "close"


async def test_a_reply_without_a_state_is_unknown_never_closed(migrated: Database, simulator: Simulator) -> None:
    env = connected_env(migrated, simulator)
    env.add("shop", sim_state="open", status="connected")
    key = str(env.row("shop")["key"])
    observe(env, key, "open", checked=True)
    simulator.set_mode("shop", "not_in_memory")
    async with swept(env) as sweep:
        await sweep.sweep_once()
    metrics = sweep.metrics
    assert metrics.registry.get_sample_value("pgqr_sweep_calls_total", {"call": "connectionState"}) == 1
    assert (env.row("shop")["evolution_state"], env.row("shop")["drop_pending_since"]) == ("open", None)
    assert status(env, "shop") == "connected"


def test_every_row_of_one_server_not_found_is_that_servers_problem(migrated: Database,
                                                                   simulator: Simulator) -> None:
    env = connected_env(migrated, simulator)
    for name in ("a", "b", "c"):
        env.add(name, sim_state=None, status="connected")
    keys = [str(env.row(n)["key"]) for n in ("a", "b", "c")]
    for key in keys:
        observe(env, key, "not_found", checked=True)
    assert [status(env, n) for n in ("a", "b", "c")] == ["connected"] * 3
    assert env.db.query("SELECT server, instances FROM pgqr.missing_servers()") == [
        {"server": "EVOLUTION_API_URL", "instances": 3}]
    fired = {r["rule"]: r for r in env.db.query("SELECT * FROM pgqr.check_alerts()")}
    assert fired["evolution_server_missing"]["state"] == "firing"
    assert fired["connections_dropped"]["state"] == "ok"
    # positive control: the server still knows one of them, so the others are gone indeed
    observe(env, keys[0], "open", checked=True)
    for key in keys[1:]:
        observe(env, key, "not_found", checked=True)
    assert [status(env, n) for n in ("a", "b", "c")] == ["connected", "close", "close"]
    assert env.db.query("SELECT * FROM pgqr.missing_servers()") == []


def test_the_connections_dropped_alert_fires_and_resolves(migrated: Database, simulator: Simulator) -> None:
    env = connected_env(migrated, simulator, disconnected=None)  # nothing written: pgqr still says so
    env.add("shop", sim_state=None, status="connected")
    key = str(env.row("shop")["key"])
    observe(env, key, "open", checked=True)
    assert {r["rule"]: r["state"] for r in env.db.query("SELECT * FROM pgqr.check_alerts()")}[
        "connections_dropped"] == "ok"
    observe(env, key, "close", source="webhook", reason="logged_out")
    observe(env, key, "close", checked=True)
    assert status(env, "shop") == "connected"  # no disconnected value bound
    health = env.db.query("SELECT * FROM pgqr.instance_health WHERE instance_key = %s", (key,))[0]
    assert (health["evolution_state"], health["evolution_reason"]) == ("close", "logged_out")
    assert health["dropped_at"] is not None and health["evolution_confirmed_at"] is not None
    fired = {r["rule"]: r for r in env.db.query("SELECT * FROM pgqr.check_alerts()")}["connections_dropped"]
    assert (fired["state"], fired["count"]) == ("firing", 1)
    assert fired["detail"].endswith(": shop")
    assert env.db.value("SELECT count(*) FROM pgqr.alert_deliveries WHERE rule = 'connections_dropped'") == 1
    observe(env, key, "open", source="webhook")  # the phone linked again
    resolved = {r["rule"]: r for r in env.db.query("SELECT * FROM pgqr.check_alerts()")}["connections_dropped"]
    assert resolved["state"] == "resolved"
    assert env.db.value("SELECT count(*) FROM pgqr.alert_deliveries WHERE rule = 'connections_dropped'") == 2


async def test_a_dropped_session_storm_from_the_simulator_writes_nothing(migrated: Database,
                                                                         simulator: Simulator) -> None:
    env = connected_env(migrated, simulator)
    env.set("disconnect_after_seconds", "6")  # twice the longest cycle of the simulator's reconnect loop
    env.add("shop", sim_state="open", status="connected")
    secret = "wh-secret-storm"
    settings = env.settings(http_port=0, webhook_secret=Secret(secret), fallback_seconds=3600.0)
    async with running_service(settings) as service, swept(env) as sweep:
        simulator.config.global_webhook_url = f"http://127.0.0.1:{service.http_port}/webhooks/evolution/{secret}"
        await sweep.sweep_once()
        assert env.row("shop")["evolution_state"] == "open"
        simulator.set_mode("shop", "flapping")  # the session dropped: Evolution's reconnect loop
        await wait_until(lambda: env.row("shop")["evolution_state"] == "connecting", 20, "the storm's webhooks")
        reads = 0
        started = asyncio.get_running_loop().time()
        while asyncio.get_running_loop().time() - started < 15:  # sweeps and confirmations in the storm
            await sweep.sweep_once()
            await sweep.confirm_once(asyncio.get_running_loop().time() + 1000 * reads)
            reads += 1
            await asyncio.sleep(0.5)
        assert simulator.stats("shop").state_calls >= reads  # every pass read Evolution's memory
        assert (status(env, "shop"), env.row("shop")["dropped_at"]) == ("connected", None)
        # positive control: the loop ends in a final close, which holds: the drop is written
        simulator.set_mode("shop", "normal")
        simulator.close_instance("shop", 428)
        await wait_until(lambda: env.row("shop")["evolution_state"] == "close", 20, "the final close's webhook")
        await asyncio.sleep(6.5)
        await sweep.confirm_once(asyncio.get_running_loop().time() + 10_000)
        assert status(env, "shop") == "close"


async def test_a_server_that_fails_its_listing_is_not_read_row_by_row(migrated: Database,
                                                                      simulator: Simulator) -> None:
    env = connected_env(migrated, simulator)
    for name in ("a", "b"):
        env.add(name, sim_state="open", status="connected")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: every call there fails with `network`
    for url in (dead, simulator.base_url):
        async with swept(env, evolution_api_url=Secret(url), evolution_api_key=Secret("not-the-global-key")) as s:
            await s.sweep_once()
        calls = s.calls()
        if url == dead:
            assert calls == {"fetchInstances": 1, "connectionState": 0}
        else:  # positive control: a key the server refuses is not a global key: each row is read with its token
            assert calls == {"fetchInstances": 1, "connectionState": 2}
    assert [env.row(n)["evolution_state"] for n in ("a", "b")] == ["open", "open"]


def test_a_sweeps_late_word_never_overwrites_a_newer_one(migrated: Database, simulator: Simulator) -> None:
    env = connected_env(migrated, simulator)
    env.add("shop", sim_state=None, status="connected")
    key = str(env.row("shop")["key"])
    observe(env, key, "open", checked=True)
    observe(env, key, "close", source="webhook", reason="logged_out")  # newer than the sweep's read below
    late = {"key": key, "state": "open", "source": "sweep", "checked": True, "expect": True, "expected": "open"}
    env.db.query("SELECT pgqr.observe('test', %s::jsonb)", (json.dumps([late]),))
    assert (env.row("shop")["evolution_state"], env.row("shop")["drop_pending_since"] is not None) == ("close", True)
    # positive control: decided on the state pgqr holds, the same read applies
    env.db.query("SELECT pgqr.observe('test', %s::jsonb)", (json.dumps([{**late, "expected": "close"}]),))
    assert (env.row("shop")["evolution_state"], env.row("shop")["drop_pending_since"]) == ("open", None)


def test_a_deleted_instance_keeps_its_reason_and_drops_though_alone_on_its_server(migrated: Database,
                                                                                  simulator: Simulator) -> None:
    env = connected_env(migrated, simulator)
    env.set("disconnect_after_seconds", "600")
    env.add("shop", sim_state=None, status="connected")
    key = str(env.row("shop")["key"])
    observe(env, key, "open", checked=True)
    observe(env, key, "close", source="webhook", reason="deleted")  # remove.instance
    observe(env, key, "not_found", checked=True)  # the confirming read: 404
    assert (env.row("shop")["evolution_state"], env.row("shop")["evolution_reason"]) == ("not_found", "deleted")
    assert status(env, "shop") == "close"


def test_a_superseded_polls_word_is_not_applied_to_the_renamed_row(migrated: Database,
                                                                   simulator: Simulator) -> None:
    env = connected_env(migrated, simulator)
    env.add("shop", sim_state=None, status="connecting")
    env.add("cafe", sim_state=None, status="connecting")
    claims = {r["name"]: r for r in env.db.query("SELECT * FROM pgqr.claim('test', 10, interval '60 s')")}
    env.db.query("UPDATE public.evolution_instances SET instance_name = 'shop-2' WHERE instance_name = 'shop'")
    results = [{"key": c["key"], "source": "poll", "outcome": "connected", "evolution_state": "open",
                "claim_id": c["claim_id"], "http_status": 200, "latency_ms": 5} for c in claims.values()]
    env.db.query("SELECT * FROM pgqr.record_results('test', %s::jsonb)", (json.dumps(results),))
    assert env.db.value("SELECT evolution_state FROM pgqr.instance_state WHERE name = 'shop-2'") is None
    assert env.db.value("SELECT evolution_state FROM pgqr.instance_state WHERE name = 'cafe'") == "open"  # control


async def test_the_global_key_goes_only_to_evolution_api_urls_server(migrated: Database,
                                                                     simulator: Simulator) -> None:
    env = connected_env(migrated, simulator)
    token = simulator.add_instance("shop", state="open")
    env.db.query("INSERT INTO public.evolution_instances (instance_name, instance_token, instance_status, "
                 "evolution_url) VALUES ('shop', %s, 'connected', %s)", (token, simulator.base_url))
    home = f"http://127.0.0.1:{free_port()}"  # EVOLUTION_API_URL: another server than the row's
    async with swept(env, evolution_api_url=Secret(home),
                     evolution_api_key=Secret(simulator.config.api_key)) as sweep:
        await sweep.sweep_once()
    calls = sweep.calls()
    assert calls == {"fetchInstances": 0, "connectionState": 1}  # the row's own token, at the row's own URL
    assert env.row("shop")["evolution_state"] == "open"


async def test_a_listing_too_large_to_read_falls_back_to_reading_each_row(migrated: Database,
                                                                          simulator: Simulator) -> None:
    env = connected_env(migrated, simulator)
    env.add("shop", sim_state="open", status="connected")
    simulator.add_instances(40, prefix="other", state="close")  # a server with many more instances than rows
    async with swept(env, evolution_api_key=Secret(simulator.config.api_key), max_reply_bytes=1000) as sweep:
        await sweep.sweep_once()
    calls = sweep.calls()
    assert calls == {"fetchInstances": 1, "connectionState": 1}
    assert env.row("shop")["evolution_state"] == "open"


async def test_a_statusless_row_whose_instance_is_gone_stops_waiting(db: Database, simulator: Simulator) -> None:
    env = statusless(db, simulator)
    token = simulator.add_instance("shop", state="connecting")
    key = add_statusless(env, "shop", token)
    observe(env, key, "connecting")
    simulator.delete(simulator.get("shop"))
    summary = await env.reconcile()
    assert [(r.outcome, r.error_class) for r in summary.results] == [("failed", "not_found")]
    assert (state_of(env, key)["evolution_state"], state_of(env, key)["waiting"]) == ("not_found", False)


def test_a_server_label_shows_no_credentials(migrated: Database) -> None:
    labels = migrated.query("SELECT pgqr.server_label(u) AS l FROM unnest(ARRAY["
                            "'https://user:pa@ss@evo.example:8080/api?key=1', 'http://evo:8080/', NULL]) u")
    assert [r["l"] for r in labels] == ["https://evo.example:8080", "http://evo:8080", "EVOLUTION_API_URL"]


async def test_a_sweep_that_fails_says_so_and_goes_on(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    """The sweep runs for the life of `pgqr run`: a database that fails it (here: no pgqr schema at all) costs a
    warning and a period, never the process."""
    pool = pgqr_db.Pool(db.dsn, size=1)
    await pool.open()
    try:
        async with EvolutionClient(timeout=1.0) as client:
            sweep = Sweep(Settings(database_url=Secret(db.dsn)), pool, client, "test", Metrics())
            with caplog.at_level(logging.WARNING, logger="pgqr.sweep"):
                task = asyncio.create_task(sweep.run_forever())
                await wait_until(lambda: any(r.message.startswith("sweep failed") for r in caplog.records), 20,
                                 "the sweep's warning")
                assert not task.done()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        await pool.close()


def test_the_app_writes_its_statusless_table_as_its_own_role_and_uninstall_gives_it_back(
        db: Database, simulator: Simulator) -> None:
    """Supabase's `authenticated`, with no rights on schema pgqr and under the table's RLS: INSERT, UPDATE, rename
    and DELETE all go through with pgqr's trigger on the table (whose waiting expression reads pgqr's own state),
    and `pgqr uninstall` leaves the table's definition as it was before install."""
    db.query(STATUSLESS)
    db.query("GRANT SELECT, INSERT, UPDATE, DELETE ON public.evolution_instances TO authenticated")

    def definition() -> list[dict[str, Any]]:
        return db.query("SELECT pg_get_triggerdef(t.oid) AS d FROM pg_trigger t "
                        "WHERE t.tgrelid = 'public.evolution_instances'::regclass AND NOT t.tgisinternal "
                        "UNION ALL SELECT column_name || ' ' || data_type FROM information_schema.columns "
                        "WHERE table_schema = 'public' AND table_name = 'evolution_instances' ORDER BY 1")

    before = definition()
    env = statusless(db, simulator, create=False)
    user = "6f1c2c4e-0000-4000-8000-00000000abcd"
    with db.connect() as conn:
        warnings: list[str] = []
        conn.add_notice_handler(lambda d: warnings.append(str(d.message_primary)))
        conn.execute("SET ROLE authenticated")
        conn.execute("SELECT set_config('request.jwt.claim.sub', %s, false)", (user,))
        assert conn.execute("SELECT has_schema_privilege('pgqr', 'USAGE') AS u").fetchone() == {"u": False}
        conn.execute("INSERT INTO public.evolution_instances (instance_name, api_key) VALUES ('shop', 't')")
        conn.execute("UPDATE public.evolution_instances SET api_key = 't2', phone_number = '5511'")
        conn.execute("UPDATE public.evolution_instances SET instance_name = 'shop-2'")
        key = str(conn.execute("SELECT id FROM public.evolution_instances").fetchone()["id"])  # type: ignore[index]
        assert env.db.value("SELECT name FROM pgqr.instance_state WHERE key = %s", (key,)) == "shop-2"
        observe(env, key, "connecting")  # Evolution's word makes it wait; the app's next writes still go through
        conn.execute("UPDATE public.evolution_instances SET active = false")
        conn.execute("DELETE FROM public.evolution_instances")
        assert warnings == []
    assert env.db.value("SELECT count(*) FROM pgqr.instance_state") == 0
    assert env.db.value("SELECT count(*) FROM pgqr.trigger_errors") == 0
    result = run_pgqr("uninstall", env={"DATABASE_URL": db.dsn})
    assert result.returncode == 0, result.stderr
    assert definition() == before
