"""The refresh engine: due times that follow each QR's life, a streaming pipeline, one bad reply costs nobody else."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import aiohttp
from aiohttp import web
from service_fixtures import Env, running_service, settled, wait_until
from sim_fixtures import serve

from pgqr import db, writeback
from pgqr.engine import Engine, InstanceResult
from pgqr.evolution import EvolutionClient
from pgqr.settings import Secret


def md5(text: str | None) -> str | None:
    return hashlib.md5(text.encode()).hexdigest() if text else None


async def test_a_new_qr_gets_an_expiry_estimate_that_health_and_freshness_show(env: Env) -> None:
    env.add("shop")
    await env.reconcile()
    row = env.row("shop")
    assert row["qr_md5"] == md5(row["qr_code"])
    # made during this very call or before it; it expires one lifetime (45 s) after that
    assert (row["qr_expires_at"] - row["qr_born_after"]).total_seconds() == 45
    assert row["qr_born_after"] <= row["qr_seen_at"] < row["due_at"]
    health = env.db.query("SELECT qr_valid, qr_expires_at FROM pgqr.instance_health")
    assert health == [{"qr_valid": True, "qr_expires_at": row["qr_expires_at"]}]
    assert env.db.query("SELECT waiting, qr_valid FROM pgqr.freshness") == [{"waiting": 1, "qr_valid": 1}]


async def test_the_same_image_again_narrows_the_estimate_and_retries_soon_without_a_write(env: Env) -> None:
    env.add("shop")
    await env.reconcile()
    first = env.row("shop")
    env.make_due("shop")
    summary = await env.reconcile()
    second = env.row("shop")
    assert [r.outcome for r in summary.results] == ["qr_unchanged"]
    assert second["qr_code"] == first["qr_code"] and second["last_qr_update"] == first["last_qr_update"]
    assert second["repeats"] == 1
    # still current when seen again, so it was made no earlier than a lifetime before that
    assert second["qr_born_after"] >= first["qr_born_after"]
    # an unchanged image retries within retry_max_seconds (5 s), not at the next minute
    retry = (second["due_at"] - second["last_poll_at"]).total_seconds()
    assert 0.9 <= retry <= 5.5


async def test_a_rotation_is_picked_up_within_a_few_seconds_by_polling_alone(env: Env) -> None:
    """Evolution rotates every 6 s here; pgqr, told the lifetime, keeps the stored QR equal to Evolution's."""
    env.set("qr_lifetime_seconds", "6")
    env.sim.config.qr_ttl = 6
    env.add("shop")
    async with running_service(env.settings()):
        await wait_until(lambda: env.row("shop")["qr_code"] is not None, 10, "the first QR")
        seen = {env.row("shop")["qr_code"]}
        for _ in range(3):
            current = env.row("shop")["qr_code"]
            await wait_until(lambda current=current: env.row("shop")["qr_code"] != current, 15, "a rotation")
            # the QR stored is the one Evolution holds now, not an old one
            assert env.row("shop")["qr_md5"] == env.sim.current()["shop"]["md5"]
            seen.add(env.row("shop")["qr_code"])
        assert len(seen) == 4
        # bounded cost: never more than 12 calls for one instance in any 60 s
        assert env.sim.stats("shop").most_calls_within(60.0) <= 12


async def test_a_replica_never_calls_one_instance_twice_at_once(env: Env) -> None:
    env.sim.config.latency = 0.2
    for i in range(30):
        env.add(f"shop-{i:02d}")
    results = await asyncio.gather(env.reconcile("replica-a"), env.reconcile("replica-b"), env.reconcile("replica-c"))
    names = [r.instance_name for summary in results for r in summary.results]
    assert sorted(names) == [f"shop-{i:02d}" for i in range(30)]
    for i in range(30):
        assert env.sim.stats(f"shop-{i:02d}").max_concurrent_connects == 1


async def test_a_webhook_is_answered_while_a_large_write_back_is_in_flight(env: Env) -> None:
    """The write-back of a reconcile and a webhook use different connections: the webhook does not queue."""
    env.sim.config.latency = 0.05
    for i in range(200):
        env.add(f"bulk-{i:03d}", triggers=False)
    env.add("hooked")
    settings = env.settings(http_port=0, webhook_secret=Secret("s3"),
                            concurrency=50)
    async with running_service(settings) as service:
        await settled(service)
        env.make_due()
        env.tick()
        url = f"http://127.0.0.1:{service.http_port}/webhooks/evolution/s3"
        body = {"event": "qrcode.updated", "instance": "hooked",
                "data": {"qrcode": {"instance": "hooked", "code": "2@x", "base64": "data:image/png;base64,HOOK"}}}
        async with aiohttp.ClientSession() as http:
            await wait_until(lambda: bool(service.engine.in_flight), 10, "the reconcile to be under way")
            async with http.post(url, json=body) as resp:
                assert resp.status == 200
                assert (await resp.json())["qr_updated"] is True
        assert env.row("hooked")["qr_code"] == "data:image/png;base64,HOOK"


async def test_an_out_of_range_count_costs_only_its_own_instance(env: Env) -> None:
    """50 good replies and one whose count does not fit an integer: the 50 are refreshed."""
    good = {"code": "2@abc", "base64": "data:image/png;base64,GOOD", "count": 1, "pairingCode": None}

    async def connect(request: web.Request) -> web.Response:
        if request.match_info["name"] == "bad":
            return web.json_response({**good, "count": 99999999999})
        return web.json_response(good)

    app = web.Application()
    app.router.add_get("/instance/connect/{name}", connect)
    async with serve(app) as base_url:
        for i in range(50):
            env.add(f"good-{i:02d}", sim_state=None)
        env.add("bad", sim_state=None)
        summary = await env.reconcile(evolution_api_url=Secret(base_url))
    outcomes = {r.instance_name: (r.outcome, r.error_class) for r in summary.results}
    assert outcomes.pop("bad") == ("failed", "bad_reply")
    assert set(outcomes.values()) == {("qr_stored", None)} and len(outcomes) == 50
    assert env.row("good-00")["qr_code"] == good["base64"]
    assert env.row("bad")["qr_code"] is None and env.row("bad")["last_error_class"] == "bad_reply"


async def test_a_timing_out_instance_does_not_hold_back_the_others_write_back(env: Env) -> None:
    hang = asyncio.Event()

    async def connect(request: web.Request) -> web.Response:
        if request.match_info["name"] == "slow":
            await hang.wait()
        return web.json_response({"code": "2@a", "base64": "data:image/png;base64,FAST", "count": 1})

    app = web.Application()
    app.router.add_get("/instance/connect/{name}", connect)
    async with serve(app) as base_url:
        env.add("slow", sim_state=None)
        for i in range(5):
            env.add(f"fast-{i}", sim_state=None)
        settings = env.settings(evolution_api_url=Secret(base_url),
                                http_timeout=30.0)
        pool = db.Pool(env.db.dsn, size=3)
        await pool.open()
        async with EvolutionClient(timeout=30) as client:
            engine = Engine(settings, pool, client, "owner")
            run = asyncio.create_task(engine.run_once())
            try:
                await wait_until(lambda: all(env.row(f"fast-{i}")["qr_code"] for i in range(5)), 10,
                                 "the fast instances' QRs while the slow one still hangs")
                assert not run.done() and env.row("slow")["lease_owner"] == "owner"
            finally:
                hang.set()
                await run
                await engine.close()
        await pool.close()


async def test_a_repeated_connection_update_writes_nothing(env: Env) -> None:
    env.add("flappy")
    key = str(env.row("flappy")["id"])
    pool = db.Pool(env.db.dsn, size=2)
    await pool.open()
    try:
        event = db.Result(key=key, source="webhook", outcome="event", evolution_state="connecting")
        assert [r.written for r in await db.record_results(pool, "w", [event])] == [True]
        before = env.db.value("SELECT pg_current_wal_insert_lsn()::text")
        log_rows = len(env.log("flappy"))
        for _ in range(30):
            assert await db.record_results(pool, "w", [event]) == []
        after = env.db.value("SELECT pg_current_wal_insert_lsn()::text")
        assert len(env.log("flappy")) == log_rows
        # positive control: a different state is written
        changed = db.Result(key=key, source="webhook", outcome="event", evolution_state="close")
        assert [r.written for r in await db.record_results(pool, "w", [changed])] == [True]
        assert env.row("flappy")["evolution_state"] == "close"
    finally:
        await pool.close()
    assert isinstance(before, str) and isinstance(after, str)


async def test_a_row_that_turns_waiting_again_gets_its_qr_written_even_when_evolution_shows_the_same_image(
        env: Env) -> None:
    env.add("shop")
    await env.reconcile()
    image = env.row("shop")["qr_code"]
    # the app parks the row and asks again, clearing its QR; Evolution still shows the same image
    env.db.query("UPDATE evolution_instances SET instance_status = 'paused', qr_code = NULL "
                 "WHERE instance_name = 'shop'")
    env.db.query("UPDATE evolution_instances SET instance_status = 'connecting' WHERE instance_name = 'shop'")
    summary = await env.reconcile()
    assert [r.outcome for r in summary.results] == ["qr_stored"]
    assert env.row("shop")["qr_code"] == image


async def test_an_instance_evolution_has_not_loaded_yet_recovers_within_seconds_of_being_loaded(env: Env) -> None:
    """After an Evolution restart an instance answers {"error":true,...} until it is loaded again: transient,
    retried in seconds (not the 30 minutes of a permanent failure)."""
    env.add("restarting", mode="not_in_memory")
    summary = await env.reconcile()
    assert [(r.outcome, r.error_class) for r in summary.results] == [("failed", "not_loaded")]
    row = env.row("restarting")
    assert (row["due_at"] - row["last_poll_at"]).total_seconds() <= 5
    async with running_service(env.settings()):
        env.sim.reload("restarting")
        await wait_until(lambda: env.row("restarting")["qr_code"] is not None, 60, "the QR after the reload")
    assert env.row("restarting")["consecutive_failures"] == 0


async def test_a_timeout_backs_off_instead_of_retrying_at_once_and_is_never_final(env: Env) -> None:
    env.add("slow-close", mode="hang")
    summary = await env.reconcile(http_timeout=0.5)
    assert [(r.outcome, r.error_class) for r in summary.results] == [("failed", "timeout")]
    row = env.row("slow-close")
    # timeout: transient, first retry 10 s (jittered to 5-10 s), doubling: not at once, not for good
    assert 4.9 <= (row["due_at"] - row["last_poll_at"]).total_seconds() <= 10.5
    assert row["waiting"] and row["last_error_class"] == "timeout"
    env.make_due("slow-close")
    await env.reconcile(http_timeout=0.5)
    second = env.row("slow-close")
    assert second["consecutive_failures"] == 2
    assert 9.9 <= (second["due_at"] - second["last_poll_at"]).total_seconds() <= 20.5


async def test_metrics_show_how_many_waiting_instances_hold_a_qr_within_its_life(env: Env) -> None:
    env.add("fresh")
    env.add("never", sim_state=None)  # Evolution does not know it: no QR, ever
    async with running_service(env.settings(http_port=0)) as service, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{service.http_port}/metrics"

        async def gauges() -> dict[str, float]:
            async with http.get(url) as resp:
                text = await resp.text()
            return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                    if line.startswith(("pgqr_waiting_instances ", "pgqr_qr_valid_instances "))}

        deadline = asyncio.get_running_loop().time() + 20
        while (seen := await gauges()) != {"pgqr_waiting_instances": 2.0, "pgqr_qr_valid_instances": 1.0}:
            assert asyncio.get_running_loop().time() < deadline, seen
            await asyncio.sleep(0.2)


class HeldDueTime(db.Pool):
    """A real pool whose first read of the next due time, once a call is in flight, is held back (read from
    PostgreSQL, then not handed to the engine) until the test lets it go: the window between reading the next due
    time and going to sleep, kept open for as long as the test needs."""

    def __init__(self, dsn: str, call_made: asyncio.Event) -> None:
        super().__init__(dsn, size=3)
        self.call_made = call_made
        self.read = asyncio.Event()  # the engine has read the next due time and waits for the answer
        self.let_go = asyncio.Event()

    async def value(self, sql: str, params: tuple[object, ...] = ()) -> object:
        value = await super().value(sql, params)
        if "next_due_in" in sql and not self.read.is_set():
            await self.call_made.wait()
            self.read.set()
            await self.let_go.wait()
        return value


async def test_a_write_back_that_lands_while_the_next_due_time_is_read_still_wakes_the_engine(env: Env) -> None:
    """The engine reads the next due time while a call is in flight; the call's result (no QR yet: due again in
    half a second) is written back before that read reaches the engine. The write-back must still wake it: the
    due time it read predates the write (the claim's lease, minutes away), so a lost wake-up shows as no second
    call for as long as the lease and the fallback timer last."""
    env.set("no_qr_retry_seconds", "0.5")
    env.set("lease_seconds", "600")
    call_made, answer = asyncio.Event(), asyncio.Event()
    calls = 0

    async def connect(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        call_made.set()
        await answer.wait()
        return web.json_response({"count": 0})  # Evolution has no QR for it yet

    written, outcomes = asyncio.Event(), []

    def observe(result: InstanceResult) -> None:
        outcomes.append(result.outcome)
        written.set()

    app = web.Application()
    app.router.add_get("/instance/connect/{name}", connect)
    async with serve(app) as base_url:
        env.add("waits", sim_state=None)
        settings = env.settings(evolution_api_url=Secret(base_url), fallback_seconds=600.0, http_timeout=30.0)
        pool = HeldDueTime(env.db.dsn, call_made)
        await pool.open()
        stop, wake = False, asyncio.Event()  # no listener: only the engine's own events wake it
        async with EvolutionClient(timeout=30) as client:
            engine = Engine(settings, pool, client, "owner", observe=observe)
            run = asyncio.create_task(engine.run_forever(wake, lambda: stop))
            try:
                await asyncio.wait_for(pool.read.wait(), 60)  # the call is in flight, the due time read and held
                answer.set()
                await asyncio.wait_for(written.wait(), 60)  # written back while the engine still waits for its read
                assert calls == 1 and outcomes == ["no_qr"]
                pool.let_go.set()
                await wait_until(lambda: calls >= 2, 60, "the engine to wake for the write-back and call again")
            finally:
                stop = True
                answer.set()
                pool.let_go.set()
                wake.set()
                await asyncio.wait_for(run, 60)
                await engine.close()
        await pool.close()


class HeldPolls(db.Pool):
    """A real pool that holds every batch of poll results on its way to PostgreSQL until the test lets it go
    (a write-back as slow as a test needs); webhook batches pass."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn, size=4)
        self.holding = asyncio.Event()
        self.let_go = asyncio.Event()

    async def rows(self, cls: type[Any], sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        if "record_results" in sql and '"source": "poll"' in str(params[1]):
            self.holding.set()
            await self.let_go.wait()
        return await super().rows(cls, sql, params)


async def test_a_webhook_is_written_while_a_batch_of_polls_is_still_on_its_way(env: Env) -> None:
    """One writer for polls and webhooks, and a webhook never queues behind a batch of polls: it is written and
    answered while the poll batch before it is still held."""
    env.add("polled", sim_state=None)
    env.add("hooked", sim_state=None)
    polled_key, hooked_key = str(env.row("polled")["id"]), str(env.row("hooked")["id"])
    pool = HeldPolls(env.db.dsn)
    await pool.open()
    writer = writeback.ResultWriter(pool, "owner")
    try:
        poll = await writer.put(db.Result(key=polled_key, source="poll", outcome="no_qr", claim_id=None))
        await asyncio.wait_for(pool.holding.wait(), 60)
        image = "data:image/png;base64,HOOK"
        hook = db.Result(key=hooked_key, source="webhook", outcome="qr", md5=db.image_md5(image), qr=image)
        recorded = await asyncio.wait_for(writer.record(hook), 60)
        assert recorded is not None and recorded.written and recorded.qr_updated
        assert env.row("hooked")["qr_code"] == image
        assert not poll.done()  # the poll batch is still held
        pool.let_go.set()
        polled = await asyncio.wait_for(poll, 60)
        assert polled is not None and not polled.written  # no claim: not this writer's to write
    finally:
        pool.let_go.set()
        await writer.close()
        await pool.close()
