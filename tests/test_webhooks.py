"""Evolution's webhooks into `pgqr run`'s HTTP server: the simulator posts real envelopes over loopback, and they
reach the rows through the same write path as the poller. Every refusal writes nothing, is counted in /metrics by
reason, and leaves no credential in any log line (checked after every test of this module)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import jwt
import psycopg
import pytest
from conftest import run_pgqr
from service_fixtures import Env, notifications, running_service, settled, wait_until

from pgqr import tokens
from pgqr.service import Service
from pgqr.settings import Secret
from pgqr.simulator import WebhookDelivery

SECRET = "wh-SECRET-7f3a9c2e"
JWT_KEY = "jwt-KEY-51c0ffee-" + "k" * 24
GLOBAL_KEY = "evo-GLOBAL-key-77aa"
SHOP_TOKEN = "shop-TOKEN-0b1c2d"
OTHER_TOKEN = "other-TOKEN-3e4f5a"
QR = "data:image/png;base64,FORGED"


def hook_url(service: Service, secret: str = SECRET) -> str:
    return f"http://127.0.0.1:{service.http_port}/webhooks/evolution/{secret}"


def header_url(service: Service, suffix: str = "") -> str:
    return f"http://127.0.0.1:{service.http_port}/webhooks/evolution{suffix}"


@pytest.fixture(autouse=True)
def no_secret_in_any_log(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every record of every logger, after each test: no secret, key, token or JWT key anywhere in it."""
    caplog.set_level(logging.DEBUG)
    yield
    secrets = [SECRET, JWT_KEY, GLOBAL_KEY, SHOP_TOKEN, OTHER_TOKEN,
               *(tokens.derive(SECRET, name) for name in ("shop", "other", "nobody"))]
    for record in caplog.records:
        text = record.getMessage() + json.dumps(vars(record), default=str)
        for secret in secrets:
            assert secret not in text, f"{secret[:6]}... leaked into {record.name}: {record.getMessage()[:80]}"


@pytest.fixture
async def hooked(env: Env) -> AsyncIterator[Service]:
    """A listener with webhooks on, the simulator's global webhook pointing at it, and pg_cron paused."""
    env.db.pause_cron()
    env.sim.config.api_key = GLOBAL_KEY
    settings = env.settings(http_port=0, webhook_secret=Secret(SECRET), evolution_api_key=Secret(GLOBAL_KEY),
                            fallback_seconds=3600.0)
    async with running_service(settings) as service:
        env.sim.config.global_webhook_url = hook_url(service)
        await settled(service)
        yield service


@pytest.fixture
async def signed(env: Env) -> AsyncIterator[Service]:
    """Webhooks on with PGQR_WEBHOOK_JWT_KEY set; no global webhook."""
    env.db.pause_cron()
    settings = env.settings(http_port=0, webhook_secret=Secret(SECRET), webhook_jwt_key=Secret(JWT_KEY),
                            fallback_seconds=3600.0)
    async with running_service(settings) as service:
        await settled(service)
        yield service


async def post(url: str, body: Any = None, *, data: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.post(
            url, json=body if data is None else None, data=data, headers=headers) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def rejections(service: Service) -> dict[str, float]:
    """pgqr_webhook_rejections_total by reason, read from /metrics."""
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{service.http_port}/metrics") as resp:
        text = await resp.text()
    found = {}
    for line in text.splitlines():
        if line.startswith("pgqr_webhook_rejections_total{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('reason="')[1].split('"')[0]] = float(value)
    return found


def qr_envelope(name: str, base64: str = QR, apikey: str | None = None) -> dict[str, Any]:
    return {"event": "qrcode.updated", "instance": name, "apikey": apikey,
            "data": {"qrcode": {"instance": name, "pairingCode": None, "code": "2@x", "base64": base64}}}


def qr_of(env: Env, name: str) -> str | None:
    qr: str | None = env.row(name)["qr_code"]
    return qr


def written(env: Env) -> int:
    """refresh_log rows plus app rows holding a QR: 0 while nothing was written."""
    return int(env.db.value("SELECT (SELECT count(*) FROM pgqr.refresh_log) + "  # type: ignore[arg-type]
                            "(SELECT count(*) FROM public.evolution_instances WHERE qr_code IS NOT NULL)"))


async def refused(env: Env, service: Service, status: int, reason: str, url: str, body: Any = None, *,
                  data: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    """POST; expect `status`, one more rejection counted as `reason`, and nothing written."""
    before = await rejections(service)
    got, reply = await post(url, body, data=data, headers=headers)
    assert got == status, (got, reply)
    after = await rejections(service)
    assert after.get(reason, 0) == before.get(reason, 0) + 1, (reason, before, after)
    assert written(env) == 0
    return reply


def quiet_rows(env: Env, *names: str) -> None:
    """App rows that nothing polls (not in the simulator, not due for an hour), inserted in one transaction
    without the trigger's NOTIFY: only the webhooks under test write them."""
    with env.db.connect() as conn, conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        for name in names:
            token = {"shop": SHOP_TOKEN, "other": OTHER_TOKEN}.get(name, f"token-of-{name}")
            conn.execute("INSERT INTO public.evolution_instances (instance_name, instance_token, instance_status, "
                         "user_id) VALUES (%s, %s, 'connecting', gen_random_uuid())", (name, token))
        conn.execute("SET LOCAL session_replication_role = origin")
        conn.execute("SELECT pgqr.sync_instances()")
        conn.execute("UPDATE pgqr.schedule SET due_at = now() + interval '1 hour' "
                     "WHERE key IN (SELECT key FROM pgqr.instance_state WHERE name = ANY(%s))",
                     (list(names),))


ACCEPTED = (200, {"recorded": True, "qr_updated": True})


def qr_hook(name: str) -> Callable[[WebhookDelivery], bool]:
    return lambda d: d.body["instance"] == name and d.body["event"] == "qrcode.updated"


async def first_qr(env: Env, name: str, *, webhook: bool = True) -> str:
    """Wait for the poll's QR and (unless no webhook is set up) for the simulator to deliver its own."""
    await wait_until(lambda: qr_of(env, name) is not None, 5, "the first QR")
    if webhook:
        await env.sim.wait_for_webhooks(qr_hook(name))
    await asyncio.sleep(0.1)
    qr = qr_of(env, name)
    assert qr is not None
    return qr


# ------------------------------------------------------------------------------- delivered by the simulator


async def test_a_rotated_qr_arrives_by_webhook_without_a_poll(env: Env, hooked: Service) -> None:
    env.add("shop")
    old = await first_qr(env, "shop")
    env.sim.rotate("shop")
    [*_, delivered] = await env.sim.wait_for_webhooks(qr_hook("shop"), n=2)
    new = delivered.body["data"]["qrcode"]["base64"]
    await wait_until(lambda: qr_of(env, "shop") == new, 5, "the webhook QR")
    assert new != old
    last = env.log("shop")[-1]
    assert (last["source"], last["outcome"], last["written"], last["qr_updated"]) == ("webhook", "qr", True, True)
    assert env.sim.stats("shop").connect_calls == 1  # only the first QR was polled
    assert env.db.value("SELECT count(*) FROM pgqr.ticks") == 0
    assert all(d.status == 200 for d in env.sim.webhooks)
    assert delivered.body["apikey"] == env.row("shop")["instance_token"]  # the body's apikey was checked


async def test_a_per_instance_by_events_webhook_reaches_the_event_suffix_route(env: Env, hooked: Service) -> None:
    env.sim.config.global_webhook_url = None
    token = env.add("shop")
    old = await first_qr(env, "shop", webhook=False)
    hook = {"enabled": True, "url": hook_url(hooked), "byEvents": True, "base64": True,
            "events": ["QRCODE_UPDATED", "CONNECTION_UPDATE"]}
    async with aiohttp.ClientSession() as http, http.post(
            f"{env.sim.base_url}/webhook/set/shop", json={"webhook": hook}, headers={"apikey": token}) as resp:
        assert resp.status == 201
    env.sim.rotate("shop")
    [delivery] = await env.sim.wait_for_webhooks(qr_hook("shop"), timeout=5)
    await wait_until(lambda: qr_of(env, "shop") != old, 5, "the webhook QR")
    assert delivery.url == hook_url(hooked) + "/qrcode-updated" and delivery.status == 200
    assert qr_of(env, "shop") == delivery.body["data"]["qrcode"]["base64"]
    assert env.log("shop")[-1]["source"] == "webhook"


async def test_a_header_form_by_events_webhook_with_the_derived_token_is_recorded(env: Env, hooked: Service) -> None:
    env.sim.config.global_webhook_url = None
    token = env.add("shop")
    old = await first_qr(env, "shop", webhook=False)
    hook = {"enabled": True, "url": header_url(hooked), "byEvents": True, "base64": False,
            "headers": {tokens.HEADER: tokens.derive(SECRET, "shop")}, "events": ["QRCODE_UPDATED"]}
    async with aiohttp.ClientSession() as http, http.post(
            f"{env.sim.base_url}/webhook/set/shop", json={"webhook": hook}, headers={"apikey": token}) as resp:
        assert resp.status == 201
    env.sim.rotate("shop")
    [delivery] = await env.sim.wait_for_webhooks(qr_hook("shop"), timeout=5)
    assert delivery.url == header_url(hooked, "/qrcode-updated") and delivery.status == 200
    await wait_until(lambda: qr_of(env, "shop") == delivery.body["data"]["qrcode"]["base64"], 5, "the QR")
    assert qr_of(env, "shop") != old and env.log("shop")[-1]["source"] == "webhook"


async def test_a_webhook_set_by_pgqr_webhooks_register_delivers_with_its_header(env: Env, hooked: Service) -> None:
    env.sim.config.global_webhook_url = None
    env.add("shop")
    old = await first_qr(env, "shop", webhook=False)
    result = await asyncio.to_thread(run_pgqr, "webhooks", "register", "--instance", "shop", env={
        "DATABASE_URL": env.db.dsn, "EVOLUTION_API_URL": env.sim.base_url, "PGQR_WEBHOOK_SECRET": SECRET,
        "PGQR_PUBLIC_URL": f"http://127.0.0.1:{hooked.http_port}"})
    assert result.returncode == 0, result.stdout + result.stderr
    env.sim.rotate("shop")
    [delivery] = await env.sim.wait_for_webhooks(qr_hook("shop"), timeout=5)
    assert delivery.url == header_url(hooked) and delivery.status == 200
    assert delivery.headers[tokens.HEADER] == tokens.derive(SECRET, "shop")
    await wait_until(lambda: qr_of(env, "shop") == delivery.body["data"]["qrcode"]["base64"] != old, 5, "the QR")


async def test_after_a_secret_rotation_doctor_names_the_401_each_webhook_gets_and_register_heals_it(
        env: Env, hooked: Service) -> None:
    env.sim.config.global_webhook_url = None
    token = env.add("shop")
    await first_qr(env, "shop", webhook=False)
    old_secret = "wh-OLD-secret-41d2"
    base = {"DATABASE_URL": env.db.dsn, "EVOLUTION_API_URL": env.sim.base_url, "EVOLUTION_API_KEY": GLOBAL_KEY,
            "PGQR_PUBLIC_URL": f"http://127.0.0.1:{hooked.http_port}"}

    async def pgqr(*args: str, secret: str = SECRET) -> tuple[int, str]:
        result = await asyncio.to_thread(run_pgqr, *args, env={**base, "PGQR_WEBHOOK_SECRET": secret})
        shown = result.stdout + result.stderr
        derived = [tokens.derive(s, "shop") for s in (SECRET, old_secret)]
        for value in (SECRET, old_secret, GLOBAL_KEY, token, *derived):
            assert value not in shown
        return result.returncode, shown

    def webhooks_line(shown: str) -> str:
        return next(line for line in shown.splitlines() if line.startswith(("PASS  webhooks:", "FAIL  webhooks:")))

    # set by a register run with the secret before the rotation: the service refuses its posts with 401
    assert (await pgqr("webhooks", "register", "--instance", "shop", secret=old_secret))[0] == 0
    env.sim.rotate("shop")
    [refused_post] = await env.sim.wait_for_webhooks(qr_hook("shop"), timeout=20)
    assert refused_post.status == 401
    code, shown = await pgqr("doctor")
    assert code == 1 and "1 wrong X-Pgqr-Token (401): shop -> fix: run `pgqr webhooks register --all`" in \
        webhooks_line(shown), shown
    # the fix doctor names, and the control: the next post is accepted, and doctor passes
    code, shown = await pgqr("webhooks", "register", "--all")
    assert code == 0 and "shop\tok\tset (was: wrong X-Pgqr-Token (401))" in shown, shown
    env.sim.rotate("shop")
    [_, accepted] = await env.sim.wait_for_webhooks(qr_hook("shop"), n=2, timeout=20)
    assert accepted.status == 200
    await wait_until(lambda: qr_of(env, "shop") == accepted.body["data"]["qrcode"]["base64"], 20, "the QR")
    code, shown = await pgqr("doctor")
    assert webhooks_line(shown).startswith("PASS  webhooks: 1 waiting instance(s)"), shown


async def test_an_open_connection_update_marks_connected_clears_the_qr_and_notifies(
        env: Env, hooked: Service) -> None:
    env.add("shop")
    await first_qr(env, "shop")
    async with notifications(env.db.dsn, "pgqr_qr_updated") as collect:
        env.sim.scan("shop")
        await wait_until(lambda: env.row("shop")["instance_status"] == "connected", 5, "the open webhook")
        payloads = await collect()
    row = env.row("shop")
    assert (row["qr_code"], row["pairing_code"]) == (None, None)
    assert [(p["key"], p["event"]) for p in payloads] == [(str(row["id"]), "connected")]
    last = env.log("shop")[-1]
    assert (last["source"], last["outcome"], last["written"]) == ("webhook", "connected", True)


async def test_the_qr_limit_gives_up_and_keeps_the_row_waiting_without_a_gave_up_status(
        env: Env, hooked: Service) -> None:
    env.sim.config.qrcode_limit = 2
    env.add("shop")
    await first_qr(env, "shop")
    env.sim.rotate("shop")  # QR number 2, the last one allowed
    [*_, delivered] = await env.sim.wait_for_webhooks(qr_hook("shop"), n=2)
    second = delivered.body["data"]["qrcode"]["base64"]
    await wait_until(lambda: qr_of(env, "shop") == second, 5, "the second QR")
    env.sim.rotate("shop")  # Evolution gives up: "QR code limit reached", then state refused
    await wait_until(lambda: any(r["outcome"] == "gave_up" for r in env.log("shop")), 5, "the give-up")
    gave_up = [(r["source"], r["error_class"]) for r in env.log("shop") if r["outcome"] == "gave_up"]
    assert gave_up[0] == ("webhook", "qr_limit")
    assert env.row("shop")["instance_status"] == "connecting"  # PGQR_GAVE_UP_VALUE is unset: keep waiting


# ------------------------------------------------------------------------------------- the two forms


async def test_the_header_form_takes_the_global_secret_or_the_instance_token(env: Env, hooked: Service) -> None:
    quiet_rows(env, "shop")
    derived = {tokens.HEADER: tokens.derive(SECRET, "shop")}
    assert await post(header_url(hooked), qr_envelope("shop", "data:image/png;base64,A"), headers=derived) == ACCEPTED
    assert await post(header_url(hooked, "/qrcode-updated"), qr_envelope("shop", "data:image/png;base64,B"),
                      headers={tokens.HEADER: SECRET}) == ACCEPTED
    assert qr_of(env, "shop") == "data:image/png;base64,B"
    assert [r["source"] for r in env.log("shop")] == ["webhook", "webhook"]


async def test_a_derived_token_for_one_instance_cannot_write_another(env: Env, hooked: Service) -> None:
    quiet_rows(env, "shop", "other")
    shops = {tokens.HEADER: tokens.derive(SECRET, "shop")}
    await refused(env, hooked, 401, "wrong_token", header_url(hooked), qr_envelope("other"), headers=shops)
    others = {tokens.HEADER: tokens.derive(SECRET, "other")}
    assert await post(header_url(hooked), qr_envelope("other"), headers=others) == ACCEPTED  # the control
    assert qr_of(env, "shop") is None


async def test_a_body_apikey_of_another_instance_is_refused(env: Env, hooked: Service) -> None:
    quiet_rows(env, "shop", "other")
    await refused(env, hooked, 401, "wrong_apikey", hook_url(hooked), qr_envelope("shop", apikey=OTHER_TOKEN))
    await refused(env, hooked, 401, "wrong_apikey", hook_url(hooked), qr_envelope("shop", apikey="guess"))
    # the controls: its own token, the global key (v1.8's global webhook), null (tokens not exposed)
    for n, apikey in enumerate((SHOP_TOKEN, GLOBAL_KEY, None)):
        reply = await post(hook_url(hooked), qr_envelope("shop", f"data:image/png;base64,{n}", apikey))
        assert reply == ACCEPTED, apikey is None


# ----------------------------------------------------------------------- refusals: counted, nothing written


async def test_a_wrong_or_missing_secret_is_401_and_writes_nothing(env: Env, hooked: Service) -> None:
    quiet_rows(env, "shop")
    body = qr_envelope("shop")
    for url in (hook_url(hooked, "guess"), hook_url(hooked, "guess") + "/qrcode-updated",
                hook_url(hooked, SECRET[:-1]), hook_url(hooked, SECRET + "x"), hook_url(hooked, SECRET.upper())):
        assert await refused(env, hooked, 401, "wrong_token", url, body) == {"error": "unauthorized"}
    await refused(env, hooked, 401, "missing_token", header_url(hooked), body)
    await refused(env, hooked, 401, "missing_token", header_url(hooked), body, headers={tokens.HEADER: ""})
    for wrong in ("guess", tokens.derive("another-secret", "shop"), SECRET[:-1], SECRET.upper()):
        await refused(env, hooked, 401, "wrong_token", header_url(hooked), body, headers={tokens.HEADER: wrong})
    assert await post(hook_url(hooked), body) == ACCEPTED  # the control


async def test_a_header_form_path_with_two_segments_is_404(env: Env, hooked: Service) -> None:
    quiet_rows(env, "shop")
    headers = {tokens.HEADER: tokens.derive(SECRET, "shop")}
    await refused(env, hooked, 404, "bad_path", hook_url(hooked) + "/qrcode-updated", qr_envelope("shop"),
                  headers=headers)
    assert await post(header_url(hooked, "/qrcode-updated"), qr_envelope("shop"), headers=headers) == ACCEPTED


async def test_webhooks_are_refused_when_no_secret_is_configured(env: Env) -> None:
    quiet_rows(env, "shop")
    async with running_service(env.settings(http_port=0, fallback_seconds=3600.0)) as service:
        for secret in ("", "None", "anything"):
            url = f"http://127.0.0.1:{service.http_port}/webhooks/evolution/{secret}".rstrip("/")
            await refused(env, service, 401, "not_configured", url, qr_envelope("shop"))
        await refused(env, service, 401, "not_configured", header_url(service), qr_envelope("shop"),
                      headers={tokens.HEADER: tokens.derive("", "shop")})


async def test_an_unknown_instance_is_404_and_writes_no_row_anywhere(env: Env, hooked: Service) -> None:
    quiet_rows(env, "shop")
    snapshot = "SELECT e.*, s.* FROM public.evolution_instances e JOIN pgqr.instance_state s ON s.key = e.id::text"
    before = env.db.query(snapshot)
    async with notifications(env.db.dsn, "pgqr_qr_updated") as collect:
        await refused(env, hooked, 404, "unknown_instance", hook_url(hooked), qr_envelope("nobody"))
        await refused(env, hooked, 404, "unknown_instance", hook_url(hooked), {
            "event": "connection.update", "instance": "nobody", "data": {"instance": "nobody", "state": "open"}})
        await refused(env, hooked, 404, "unknown_instance", header_url(hooked), qr_envelope("nobody"),
                      headers={tokens.HEADER: tokens.derive(SECRET, "nobody")})
        assert await collect() == []
    assert env.db.query(snapshot) == before
    assert env.db.value("SELECT count(*) FROM public.evolution_instances") == 1
    assert env.db.value("SELECT count(*) FROM pgqr.instance_state") == 1
    assert await post(hook_url(hooked), qr_envelope("shop")) == ACCEPTED  # the control


async def test_webhooks_posted_together_each_reach_their_own_instance(env: Env, hooked: Service) -> None:
    """Webhooks that arrive at once share their lookups (one statement for the names asked meanwhile): each
    still finds its own row, and an unknown name among them is that one webhook's 404."""
    names = [f"crowd{i}" for i in range(16)]
    quiet_rows(env, *names)
    bodies = [qr_envelope(name, f"data:image/png;base64,CROWD-{name}") for name in names]
    replies = await asyncio.gather(*(post(hook_url(hooked), body) for body in [*bodies, qr_envelope("nobody")]))
    assert replies[:-1] == [ACCEPTED] * len(names)
    assert replies[-1][0] == 404
    assert {name: qr_of(env, name) for name in names} == {name: f"data:image/png;base64,CROWD-{name}"
                                                          for name in names}
    assert (await rejections(hooked)).get("unknown_instance") == 1


async def test_a_body_that_is_not_json_is_400(env: Env, hooked: Service) -> None:
    quiet_rows(env, "shop")
    for data in (b"not json", b'{"event": "qrcode.updated",', b"\xff\xfe", b"", b'"\\'):
        assert await refused(env, hooked, 400, "bad_json", hook_url(hooked), data=data) == {
            "error": "body is not JSON"}
    assert await post(hook_url(hooked), data=json.dumps(qr_envelope("shop")).encode()) == ACCEPTED


async def test_a_body_of_the_wrong_shape_is_400(env: Env, hooked: Service) -> None:
    quiet_rows(env, "shop")
    good = qr_envelope("shop")
    for body in ([good], "shop", 7, None, {**good, "instance": 7}, {**good, "instance": ["shop"]},
                 {**good, "instance": ""}, {**good, "data": []}, {**good, "data": "x"}, {**good, "event": 1},
                 {**good, "apikey": 5}, {**good, "server_url": {}}):
        await refused(env, hooked, 400, "bad_shape", hook_url(hooked), data=json.dumps(body).encode())
    # the control: data null is what logout.instance sends; it is ignored, not refused
    assert await post(hook_url(hooked), {"event": "status.instance", "instance": "shop", "data": None,
                                         "apikey": None}) == (200, {"ignored": "status.instance"})
    assert await post(hook_url(hooked), good) == ACCEPTED


async def test_nesting_deeper_than_evolution_sends_is_400_never_a_500(env: Env, hooked: Service) -> None:
    quiet_rows(env, "shop")

    def nested(depth: int) -> bytes:  # the envelope's own 3 levels (body, data, qrcode) plus `depth` more
        inner = "[" * depth + "]" * depth
        return json.dumps(qr_envelope("shop")).replace('"code": "2@x"', f'"code": "2@x", "extra": {inner}').encode()

    for data in (b"[" * 10_000 + b"]" * 10_000, b'{"a":' * 10_000 + b"1" + b"}" * 10_000, b"[" * 100_000,
                 nested(30)):
        await refused(env, hooked, 400, "too_deep", hook_url(hooked), data=data)
    # brackets inside strings are not nesting: the control, 32 levels in all and 5,000 brackets in a string
    body = json.loads(nested(29))
    body["data"]["qrcode"]["pairingCode"] = "[{" * 2_500
    assert await post(hook_url(hooked), body) == ACCEPTED


async def test_a_body_over_one_megabyte_is_413(env: Env, hooked: Service) -> None:
    quiet_rows(env, "shop")
    huge = "data:image/png;base64," + "A" * (1024 * 1024)
    await refused(env, hooked, 413, "too_large", hook_url(hooked), qr_envelope("shop", huge))

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the cap still holds while reading
        yield json.dumps(qr_envelope("shop", huge)).encode()

    before = (await rejections(hooked)).get("too_large", 0)
    async with aiohttp.ClientSession() as http, http.post(hook_url(hooked), data=chunked()) as resp:
        assert resp.status == 413
    assert (await rejections(hooked))["too_large"] == before + 1 and written(env) == 0
    large = "data:image/png;base64," + "A" * (900 * 1024)
    assert await post(hook_url(hooked), qr_envelope("shop", large)) == ACCEPTED  # the control
    assert qr_of(env, "shop") == large


# ------------------------------------------------------------------------------------------------ JWT


def evolution_jwt(key: str = JWT_KEY, *, issued: float | None = None, **claims: Any) -> dict[str, str]:
    now = int(time.time() if issued is None else issued)
    payload = {"iat": now, "exp": now + 600, "app": "evolution", "action": "webhook", **claims}
    return {"Authorization": "Bearer " + jwt.encode(payload, key, algorithm="HS256"),
            tokens.HEADER: tokens.derive(SECRET, "shop")}


async def test_a_jwt_signed_by_evolution_is_accepted(env: Env, signed: Service) -> None:
    token = env.add("shop")
    old = await first_qr(env, "shop", webhook=False)
    hook = {"enabled": True, "url": header_url(signed), "byEvents": False, "base64": False,
            "headers": {tokens.HEADER: tokens.derive(SECRET, "shop"), "jwt_key": JWT_KEY},
            "events": ["QRCODE_UPDATED"]}
    async with aiohttp.ClientSession() as http, http.post(
            f"{env.sim.base_url}/webhook/set/shop", json={"webhook": hook}, headers={"apikey": token}) as resp:
        assert resp.status == 201
    env.sim.rotate("shop")
    [delivery] = await env.sim.wait_for_webhooks(qr_hook("shop"), timeout=5)
    assert delivery.headers["Authorization"].startswith("Bearer ") and delivery.status == 200
    await wait_until(lambda: qr_of(env, "shop") != old, 5, "the signed webhook's QR")
    assert await post(header_url(signed), qr_envelope("shop"), headers=evolution_jwt()) == ACCEPTED


async def test_a_missing_expired_or_badly_signed_jwt_is_401(env: Env, signed: Service) -> None:
    quiet_rows(env, "shop")
    body, url = qr_envelope("shop"), header_url(signed)
    await refused(env, signed, 401, "jwt_missing", url, body, headers={tokens.HEADER: tokens.derive(SECRET, "shop")})
    await refused(env, signed, 401, "jwt_missing", hook_url(signed), body)  # the path form too
    await refused(env, signed, 401, "jwt_expired", url, body, headers=evolution_jwt(issued=time.time() - 3600))
    await refused(env, signed, 401, "jwt_invalid", url, body, headers=evolution_jwt("another-key-" + "x" * 32))
    await refused(env, signed, 401, "jwt_invalid", url, body, headers=evolution_jwt(app="other"))
    unsigned = jwt.encode({"iat": int(time.time()), "exp": int(time.time()) + 600, "app": "evolution",
                           "action": "webhook"}, None, algorithm="none")
    await refused(env, signed, 401, "jwt_invalid", url, body,
                  headers={"Authorization": f"Bearer {unsigned}", tokens.HEADER: tokens.derive(SECRET, "shop")})
    assert await post(url, body, headers=evolution_jwt()) == ACCEPTED  # the control


# ------------------------------------------------------------------------------------------- the access log


async def test_the_access_log_shows_the_route_and_status_never_the_raw_path(
        env: Env, hooked: Service, caplog: pytest.LogCaptureFixture) -> None:
    quiet_rows(env, "shop")
    body = qr_envelope("shop", "data:image/png;base64,A")
    base = f"http://127.0.0.1:{hooked.http_port}"
    raw_paths = [
        (f"/webhooks/evolution/{SECRET}", 200), (f"/webhooks/evolution/{SECRET}/qrcode-updated", 200),
        (f"/webhooks/evolution/{SECRET}x", 401), (f"/webhooks/evolution/../evolution/{SECRET}", 404),
        (f"/webhooks/evolution/./{SECRET}", 401), (f"/webhook/evolution/{SECRET}", 404),
        (f"/webhooks/Evolution/{SECRET}", 404), (f"/WEBHOOKS/evolution/{SECRET}", 404),
        (f"/webhooks/evolution%2F{SECRET}", 404), (f"/webhooks%2Fevolution%2F{SECRET}", 404),
        (f"/%77ebhooks/evolution/{SECRET}", 200), (f"/webhooks/evolution/%2e%2e/evolution/{SECRET}", 404),
        (f"//webhooks/evolution/{SECRET}", 404), (f"/pgqr/webhooks/evolution/{SECRET}", 404),
        (f"/webhooks/evolution/{SECRET}/qrcode-updated/extra", 404), (f"/webhooks/evolution//{SECRET}", 404),
        (f"/webhooks/evolution?token={SECRET}", 401), (f"/x/{SECRET}", 404), (f"/%2e%2e/x/{SECRET}", 404),
    ]
    for raw, status in raw_paths:  # raw on the wire: no client-side normalisation of the path
        reader, writer = await asyncio.open_connection("127.0.0.1", hooked.http_port)
        payload = json.dumps(body).encode()
        writer.write(f"POST {raw} HTTP/1.1\r\nHost: pgqr\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        reply = await reader.read()
        writer.close()
        assert reply.split(b" ", 2)[1] == str(status).encode(), raw
    assert (await post(base + f"/webhooks/evolution/{SECRET}", data=b"nope"))[0] == 400

    def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "pgqr.web.access" and "metrics" not in r.getMessage()]

    # the access log is written after the reply: wait for the last request's line
    await wait_until(lambda: len(logged()) >= len(raw_paths) + 1, 10, "the access log of every request")
    records = logged()
    assert [r.status for r in records] == [s for _, s in raw_paths] + [400]  # type: ignore[attr-defined]
    paths = {r.path for r in records}  # type: ignore[attr-defined]
    assert paths == {"/webhooks/evolution/{first}", "/webhooks/evolution/{first}/{second}", "/webhooks/evolution",
                     "(unmatched)"}
    counted = await rejections(hooked)
    assert counted["wrong_token"] == 2 and counted["bad_path"] == 11  # the stray /webhook paths are counted too


# -------------------------------------------------------------------------- the write path under webhooks


async def test_a_webhook_qr_newer_than_a_polls_claim_survives_the_polls_late_write(
        env: Env, hooked: Service) -> None:
    quiet_rows(env, "shop")
    key = str(env.row("shop")["id"])
    env.make_due("shop")  # no NOTIFY: the running service's engine sleeps on
    with env.db.connect() as conn:
        [claimed] = conn.execute("SELECT * FROM pgqr.claim('slow-poller', 10, interval '30 seconds')").fetchall()
    webhook_qr = "data:image/png;base64,FROM-WEBHOOK"
    async with notifications(env.db.dsn, "pgqr_qr_updated") as collect:
        assert await post(hook_url(hooked), qr_envelope("shop", webhook_qr)) == ACCEPTED
        with env.db.connect() as conn:
            late = conn.execute("SELECT * FROM pgqr.record_results('slow-poller', %s::jsonb)", (json.dumps([{
                "key": key, "source": "poll", "outcome": "qr", "qr": "data:image/png;base64,FROM-POLL",
                "md5": "poll-md5", "http_status": 200, "claim_id": claimed["claim_id"]}]),)).fetchall()
        payloads = await collect()
    assert [(r["written"], r["qr_updated"]) for r in late] == [(True, False)]
    row = env.row("shop")
    assert row["qr_code"] == webhook_qr
    assert row["lease_owner"] is None  # the poll still gave its lease back
    assert [p["key"] for p in payloads] == [key]  # announced once, for the webhook
    assert [(r["source"], r["qr_updated"]) for r in env.log("shop")] == [("webhook", True), ("poll", False)]


async def test_a_poll_write_back_and_a_webhook_for_the_same_instance_do_not_deadlock(env: Env) -> None:
    quiet_rows(env, "shop")
    key = str(env.row("shop")["id"])
    env.make_due("shop")  # no NOTIFY: the running service's engine sleeps on
    with env.db.connect() as conn:
        [claimed] = conn.execute("SELECT * FROM pgqr.claim('replica-a', 10, interval '30 seconds')").fetchall()
    poll = [{"key": key, "source": "poll", "outcome": "qr", "qr": "data:image/png;base64,POLL", "md5": "p",
             "claim_id": claimed["claim_id"]}]
    hook = [{"key": key, "source": "webhook", "outcome": "qr", "qr": "data:image/png;base64,HOOK", "md5": "h"}]
    # a third session briefly holding the instance: its schedule row, the lock every writer takes first
    holder = await psycopg.AsyncConnection.connect(env.db.dsn)
    replica_a = await psycopg.AsyncConnection.connect(env.db.dsn, autocommit=True)
    replica_b = await psycopg.AsyncConnection.connect(env.db.dsn, autocommit=True)
    try:
        await holder.execute("SELECT 1 FROM pgqr.schedule WHERE key = %s FOR UPDATE", (key,))
        write = "SELECT * FROM pgqr.record_results(%s, %s::jsonb)"
        first = await (await replica_a.execute(write, ("replica-a", json.dumps(poll)))).fetchall()
        second = await (await replica_b.execute(write, ("replica-b", json.dumps(hook)))).fetchall()
        await holder.commit()
        # nothing waits for a lock: each held row is reported busy, and the callers hand them in again
        assert [r[3] for r in first] == [True] and [r[3] for r in second] == [True]
        outcomes = await asyncio.gather(replica_a.execute(write, ("replica-a", json.dumps(poll))),
                                        replica_b.execute(write, ("replica-b", json.dumps(hook))))
        assert len(outcomes) == 2
    finally:
        for session in (holder, replica_a, replica_b):
            await session.close()
    assert qr_of(env, "shop") in ("data:image/png;base64,HOOK", "data:image/png;base64,POLL")
