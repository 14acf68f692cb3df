"""The live QR page (issue 13): signed links, the page in a real headless Chromium, its server-sent events.

Real PostgreSQL, the sidecar in this event loop serving real HTTP on loopback, the simulator's webhooks, and
Debian's chromium driven by Playwright (never `playwright install`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from conftest import run_pgqr
from playwright.async_api import Browser, Page, async_playwright, expect
from service_fixtures import Env, running_service, settled, start_pgqr, wait_until

from pgqr import db, links, migrations
from pgqr.evolution import ERROR_CLASSES
from pgqr.page import GAVE_UP_WORDS, GONE, read_events, view_of
from pgqr.service import Service
from pgqr.settings import Secret, Settings

LINK_SECRET = "link-secret-0123456789abcdef"
NEW_SECRET = "link-secret-fedcba9876543210"
WEBHOOK_SECRET = "wh-secret-page-5e1f"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SLOW = 15_000  # ms: generous deadlines for what the page shows
ASK = "Ask whoever sent you this link"
# what the person linking a phone must never read: an HTTP status, an error class, the software behind the page
ENGINEER_WORDS = re.compile(r"\b[1-5]\d\d\b|\b(?:evolution|pgqr|instance|" + "|".join(ERROR_CLASSES) + r")\b",
                            re.IGNORECASE)


def page_settings(env: Env, **overrides: Any) -> Settings:
    base = env.settings(http_port=0, webhook_secret=Secret(WEBHOOK_SECRET), link_secret=Secret(LINK_SECRET),
                        fallback_seconds=3600.0)
    return replace(base, **overrides)


def hook(service: Service) -> str:
    return f"http://127.0.0.1:{service.http_port}/webhooks/evolution/{WEBHOOK_SECRET}"


@pytest.fixture
async def sidecar(env: Env) -> AsyncIterator[Service]:
    """`pgqr run` with webhooks and the live page, the simulator's webhooks pointing at it, pg_cron paused."""
    env.db.pause_cron()
    async with running_service(page_settings(env)) as service:
        env.sim.config.global_webhook_url = hook(service)
        yield service


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


def link(service: Service, key: str, *, secret: str = LINK_SECRET, ttl: int = 600) -> str:
    return links.make_link(f"http://127.0.0.1:{service.http_port}", secret, key, ttl)


def key_of(env: Env, name: str) -> str:
    return str(env.row(name)["key"])


async def waiting_with_qr(env: Env, service: Service, name: str) -> str:
    """Add a waiting instance and wait for its first QR; returns its key."""
    env.add(name)
    await wait_until(lambda: env.row(name)["qr_code"] is not None, 10, f"{name}'s first QR")
    await settled(service)
    return key_of(env, name)


async def open_page(browser: Browser, url: str) -> Page:
    page = await browser.new_page(viewport={"width": 390, "height": 780})  # a phone
    await page.goto(url)
    return page


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.text()


class Stream:
    """A server-sent event stream read the way EventSource reads it."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.raw = b""  # every byte received, for what must never be in it
        self.events = read_events(self._lines())

    async def _lines(self) -> AsyncIterator[bytes]:
        async for line in self.response.content:
            self.raw += line
            yield line

    async def next_state(self, timeout: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            async for event, data in self.events:
                if event == "state":
                    state: dict[str, Any] = json.loads(data)
                    return state
        raise AssertionError("the stream ended")

    async def until(self, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                state = await self.next_state(timeout)
                if predicate(state):
                    return state


async def open_stream(http: aiohttp.ClientSession, page_url: str) -> Stream:
    base, _, query = page_url.partition("?")
    response = await http.get(f"{base}/events?{query}")
    assert response.status == 200
    return Stream(response)


# -- the page in a browser -------------------------------------------------------------------------------


async def test_the_page_shows_the_instances_current_qr(env: Env, sidecar: Service, browser: Browser,
                                                        tmp_path: Path) -> None:
    key = await waiting_with_qr(env, sidecar, "shop")
    page = await open_page(browser, link(sidecar, key))
    await expect(page.locator("#qr")).to_have_attribute("src", str(env.row("shop")["qr_code"]), timeout=SLOW)
    await expect(page.locator("#title")).to_have_text("Scan this code with WhatsApp")
    await expect(page.locator("#name")).to_have_text("shop")
    assert env.row("shop")["instance_token"] not in await page.content()
    shot = tmp_path / "page.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if target := os.environ.get("PGQR_PAGE_SCREENSHOT"):  # the README's picture: PGQR_PAGE_SCREENSHOT=docs/page.png
        shutil.copy(shot, target)


async def test_a_rotated_qr_replaces_the_image_without_a_reload(env: Env, sidecar: Service,
                                                                 browser: Browser) -> None:
    key = await waiting_with_qr(env, sidecar, "shop")
    old = str(env.row("shop")["qr_code"])
    page = await open_page(browser, link(sidecar, key))
    await expect(page.locator("#qr")).to_have_attribute("src", old, timeout=SLOW)
    env.sim.rotate("shop")  # the simulator's webhook brings the new QR
    await wait_until(lambda: env.row("shop")["qr_code"] != old, 10, "the rotated QR in the row")
    await expect(page.locator("#qr")).to_have_attribute("src", str(env.row("shop")["qr_code"]), timeout=SLOW)


async def test_the_countdown_runs(env: Env, sidecar: Service, browser: Browser) -> None:
    key = await waiting_with_qr(env, sidecar, "shop")
    page = await open_page(browser, link(sidecar, key))
    countdown = page.locator("#countdown")
    await expect(countdown).to_contain_text("Code expires in", timeout=SLOW)
    first = await countdown.text_content()
    await expect(countdown).not_to_have_text(first or "", timeout=SLOW)
    assert "Code expires in" in (await countdown.text_content() or "")


async def test_the_page_says_connected_after_a_scan(env: Env, sidecar: Service, browser: Browser) -> None:
    key = await waiting_with_qr(env, sidecar, "shop")
    page = await open_page(browser, link(sidecar, key))
    await expect(page.locator("#qr")).to_be_visible(timeout=SLOW)
    env.sim.scan("shop")
    await expect(page.locator("#title")).to_have_text("Connected", timeout=SLOW)
    await expect(page.locator("#qr")).to_be_hidden()


async def test_a_row_with_a_phone_number_shows_its_pairing_code_and_the_steps(env: Env, browser: Browser) -> None:
    env.db.pause_cron()
    env.db.query("ALTER TABLE public.evolution_instances ADD COLUMN phone text")
    with psycopg.connect(env.db.dsn, autocommit=True) as conn:
        migrations.bind(conn, Settings(database_url=Secret(env.db.dsn), phone_column="phone",
                                       explicit=frozenset({"phone_column"})))
    async with running_service(page_settings(env)) as service:
        env.sim.config.global_webhook_url = hook(service)
        token = env.sim.add_instance("phone-shop", state="close")
        with env.db.connect() as conn:
            conn.execute("INSERT INTO public.evolution_instances (instance_name, instance_token, instance_status, "
                         "phone, user_id) VALUES ('phone-shop', %s, 'connecting', '5511999990000', gen_random_uuid())",
                         (token,))
        pairing_sql = "SELECT pairing_code FROM public.evolution_instances WHERE instance_name = 'phone-shop'"
        await wait_until(lambda: env.db.value(pairing_sql) is not None, 10, "the pairing code")
        code = str(env.db.value(pairing_sql))
        assert len(code) == 8
        page = await open_page(browser, link(service, key_of(env, "phone-shop")))
        await expect(page.locator("#pairing")).to_have_text(f"{code[:4]}-{code[4:]}", timeout=SLOW)
        await expect(page.locator("#title")).to_have_text("Link with your phone number")
        await expect(page.locator("#detail")).to_contain_text("Linked devices")
        await expect(page.locator("#detail")).to_contain_text("Link with phone number")
        await expect(page.locator("#countdown")).to_contain_text("Code expires in")


async def test_the_page_resumes_after_the_sidecar_restarts(env: Env, browser: Browser) -> None:
    env.db.pause_cron()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = page_settings(env, http_port=port)
    async with running_service(settings) as service:
        env.sim.config.global_webhook_url = hook(service)
        key = await waiting_with_qr(env, service, "shop")
        page = await open_page(browser, link(service, key))
        await expect(page.locator("#qr")).to_have_attribute("src", str(env.row("shop")["qr_code"]), timeout=SLOW)
    await expect(page.locator("#live")).to_have_text("Reconnecting\u2026", timeout=SLOW)
    async with running_service(settings) as service:
        old = str(env.row("shop")["qr_code"])
        env.sim.rotate("shop")
        await wait_until(lambda: env.row("shop")["qr_code"] != old, 10, "the rotated QR in the row")
        await expect(page.locator("#qr")).to_have_attribute("src", str(env.row("shop")["qr_code"]), timeout=SLOW)
        await expect(page.locator("#live")).to_have_text("Live")


async def test_a_qr_first_found_by_a_poll_says_a_new_code_is_on_its_way_then_counts_down(
        env: Env, sidecar: Service, browser: Browser) -> None:
    """An instance already `connecting` in Evolution, no webhooks: the first poll finds a QR of unknown age (its
    estimated expiry is when it was seen). Once a poll sees the next one, its birth is bounded by the poll before."""
    env.sim.config.global_webhook_url = None
    env.add("shop", sim_state="connecting")
    await wait_until(lambda: env.row("shop")["qr_code"] is not None, 10, "the first QR, by a poll")
    first = str(env.row("shop")["qr_code"])
    page = await open_page(browser, link(sidecar, key_of(env, "shop")))
    await expect(page.locator("#qr")).to_have_attribute("src", first, timeout=SLOW)
    await expect(page.locator("#countdown")).to_have_text("A new code is on its way\u2026", timeout=SLOW)
    env.sim.rotate("shop")  # no webhook: only a poll finds it
    env.make_due("shop")
    env.tick()
    await wait_until(lambda: env.row("shop")["qr_code"] != first, 10, "the next QR, by a poll")
    await expect(page.locator("#qr")).to_have_attribute("src", str(env.row("shop")["qr_code"]), timeout=SLOW)
    await expect(page.locator("#countdown")).to_contain_text("Code expires in 0:", timeout=SLOW)


async def test_a_qr_with_no_known_expiry_says_a_new_code_is_on_its_way(env: Env, sidecar: Service,
                                                                       browser: Browser) -> None:
    key = await waiting_with_qr(env, sidecar, "shop")
    page = await open_page(browser, link(sidecar, key))
    countdown = page.locator("#countdown")
    await expect(countdown).to_contain_text("Code expires in", timeout=SLOW)  # the positive control
    # a row whose QR nobody can date (as one the app wrote itself): the database knows no expiry
    env.db.query("UPDATE pgqr.instance_state SET qr_expires_at = NULL WHERE key = %s", (key,))
    env.db.query("UPDATE pgqr.schedule SET qr_alive_at = NULL WHERE key = %s", (key,))  # nor narrowed by a poll
    env.db.query("SELECT pg_notify('pgqr_qr_updated', json_build_object('key', %s::text)::text)", (key,))
    await expect(countdown).to_have_text("A new code is on its way\u2026", timeout=SLOW)
    await expect(page.locator("#qr")).to_be_visible()


async def test_a_give_up_tells_the_person_whom_to_ask(env: Env, sidecar: Service, browser: Browser) -> None:
    key = await waiting_with_qr(env, sidecar, "shop")
    page = await open_page(browser, link(sidecar, key))
    await expect(page.locator("#qr")).to_be_visible(timeout=SLOW)  # the positive control
    # Evolution's "QR code limit reached": a qrcode.updated without an image
    async with aiohttp.ClientSession() as http, http.post(hook(sidecar), json={
            "event": "qrcode.updated", "instance": "shop", "data": {"message": "QR code limit reached"}}) as resp:
        assert resp.status == 200
    await expect(page.locator("#title")).to_have_text("WhatsApp stopped offering codes", timeout=SLOW)
    await expect(page.locator("#detail")).to_contain_text("unscanned")
    await expect(page.locator("#detail")).to_contain_text(f"{ASK} to restart the connection")
    await expect(page.locator("#qr")).to_be_hidden()
    await expect(page.locator("#countdown")).to_have_text("")
    assert not ENGINEER_WORDS.search(await page.locator("main").inner_text())


def wrong_token(env: Env, name: str) -> None:
    env.add(name)
    env.db.query("UPDATE public.evolution_instances SET instance_token = 'wrong' WHERE instance_name = %s", (name,))


@pytest.mark.parametrize(("setup", "error_class", "title", "words"), [
    (wrong_token, "unauthorized", "Could not get a code", f"refused access. {ASK} to check it"),
    (lambda env, name: env.add(name, sim_state=None), "not_found", "Could not get a code",
     f"was not found. {ASK} to check it"),
    (lambda env, name: env.add(name, mode="http_500"), "server_error", "Could not get a code yet",
     "This page keeps trying"),
], ids=["wrong-token", "unknown-to-evolution", "server-failing"])
async def test_a_failing_connection_says_in_plain_words_whether_to_wait_or_whom_to_ask(
        env: Env, sidecar: Service, browser: Browser, setup: Any, error_class: str, title: str, words: str) -> None:
    setup(env, "shop")
    env.make_due("shop")
    env.tick()
    await wait_until(lambda: env.row("shop")["last_outcome"] == "failed", 10, "a failed poll")
    assert env.row("shop")["last_error_class"] == error_class  # what an engineer reads, for the page to say plainly
    page = await open_page(browser, link(sidecar, key_of(env, "shop")))
    await expect(page.locator("#title")).to_have_text(title, timeout=SLOW)
    await expect(page.locator("#detail")).to_contain_text(words)
    await expect(page.locator("#qr")).to_be_hidden()
    shown = await page.locator("main").inner_text()
    assert "shop" in shown and not ENGINEER_WORDS.search(shown), shown


# -- the words, for every state the database can be in --------------------------------------------------


def page_state(**fields: Any) -> db.PageState:
    base: dict[str, Any] = {
        "key": "1", "name": "shop", "status": "connecting", "waiting": True, "connected": False, "qr": None,
        "pairing_code": None, "has_phone": False, "qr_expires_at": None, "last_outcome": None,
        "last_error_class": None, "db_now": datetime.now(UTC)}
    return db.PageState(**{**base, **fields})


def test_engineer_words_are_caught() -> None:
    """The control for the word checks: what the page said before issue 20."""
    old = ("Could not get a code. The WhatsApp server answered with an error: Evolution has no instance of that "
           "name, or the base URL is wrong (404) (not_found). Ask whoever sent you this link to check the setup.")
    assert [m.lower() for m in ENGINEER_WORDS.findall(old)] == ["evolution", "instance", "404", "not_found"]


@pytest.mark.parametrize("error_class", [*ERROR_CLASSES, "a_class_added_later", None])
def test_every_failure_says_in_plain_words_either_to_wait_or_whom_to_ask(error_class: str | None) -> None:
    view = view_of(page_state(last_outcome="failed", last_error_class=error_class))
    assert view.state == "failed"
    assert not ENGINEER_WORDS.search(f"{view.title} {view.detail}"), view
    assert ("keeps trying" in view.detail) != (ASK in view.detail), view


@pytest.mark.parametrize("error_class", [*GAVE_UP_WORDS, "a_reason_added_later", None])
def test_every_give_up_says_whom_to_ask(error_class: str | None) -> None:
    view = view_of(page_state(last_outcome="gave_up", last_error_class=error_class))
    assert view.state == "gave_up" and ASK in view.detail
    assert not ENGINEER_WORDS.search(f"{view.title} {view.detail}"), view


def test_a_connection_not_waiting_or_gone_says_whom_to_ask_and_no_status_value() -> None:
    idle = view_of(page_state(waiting=False, status="close_requested"))
    assert idle.state == "idle" and "ask whoever sent you this link" in idle.detail
    assert "close_requested" not in idle.detail and not ENGINEER_WORDS.search(f"{idle.title} {idle.detail}")
    assert ASK in GONE.detail and not ENGINEER_WORDS.search(f"{GONE.title} {GONE.detail}")


# -- what the stream says ------------------------------------------------------------------------------


async def test_events_carry_the_qr_and_never_a_token(env: Env, sidecar: Service) -> None:
    key = await waiting_with_qr(env, sidecar, "shop")
    row = env.row("shop")
    async with aiohttp.ClientSession() as http:
        stream = await open_stream(http, link(sidecar, key))
        state = await stream.next_state()
        stream.response.close()
    assert state["qr"] == row["qr_code"] and state["state"] == "qr"
    assert state["expires_at"] == int(row["qr_expires_at"].timestamp() * 1000)  # type: ignore[union-attr]
    assert str(row["instance_token"]).encode() not in stream.raw
    assert set(state) == {"now", "state", "title", "detail", "name", "qr", "pairing_code", "expires_at"}


async def test_a_new_qr_reaches_every_viewer_with_one_read(env: Env, sidecar: Service) -> None:
    key = await waiting_with_qr(env, sidecar, "shop")
    assert sidecar.page is not None
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        streams = [await open_stream(http, link(sidecar, key)) for _ in range(30)]
        firsts = await asyncio.gather(*(s.next_state() for s in streams))
        old = firsts[0]["qr"]
        reads = sidecar.page.reads
        env.sim.rotate("shop")
        news = await asyncio.gather(*(s.until(lambda st: st["qr"] != old) for s in streams))
        for s in streams:
            s.response.close()
    assert {n["qr"] for n in news} == {env.row("shop")["qr_code"]}
    assert sidecar.page.reads - reads <= 3  # one per notification (and perhaps a sweep), never one per viewer


async def test_200_open_streams_cost_no_database_connection(env: Env, sidecar: Service) -> None:
    key = await waiting_with_qr(env, sidecar, "shop")
    assert sidecar.page is not None

    def connections() -> int:
        return int(env.db.value("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                "AND application_name LIKE 'pgqr%%'") or 0)

    def held() -> int | None:
        """The connections the service holds by its own count: its LISTEN one and its pool's (open, lent or being
        opened); None while a request waits for one, which may open another."""
        stats = sidecar.pool._pool.get_stats()
        return None if stats["requests_waiting"] else stats["pool_size"] + 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        first = await open_stream(http, link(sidecar, key))
        await first.next_state()
        # the database sees every connection the service holds, and none is on its way
        await wait_until(lambda: connections() == held(), 10, "the service's connections, all open")
        before = connections()
        streams = await asyncio.gather(*(open_stream(http, link(sidecar, key)) for _ in range(200)))
        states = await asyncio.gather(*(s.next_state() for s in streams))
        assert sidecar.page.viewers == 201
        after = connections()
        for s in (first, *streams):
            s.response.close()
    assert all(s["state"] == "qr" for s in states)
    assert after == before


async def test_open_pages_get_what_changed_while_the_listener_reconnected(env: Env, sidecar: Service) -> None:
    key = await waiting_with_qr(env, sidecar, "shop")
    async with aiohttp.ClientSession() as http:
        stream = await open_stream(http, link(sidecar, key))
        old = (await stream.next_state())["qr"]
        env.db.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pgqr-listener' "
                     "AND datname = current_database()")
        await wait_until(lambda: not sidecar.listener.listening.is_set(), 10, "the listener to notice")
        env.sim.rotate("shop")  # its NOTIFY finds nobody listening
        await wait_until(lambda: env.row("shop")["qr_code"] != old, 10, "the rotated QR in the row")
        state = await stream.until(lambda s: s["qr"] != old, timeout=20)
        stream.response.close()
    assert state["qr"] == env.row("shop")["qr_code"]


# -- links: signatures, expiry, revocation, the access log ----------------------------------------------


async def test_a_tampered_link_gets_403_and_no_qr(env: Env, sidecar: Service) -> None:
    key = await waiting_with_qr(env, sidecar, "shop")
    good = link(sidecar, key)
    base, _, query = good.partition("?")
    status, body = await get(good)
    assert status == 200 and "EventSource" in body  # the positive control
    tampered = good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB")
    for url in (tampered, f"{base}?{query.replace('exp=', 'exp=1')}", base, f"{base}/events?{query[:-2]}"):
        status, body = await get(url)
        assert status == 403 and "data:image" not in body, url
        assert ASK in body and not ENGINEER_WORDS.search(body), body  # the person reads the words, not the status


async def test_an_expired_link_gets_403(env: Env, sidecar: Service) -> None:
    key = await waiting_with_qr(env, sidecar, "shop")
    base = f"http://127.0.0.1:{sidecar.http_port}"
    assert (await get(links.make_link(base, LINK_SECRET, key, 60)))[0] == 200  # the positive control
    expired = links.make_link(base, LINK_SECRET, key, 60, now=time.time() - 61)
    status, body = await get(expired)
    assert status == 403 and "data:image" not in body
    base_events, _, query = expired.partition("?")
    assert (await get(f"{base_events}/events?{query}"))[0] == 403


async def test_a_stream_ends_when_its_link_expires(env: Env, sidecar: Service) -> None:
    key = await waiting_with_qr(env, sidecar, "shop")
    async with aiohttp.ClientSession() as http:
        stream = await open_stream(http, link(sidecar, key, ttl=2))
        assert (await stream.next_state())["state"] == "qr"  # the positive control
        with pytest.raises(AssertionError, match="the stream ended"):
            await stream.next_state(timeout=15)
    assert b"event: expired" in stream.raw


async def test_one_instances_link_never_opens_another(env: Env, sidecar: Service) -> None:
    mine = await waiting_with_qr(env, sidecar, "mine")
    theirs = await waiting_with_qr(env, sidecar, "theirs")
    good = link(sidecar, mine)
    assert (await get(good))[0] == 200  # the positive control
    forged = good.replace(f"/instances/{mine}?", f"/instances/{theirs}?")
    base, _, query = forged.partition("?")
    assert (await get(forged))[0] == 403
    assert (await get(f"{base}/events?{query}"))[0] == 403


async def test_rotating_the_link_secret_revokes_old_links_after_a_grace_with_the_previous_one(env: Env) -> None:
    env.db.pause_cron()
    key = ""
    async with running_service(page_settings(env)) as service:
        env.add("shop")
        key = key_of(env, "shop")
        old = link(service, key)
        assert (await get(old))[0] == 200
    rotating = page_settings(env, link_secret=Secret(NEW_SECRET), link_secret_previous=Secret(LINK_SECRET))
    async with running_service(rotating) as service:
        old = link(service, key)  # same signature, this process's port
        assert (await get(old))[0] == 200  # during the rotation the previous secret still works
        assert (await get(link(service, key, secret=NEW_SECRET)))[0] == 200
    async with running_service(page_settings(env, link_secret=Secret(NEW_SECRET))) as service:
        assert (await get(link(service, key)))[0] == 403  # revoked
        assert (await get(link(service, key, secret=NEW_SECRET)))[0] == 200


async def test_the_access_log_never_holds_a_link_signature(env: Env, sidecar: Service,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgqr.web.access")
    key = await waiting_with_qr(env, sidecar, "shop")
    url = link(sidecar, key)
    sig = url.rsplit("sig=", 1)[1]
    assert (await get(url))[0] == 200
    assert (await get(url + "x"))[0] == 403
    base, _, query = url.partition("?")
    assert (await get(f"{base}/nowhere?{query}"))[0] == 404
    logged = [r.getMessage() for r in caplog.records if r.name == "pgqr.web.access"]
    assert any("/instances/" in line and " 200" in line for line in logged)  # the positive control
    assert not [line for line in logged if sig[:12] in line or "sig=" in line or "exp=" in line]


# -- pgqr link ----------------------------------------------------------------------------------------------


def link_env(env: Env, public_url: str = "https://qr.example.com/pgqr") -> dict[str, str]:
    return {"DATABASE_URL": env.db.dsn, "PGQR_PUBLIC_URL": public_url, "PGQR_LINK_SECRET": LINK_SECRET}


async def test_pgqr_link_prints_a_signed_url_that_opens_the_page(env: Env, sidecar: Service) -> None:
    key = await waiting_with_qr(env, sidecar, "shop")
    public = f"http://127.0.0.1:{sidecar.http_port}"
    result = await asyncio.to_thread(run_pgqr, "link", "shop", "--ttl", "15m", env=link_env(env, public))
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip()
    assert url.startswith(f"{public}/instances/{key}?exp=") and "&sig=" in url
    assert (await get(url))[0] == 200


async def test_pgqr_link_refuses_a_shared_name_and_takes_a_key(env: Env) -> None:
    env.db.query("ALTER TABLE public.evolution_instances DROP CONSTRAINT evolution_instances_instance_name_key")
    env.add("twin")
    env.add("twin", sim_state=None)
    keys = sorted(str(r["key"]) for r in env.db.query("SELECT key FROM pgqr.find_instances('twin')"))
    assert len(keys) == 2
    shared = await asyncio.to_thread(run_pgqr, "link", "twin", env=link_env(env))
    assert shared.returncode == 2 and shared.stdout == ""
    assert all(f"--key {k}" in shared.stderr for k in keys)
    picked = await asyncio.to_thread(run_pgqr, "link", "twin", "--key", keys[1], env=link_env(env))
    assert picked.returncode == 0, picked.stderr
    assert picked.stdout.startswith(f"https://qr.example.com/pgqr/instances/{keys[1]}?exp=")


def test_pgqr_link_needs_a_public_url_and_a_secret(quiet: Any) -> None:
    result = run_pgqr("link", "shop", env={"DATABASE_URL": quiet.dsn})
    assert result.returncode == 2 and "PGQR_PUBLIC_URL" in result.stderr
    short = run_pgqr("link", "shop", env={"DATABASE_URL": quiet.dsn, "PGQR_PUBLIC_URL": "https://x.example",
                                          "PGQR_LINK_SECRET": "short"})
    assert short.returncode == 2 and "at least 16" in short.stderr and "short" not in short.stderr.split(":", 1)[0]


def test_the_demo_prints_a_live_page_link_for_each_instance() -> None:
    result = run_pgqr("demo", "--duration", "3", "--scan-after", "60", timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("acme-store", "bakery-hq", "clinic-front", "ghost-shop"):
        assert re.search(rf"^  {name}  http://127\.0\.0\.1:\d+/instances/[0-9a-f-]+\?exp=\d+&sig=[\w-]{{43}}$",
                         result.stdout, re.MULTILINE), name


@pytest.mark.parametrize("skew", ["+20s", "-20s"])
async def test_the_countdown_counts_on_the_databases_clock_when_the_sidecars_is_off(
        env: Env, tmp_path: Path, children: list[asyncio.subprocess.Process], skew: str) -> None:
    """`pgqr run` under faketime: each event's `now` is the database's, so the seconds left that a page shows are
    the database's estimate, not 20 s more or less."""
    env.db.pause_cron()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environment = env.command_env(PGQR_HTTP_PORT=str(port), PGQR_LINK_SECRET=LINK_SECRET)
    children.append(await start_pgqr(environment, tmp_path / "run.log", "run", skew=skew))
    env.add("shop")
    await wait_until(lambda: env.row("shop")["qr_code"] is not None, 60, "the first QR")
    key = key_of(env, "shop")
    async with aiohttp.ClientSession() as http:
        stream = await open_stream(http, links.make_link(f"http://127.0.0.1:{port}", LINK_SECRET, key, 600))
        state = await stream.until(lambda s: s["expires_at"] is not None, 30)
        db_left = float(env.db.value("SELECT extract(epoch FROM qr_expires_at - now()) FROM pgqr.instance_state"))
        page_left = (state["expires_at"] - state["now"]) / 1000
        stream.response.close()
    assert abs(page_left - db_left) < 3, (page_left, db_left)
