"""`pgqr status/doctor/schedule/pause/resume/uninstall` as subprocesses against real databases."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator

import aiohttp
import psycopg
import pytest
from aiohttp import web
from conftest import Database, run_pgqr
from sim_fixtures import serve

from pgqr import devdb, tokens
from pgqr.simulator import Simulator

TOKEN = "instance-token-" + "z" * 12


def cron_jobs(db: Database) -> dict[str, tuple[str, bool, str]]:
    """This database's jobs in pg_cron: name -> (schedule, active, database)."""
    with psycopg.connect(db.server.dsn("postgres")) as conn:
        rows = conn.execute("SELECT jobname, schedule, active, database FROM cron.job WHERE jobname LIKE %s",
                            (f"%@{db.name}",)).fetchall()
    return {str(n).split("@")[0]: (str(s), bool(a), str(d)) for n, s, a, d in rows}


def pgqr(db: Database, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_pgqr(*args, env={"DATABASE_URL": db.dsn, **env})


def add(db: Database, name: str, token: str | None = TOKEN, status: str = "connecting") -> None:
    db.query("INSERT INTO public.evolution_instances (instance_name, instance_token, instance_status) "
             "VALUES (%s, %s, %s)", (name, token, status))


# ------------------------------------------------------------------------------------------------ status


def test_status_prints_each_instance_as_a_table(migrated: Database) -> None:
    add(migrated, "alpha")
    add(migrated, "beta", status="connected")
    migrated.query("SELECT pgqr.heartbeat('h:1:x', 'h', 1, '0.1.0')")
    result = pgqr(migrated, "status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["INSTANCE", "STATUS", "QR", "AGE", "QR", "EXPIRES", "LAST", "ATTEMPT", "OUTCOME",
                                "FAILURES", "NEXT", "ATTEMPT", "LEASE"]
    assert lines[1].split()[:2] == ["alpha", "connecting"] and lines[2].split()[:2] == ["beta", "connected"]
    assert "listeners: 1 live" in result.stdout and "jobs: 4/4 active" in result.stdout
    assert TOKEN not in result.stdout


def test_status_json_is_the_pgqr_status_document(migrated: Database) -> None:
    add(migrated, "alpha")
    migrated.query("SELECT pgqr.tick()")
    result = pgqr(migrated, "status", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [i["instance_name"] for i in doc["instances"]] == ["alpha"]
    assert doc["instances"][0]["status"] == "connecting" and doc["instances"][0]["qr_age_seconds"] is None
    assert {j["name"] for j in doc["jobs"]} == {"pgqr-tick", "pgqr-alerts", "pgqr-housekeeping",
                                                "pgqr-cron-history"}
    assert doc["last_tick_at"] is not None and doc["alerts_firing"] == [] and doc["listeners"] == []
    assert TOKEN not in result.stdout and '"token":' not in result.stdout


def test_status_shows_at_most_limit_instances_failing_and_waiting_first_and_counts_the_rest(
        migrated: Database) -> None:
    migrated.query("INSERT INTO public.evolution_instances (instance_name, instance_status) "
                   "SELECT 'done-' || i, 'connected' FROM generate_series(1, 5) i")
    add(migrated, "waiting")
    migrated.query("SELECT pgqr.tick()")
    result = pgqr(migrated, "status", "--limit", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:3]] == ["waiting", "done-1"]
    assert not any(line.startswith("done-2") for line in lines)
    assert lines[-1].startswith("showing 2 of 6 instances (1 waiting)")
    every = pgqr(migrated, "status", "--limit", "0").stdout
    assert all(f"done-{i} " in every for i in range(1, 6)) and "showing" not in every


def test_the_database_builds_the_paged_status_document_failing_then_expired_first(migrated: Database) -> None:
    migrated.query("INSERT INTO public.evolution_instances (instance_name, instance_status) "
                   "SELECT 'done-' || i, 'connected' FROM generate_series(1, 3) i")
    add(migrated, "expired")
    add(migrated, "failing")
    migrated.query("SELECT pgqr.tick()")
    migrated.query("UPDATE pgqr.schedule SET consecutive_failures = 2 "
                   "WHERE key = (SELECT key FROM pgqr.instance_state WHERE name = 'failing')")
    paged = migrated.value("SELECT pgqr.status(2)")
    assert [i["instance_name"] for i in paged["instances"]] == ["failing", "expired"]
    assert (paged["instances_total"], paged["instances_waiting"]) == (5, 2)
    whole = migrated.value("SELECT pgqr.status()")
    assert [i["instance_name"] for i in whole["instances"]] == ["done-1", "done-2", "done-3", "expired", "failing"]
    assert {k: v for k, v in whole.items() if k != "instances"} == {k: v for k, v in paged.items()
                                                                     if k != "instances"}


def test_status_on_a_database_without_pgqr_says_to_migrate(db: Database) -> None:
    result = pgqr(db, "status")
    assert result.returncode == 2
    assert result.stderr == f"pgqr: pgqr is not installed in database {db.name}: run `pgqr migrate` first\n"


def test_commands_without_a_database_url_exit_2() -> None:
    for command in ("status", "uninstall"):
        result = run_pgqr(command)
        assert result.returncode == 2, command
        assert "DATABASE_URL is not set" in result.stderr


# ------------------------------------------------------------------------------------------------ doctor


async def test_doctor_passes_every_check_on_a_healthy_installation(migrated: Database, simulator: Simulator) -> None:
    simulator.add_instance("alpha", TOKEN)
    add(migrated, "alpha")
    migrated.query("SELECT pgqr.heartbeat('h:1:x', 'h', 1, '0.1.0')")
    result = await asyncio.to_thread(
        pgqr, migrated, "doctor", EVOLUTION_API_URL=simulator.base_url, EVOLUTION_API_KEY=simulator.config.api_key)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = result.stdout.splitlines()[:-1]
    assert [c.split()[1].rstrip(":") for c in checks] == [
        "pg_cron", "schema", "jobs", "job", "binding", "names", "servers", "listener", "listen", "tokens", "evolution",
        "instances", "webhooks"]
    assert all(c.startswith("PASS") for c in checks)
    assert "lives in database postgres" in result.stdout
    assert simulator.config.api_key not in result.stdout + result.stderr


async def test_doctor_explains_each_failure_with_its_fix(migrated: Database, simulator: Simulator) -> None:
    add(migrated, "alpha", token=None)
    result = await asyncio.to_thread(
        pgqr, migrated, "doctor", EVOLUTION_API_URL=simulator.base_url)
    assert result.returncode == 1
    lines = {line.split()[1].rstrip(":"): line for line in result.stdout.splitlines() if line[:4] in ("PASS", "FAIL")}
    assert lines["listener"].startswith("FAIL") and "fix: start `pgqr run`" in lines["listener"]
    assert lines["tokens"].startswith("FAIL") and "1 instance(s) have no token of their own" in lines["tokens"]
    assert "fix: set EVOLUTION_API_KEY" in lines["tokens"]
    assert lines["evolution"].startswith("PASS")  # reachable; nothing to check the key with
    assert lines["jobs"].startswith("PASS")


async def test_doctor_fails_on_a_wrong_key_and_on_paused_jobs(migrated: Database, simulator: Simulator) -> None:
    add(migrated, "alpha")
    migrated.query("SELECT pgqr.heartbeat('h:1:x', 'h', 1, '0.1.0')")
    assert pgqr(migrated, "pause").returncode == 0
    result = await asyncio.to_thread(
        pgqr, migrated, "doctor", EVOLUTION_API_URL=simulator.base_url, EVOLUTION_API_KEY="wrong-key-123")
    assert result.returncode == 1
    lines = {line.split()[1].rstrip(":"): line for line in result.stdout.splitlines() if line[:4] in ("PASS", "FAIL")}
    assert lines["evolution"].startswith("FAIL") and "rejects EVOLUTION_API_KEY" in lines["evolution"]
    assert lines["jobs"].startswith("FAIL") and "fix: run `pgqr resume`" in lines["jobs"]
    assert "wrong-key-123" not in result.stdout + result.stderr


def checks(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """doctor's lines by check name."""
    return {line.split()[1].rstrip(":"): line for line in result.stdout.splitlines() if line[:4] in ("PASS", "FAIL")}


async def doctor(db: Database, **env: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(pgqr, db, "doctor", **env)


async def test_doctor_fails_an_instance_token_in_evolution_api_key_when_rows_need_the_global_key(
        migrated: Database, simulator: Simulator) -> None:
    simulator.add_instance("alpha", TOKEN)
    simulator.add_instance("beta")
    add(migrated, "alpha")
    add(migrated, "beta", token=None)
    result = await doctor(migrated, EVOLUTION_API_URL=simulator.base_url, EVOLUTION_API_KEY=TOKEN)
    line = checks(result)["evolution"]
    assert result.returncode == 1
    assert line.startswith("FAIL") and "instance 'alpha''s token, not the global key" in line
    assert "1 instance(s) without a token of their own get 401" in line
    assert "fix: set EVOLUTION_API_KEY to Evolution's global key" in line
    assert TOKEN not in result.stdout + result.stderr
    # the control: the global key is told apart and named
    result = await doctor(migrated, EVOLUTION_API_URL=simulator.base_url, EVOLUTION_API_KEY=simulator.config.api_key)
    assert checks(result)["evolution"].startswith(f"PASS  evolution: {simulator.base_url} accepts EVOLUTION_API_KEY "
                                                  "as the global key")


async def test_doctor_passes_an_instance_token_in_evolution_api_key_when_every_row_has_its_own(
        migrated: Database, simulator: Simulator) -> None:
    simulator.add_instance("alpha", TOKEN)
    add(migrated, "alpha")
    result = await doctor(migrated, EVOLUTION_API_URL=simulator.base_url, EVOLUTION_API_KEY=TOKEN)
    line = checks(result)["evolution"]
    assert line.startswith("PASS") and "instance 'alpha''s token" in line and "it is not used" in line


async def test_doctor_names_wrong_row_tokens_and_names_evolution_does_not_know(
        migrated: Database, simulator: Simulator) -> None:
    simulator.add_instance("alpha", TOKEN)
    simulator.add_instance("beta", "the-real-TOKEN-of-beta")
    add(migrated, "alpha")
    add(migrated, "beta", token="a-wrong-TOKEN-for-beta")
    ghosts = [f"ghost-{i:02d}" for i in range(12)]
    for name in ghosts:
        add(migrated, name)
    add(migrated, "done", token="never-checked", status="connected")  # not waiting: not called
    result = await doctor(migrated, EVOLUTION_API_URL=simulator.base_url, EVOLUTION_API_KEY=simulator.config.api_key)
    line = checks(result)["instances"]
    assert result.returncode == 1 and line.startswith("FAIL")
    assert f"13 of 14 waiting instance(s) will fail: at {simulator.base_url}: 1 wrong token (401): beta; " in line
    assert "12 unknown to Evolution (404): " + ", ".join(ghosts[:10]) + " (+2 more)" in line
    assert "fix: put the instance's own Evolution token" in line and "create the instance in Evolution" in line
    for secret in ("the-real-TOKEN-of-beta", "a-wrong-TOKEN-for-beta", TOKEN, simulator.config.api_key):
        assert secret not in result.stdout + result.stderr
    assert simulator.stats("alpha").connect_calls == 0  # connectionState only: no socket was started
    # the control: with the right token every waiting row passes
    migrated.query("UPDATE public.evolution_instances SET instance_token = 'the-real-TOKEN-of-beta' "
                   "WHERE instance_name = 'beta'")
    migrated.query("DELETE FROM public.evolution_instances WHERE instance_name LIKE 'ghost-%'")
    result = await doctor(migrated, EVOLUTION_API_URL=simulator.base_url, EVOLUTION_API_KEY=simulator.config.api_key)
    assert checks(result)["instances"].startswith("PASS  instances: 2 waiting instance(s) known to Evolution")


@pytest.fixture
async def behind_a_path(simulator: Simulator) -> AsyncIterator[str]:
    """The simulator behind a reverse proxy at /api (as Evolution often is); yields the proxy's base URL."""

    async def forward(request: web.Request) -> web.Response:
        async with aiohttp.ClientSession() as http, http.request(
                request.method, f"{simulator.base_url}/{request.match_info['tail']}",
                headers={"apikey": request.headers.get("apikey", "")}, data=await request.read()) as resp:
            return web.Response(status=resp.status, body=await resp.read(), content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/api/{tail:.*}", forward)
    async with serve(app) as base:
        yield base + "/api"


async def test_doctor_shows_the_whole_base_url_with_its_path_and_without_credentials(
        migrated: Database, simulator: Simulator, behind_a_path: str) -> None:
    simulator.add_instance("alpha", TOKEN)
    add(migrated, "alpha")
    migrated.query("SELECT pgqr.heartbeat('h:1:x', 'h', 1, '0.1.0')")
    with_credentials = behind_a_path.replace("http://", "http://admin:pa55word@")
    result = await doctor(migrated, EVOLUTION_API_URL=with_credentials, EVOLUTION_API_KEY=simulator.config.api_key)
    assert result.returncode == 0, result.stdout
    lines = checks(result)
    assert f"{behind_a_path} accepts EVOLUTION_API_KEY as the global key" in lines["evolution"]
    assert f"at {behind_a_path}" in lines["instances"]
    assert "pa55word" not in result.stdout + result.stderr and "admin" not in result.stdout
    # the same server without its path: every message says which URL failed
    bare = behind_a_path.removesuffix("/api")
    result = await doctor(migrated, EVOLUTION_API_URL=bare, EVOLUTION_API_KEY=simulator.config.api_key)
    lines = checks(result)
    assert lines["evolution"].startswith(f"FAIL  evolution: {bare} is not usable: not_found")
    assert lines["instances"].startswith(f"FAIL  instances: 1 of 1 waiting instance(s) will fail: at {bare}: ")


# --------------------------------------------------------------------------------------- webhooks register

SECRET = "hook-SECRET-5e6f7a"
PUBLIC = "http://pgqr.internal:8080"


async def find_webhook(simulator: Simulator, name: str) -> dict[str, object] | None:
    """What the simulator stores for the instance (GET /webhook/find, as Evolution answers it)."""
    async with aiohttp.ClientSession() as http, http.get(
            f"{simulator.base_url}/webhook/find/{name}", headers={"apikey": simulator.config.api_key}) as resp:
        assert resp.status == 200
        found: dict[str, object] | None = await resp.json()
        return found


async def register(db: Database, simulator: Simulator, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    values = {"EVOLUTION_API_URL": simulator.base_url, "PGQR_WEBHOOK_SECRET": SECRET, "PGQR_PUBLIC_URL": PUBLIC,
              **env}
    result = await asyncio.to_thread(pgqr, db, "webhooks", "register", *args, **values)
    for secret in (SECRET, TOKEN, simulator.config.api_key, *(tokens.derive(SECRET, n) for n in simulator.instances)):
        assert secret not in result.stdout + result.stderr
    return result


def registered_for(name: str) -> dict[str, object]:
    return {"url": f"{PUBLIC}/webhooks/evolution", "enabled": True, "events": ["QRCODE_UPDATED", "CONNECTION_UPDATE"],
            "headers": {tokens.HEADER: tokens.derive(SECRET, name)}, "webhookByEvents": False}


def stored(found: dict[str, object] | None) -> dict[str, object] | None:
    keys = ("url", "enabled", "events", "headers", "webhookByEvents")
    return None if found is None else {k: found[k] for k in keys}


async def set_webhook(simulator: Simulator, name: str, url: str, headers: dict[str, str] | None = None) -> None:
    """Set a webhook by hand, as an operator might in Evolution's manager."""
    hook = {"enabled": True, "url": url, "events": ["QRCODE_UPDATED", "CONNECTION_UPDATE"], "headers": headers}
    async with aiohttp.ClientSession() as http, http.post(
            f"{simulator.base_url}/webhook/set/{name}", headers={"apikey": simulator.config.api_key},
            json={"webhook": hook}) as resp:
        assert resp.status == 201


def in_both(db: Database, simulator: Simulator, *names: str) -> None:
    """Each instance in Evolution and in the app's table, with a token of its own."""
    for name in names:
        simulator.add_instance(name, f"{name}-{TOKEN}")
        add(db, name, token=f"{name}-{TOKEN}")


async def test_webhooks_register_sets_one_instances_webhook_with_its_derived_token(
        migrated: Database, simulator: Simulator) -> None:
    simulator.add_instance("alpha", TOKEN)
    simulator.add_instance("beta", "token-of-beta-" + "b" * 8)
    add(migrated, "alpha")
    add(migrated, "beta", token="token-of-beta-" + "b" * 8)
    result = await register(migrated, simulator, "--instance", "alpha")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["alpha\tok\tset (was: missing (pgqr gets no posts))",
                                          f"1 instance(s): 1 point at {PUBLIC}/webhooks/evolution, 0 failed"]
    assert stored(await find_webhook(simulator, "alpha")) == registered_for("alpha")
    assert await find_webhook(simulator, "beta") is None


async def test_webhooks_register_all_is_idempotent(migrated: Database, simulator: Simulator) -> None:
    in_both(migrated, simulator, "alpha", "beta", "gamma")
    first = await register(migrated, simulator, "--all")
    assert first.returncode == 0, first.stdout + first.stderr
    rows = {n: await find_webhook(simulator, n) for n in ("alpha", "beta", "gamma")}
    assert {n: stored(r) for n, r in rows.items()} == {n: registered_for(n) for n in rows}
    again = await register(migrated, simulator, "--all")
    assert again.returncode == 0
    assert [line.split("\t")[1:] for line in again.stdout.splitlines()[:3]] == [["ok", "unchanged"]] * 3
    for name, row in rows.items():
        assert await find_webhook(simulator, name) == row  # not even set again: updatedAt is the first run's


async def test_webhooks_register_dry_run_changes_nothing(migrated: Database, simulator: Simulator) -> None:
    simulator.add_instance("alpha", TOKEN)
    add(migrated, "alpha")
    result = await register(migrated, simulator, "--all", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["alpha\tok\twould set (now: missing (pgqr gets no posts))",
                                          f"1 instance(s): 1 would point at {PUBLIC}/webhooks/evolution, 0 failed"]
    assert await find_webhook(simulator, "alpha") is None


async def test_webhooks_register_reports_each_failed_instance_and_exits_1(
        migrated: Database, simulator: Simulator) -> None:
    simulator.add_instance("alpha", TOKEN)
    simulator.add_instance("beta", "the-real-TOKEN-of-beta")
    simulator.add_instance("gamma")
    add(migrated, "alpha")
    add(migrated, "beta", token="a-wrong-TOKEN-for-beta")
    add(migrated, "gamma", token=None)
    add(migrated, "ghost")
    result = await register(migrated, simulator, "--all")
    assert result.returncode == 1
    lines = dict(line.split("\t", 1) for line in result.stdout.splitlines()[:-1])
    assert lines["alpha"] == "ok\tset (was: missing (pgqr gets no posts))"
    assert lines["beta"].startswith(f"FAILED\tcannot read its webhook at {simulator.base_url}: unauthorized")
    assert lines["gamma"] == "FAILED\tno token of its own and EVOLUTION_API_KEY is not set"
    assert lines["ghost"].startswith("FAILED") and "not_found" in lines["ghost"]
    assert result.stdout.splitlines()[-1].endswith("1 point at http://pgqr.internal:8080/webhooks/evolution, 3 failed")
    assert "a-wrong-TOKEN-for-beta" not in result.stdout
    # the control: with the global key the token-less row is set too
    result = await register(migrated, simulator, "--instance", "gamma", EVOLUTION_API_KEY=simulator.config.api_key)
    assert result.returncode == 0 and stored(await find_webhook(simulator, "gamma")) == registered_for("gamma")


async def test_webhooks_register_needs_a_public_url_and_a_secret(migrated: Database, simulator: Simulator) -> None:
    simulator.add_instance("alpha", TOKEN)
    add(migrated, "alpha")
    for missing in ("PGQR_PUBLIC_URL", "PGQR_WEBHOOK_SECRET"):
        result = await register(migrated, simulator, "--all", **{missing: ""})
        assert result.returncode == 2 and missing in result.stderr
    result = await register(migrated, simulator, "--instance", "nobody")
    assert result.returncode == 1 and "no instance named 'nobody'" in result.stdout
    assert await find_webhook(simulator, "alpha") is None


async def test_doctor_reports_instances_whose_webhook_is_missing_or_points_elsewhere(
        migrated: Database, simulator: Simulator) -> None:
    in_both(migrated, simulator, "alpha", "beta", "gamma")
    hooks_env = {"PGQR_WEBHOOK_SECRET": SECRET, "PGQR_PUBLIC_URL": PUBLIC}
    assert (await register(migrated, simulator, "--instance", "alpha")).returncode == 0
    await set_webhook(simulator, "gamma", "http://elsewhere.example/hook")
    result = await doctor(migrated, EVOLUTION_API_URL=simulator.base_url, **hooks_env)
    line = checks(result)["webhooks"]
    assert result.returncode == 1 and line.startswith("FAIL")
    assert f"2 of 3 waiting instance(s) have no webhook that {PUBLIC}/webhooks/evolution accepts" in line
    assert (f"at {simulator.base_url}: 1 missing (pgqr gets no posts): beta; 1 points elsewhere (pgqr gets no "
            "posts): gamma") in line
    assert "fix: run `pgqr webhooks register --all`" in line
    # the controls: registered, every instance passes; with the global webhook doctor says it cannot see it
    assert (await register(migrated, simulator, "--all")).returncode == 0
    result = await doctor(migrated, EVOLUTION_API_URL=simulator.base_url, **hooks_env)
    assert checks(result)["webhooks"].startswith("PASS  webhooks: 3 waiting instance(s)")
    result = await doctor(migrated, EVOLUTION_API_URL=simulator.base_url, PGQR_GLOBAL_WEBHOOK="true", **hooks_env)
    assert checks(result)["webhooks"].startswith("PASS  webhooks: PGQR_GLOBAL_WEBHOOK=true")
    assert "doctor cannot see it" in checks(result)["webhooks"]
    result = await doctor(migrated, EVOLUTION_API_URL=simulator.base_url, PGQR_GLOBAL_WEBHOOK="true",
                          PGQR_WEBHOOK_JWT_KEY="k" * 32, **hooks_env)
    assert checks(result)["webhooks"].startswith("FAIL") and "sends no Authorization header" in result.stdout
    assert SECRET not in result.stdout and "k" * 32 not in result.stdout


ROTATED = "hook-ROTATED-9d8c7b"
JWT_KEY, ROTATED_JWT_KEY = "jwt-KEY-" + "j" * 24, "jwt-ROTATED-" + "r" * 24


def no_secret_in(result: subprocess.CompletedProcess[str], simulator: Simulator) -> None:
    shown = result.stdout + result.stderr
    derived = [tokens.derive(s, n) for s in (SECRET, ROTATED) for n in simulator.instances]
    for secret in (SECRET, ROTATED, JWT_KEY, ROTATED_JWT_KEY, TOKEN, simulator.config.api_key, *derived):
        assert secret not in shown


async def test_doctor_after_a_webhook_secret_rotation_names_the_instances_that_get_401(
        migrated: Database, simulator: Simulator) -> None:
    in_both(migrated, simulator, "alpha", "beta", "gamma")
    before = {"PGQR_WEBHOOK_SECRET": SECRET, "PGQR_WEBHOOK_JWT_KEY": JWT_KEY}
    after = {"PGQR_WEBHOOK_SECRET": ROTATED, "PGQR_WEBHOOK_JWT_KEY": ROTATED_JWT_KEY}
    assert (await register(migrated, simulator, "--all", **before)).returncode == 0
    result = await doctor(migrated, EVOLUTION_API_URL=simulator.base_url, PGQR_PUBLIC_URL=PUBLIC, **before)
    assert checks(result)["webhooks"].startswith("PASS  webhooks: 3 waiting instance(s)"), result.stdout  # control

    # the secret and the JWT key are rotated; only alpha is registered again
    assert (await register(migrated, simulator, "--instance", "alpha", **after)).returncode == 0
    result = await doctor(migrated, EVOLUTION_API_URL=simulator.base_url, PGQR_PUBLIC_URL=PUBLIC, **after)
    no_secret_in(result, simulator)
    line = checks(result)["webhooks"]
    assert result.returncode == 1 and line.startswith("FAIL  webhooks: 2 of 3 waiting instance(s)"), line
    assert (f"at {simulator.base_url}: 2 wrong X-Pgqr-Token and wrong jwt_key (401): beta, gamma -> "
            "fix: run `pgqr webhooks register --all`") in line

    # --dry-run says what register would do, and sets nothing
    for name in ("alpha", "beta", "gamma"):
        webhook = simulator.instances[name].webhook
        assert webhook is not None
        webhook["updatedAt"] = "untouched"  # webhook/set stamps its own time: a set would show
    result = await register(migrated, simulator, "--all", "--dry-run", **after)
    assert result.stdout.splitlines()[:3] == [
        "alpha\tok\tunchanged", "beta\tok\twould set (now: wrong X-Pgqr-Token and wrong jwt_key (401))",
        "gamma\tok\twould set (now: wrong X-Pgqr-Token and wrong jwt_key (401))"], result.stdout
    assert [(await find_webhook(simulator, n) or {})["updatedAt"] for n in ("alpha", "beta", "gamma")] == \
        ["untouched"] * 3

    # register --all sets beta and gamma and leaves alpha alone; then doctor passes
    result = await register(migrated, simulator, "--all", **after)
    assert result.returncode == 0 and result.stdout.splitlines()[0] == "alpha\tok\tunchanged", result.stdout
    assert [(await find_webhook(simulator, n) or {})["updatedAt"] == "untouched" for n in ("alpha", "beta", "gamma")] \
        == [True, False, False]
    for name in ("beta", "gamma"):
        assert (await find_webhook(simulator, name) or {})["headers"] == {
            tokens.HEADER: tokens.derive(ROTATED, name), "jwt_key": ROTATED_JWT_KEY}
    result = await doctor(migrated, EVOLUTION_API_URL=simulator.base_url, PGQR_PUBLIC_URL=PUBLIC, **after)
    assert checks(result)["webhooks"].startswith("PASS  webhooks: 3 waiting instance(s)"), result.stdout


async def test_doctor_names_what_each_wrong_webhook_gets_from_pgqr(migrated: Database, simulator: Simulator) -> None:
    names = ("jwt-missing", "jwt-stale", "old-path-secret", "wrong-path", "path-form", "global-secret")
    in_both(migrated, simulator, *names)
    hook = f"{PUBLIC}/webhooks/evolution"
    await set_webhook(simulator, "jwt-missing", hook, {tokens.HEADER: tokens.derive(SECRET, "jwt-missing")})
    await set_webhook(simulator, "jwt-stale", hook,
                      {tokens.HEADER: tokens.derive(SECRET, "jwt-stale"), "jwt_key": ROTATED_JWT_KEY})
    await set_webhook(simulator, "old-path-secret", f"{hook}/{ROTATED}", {"jwt_key": JWT_KEY})
    await set_webhook(simulator, "wrong-path", f"{PUBLIC}/webhook/evolution",
                      {tokens.HEADER: tokens.derive(SECRET, "wrong-path"), "jwt_key": JWT_KEY})
    # the controls: the path form with the secret, and the header form with the secret itself, are accepted
    await set_webhook(simulator, "path-form", f"{hook}/{SECRET}", {"jwt_key": JWT_KEY})
    await set_webhook(simulator, "global-secret", hook, {tokens.HEADER: SECRET, "jwt_key": JWT_KEY})
    result = await doctor(migrated, EVOLUTION_API_URL=simulator.base_url, PGQR_PUBLIC_URL=PUBLIC,
                          PGQR_WEBHOOK_SECRET=SECRET, PGQR_WEBHOOK_JWT_KEY=JWT_KEY)
    no_secret_in(result, simulator)
    line = checks(result)["webhooks"]
    assert line.startswith("FAIL  webhooks: 4 of 6 waiting instance(s)"), line
    for finding in ("1 without jwt_key (PGQR_WEBHOOK_JWT_KEY is set) (401): jwt-missing",
                    "1 wrong jwt_key (401): jwt-stale", "1 wrong secret in the URL (401): old-path-secret",
                    "1 points at pgqr but not at /webhooks/evolution (404): wrong-path"):
        assert finding in line, line
    assert "path-form" not in line and "global-secret" not in line


def test_doctor_reports_a_failed_last_job_run(migrated: Database) -> None:
    migrated.query("SELECT pgqr.heartbeat('h:1:x', 'h', 1, '0.1.0')")
    with psycopg.connect(migrated.server.dsn("postgres"), autocommit=True) as conn:
        # A real run at a minute boundary would be newer than the failure: stop real runs, and date the
        # failure after any run pg_cron may still start before it notices.
        migrated.pause_cron()
        conn.execute(
            """INSERT INTO cron.job_run_details (jobid, runid, database, username, command, status,
                                                 return_message, start_time, end_time)
               SELECT jobid, nextval('cron.runid_seq'), database, username, command, 'failed',
                      'ERROR:  relation "pgqr.ticks" does not exist', now() + interval '5 seconds',
                      now() + interval '5 seconds'
               FROM cron.job WHERE jobname = %s""", (f"pgqr-tick@{migrated.name}",))
    result = pgqr(migrated, "doctor", EVOLUTION_API_KEY="k")
    line = next(x for x in result.stdout.splitlines() if " job runs:" in x)
    assert result.returncode == 1
    assert line.startswith("FAIL") and f"pgqr-tick@{migrated.name}" in line and "does not exist" in line


def test_doctor_names_an_unreachable_listen_url_in_one_line_without_its_password(migrated: Database) -> None:
    password = "listen-PASSWORD-0a9b"
    port = devdb.free_port()  # nothing listens there
    result = pgqr(migrated, "doctor", PGQR_LISTEN_DATABASE_URL=f"postgresql://pgqr:{password}@127.0.0.1:{port}/app")
    line = checks(result)["listen"]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert line.startswith(f"FAIL  listen: cannot connect to PGQR_LISTEN_DATABASE_URL (host 127.0.0.1 port {port}, "
                           "database app, user pgqr): "), line
    assert line.endswith("-> fix: set PGQR_LISTEN_DATABASE_URL to a direct or session-mode URL of this database's "
                         "primary"), line
    assert password not in result.stdout + result.stderr
    # the control: the database's own URL as the listen URL
    result = pgqr(migrated, "doctor", PGQR_LISTEN_DATABASE_URL=migrated.dsn)
    assert checks(result)["listen"].startswith("PASS  listen: a NOTIFY from another connection reached a LISTEN on "
                                               "PGQR_LISTEN_DATABASE_URL"), result.stdout


def test_doctor_on_a_database_without_pgqr_says_to_migrate(db: Database) -> None:
    result = pgqr(db, "doctor")
    assert result.returncode == 1
    assert "FAIL  schema: pgqr is not installed" in result.stdout and "fix: run `pgqr migrate`" in result.stdout


# ----------------------------------------------------------------------------- schedule, pause, resume


def test_schedule_every_five_minutes_changes_the_tick_job_in_pg_cron(migrated: Database) -> None:
    result = pgqr(migrated, "schedule", "--every", "5 minutes")
    assert result.returncode == 0, result.stderr
    assert "*/5 * * * *" in result.stdout
    assert cron_jobs(migrated)["pgqr-tick"] == ("*/5 * * * *", True, migrated.name)
    assert migrated.value("SELECT schedule FROM pgqr.jobs WHERE name = 'pgqr-tick'") == "*/5 * * * *"
    assert migrated.value("SELECT value FROM pgqr.settings WHERE key = 'tick_every'") == "00:05:00"
    assert pgqr(migrated, "schedule", "--every", "1h").returncode == 0
    assert cron_jobs(migrated)["pgqr-tick"][0] == "0 * * * *"


def test_schedule_sub_minute_on_pg_cron_1_4_names_the_version_needed(migrated: Database) -> None:
    result = pgqr(migrated, "schedule", "--every", "30s")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "pg_cron 1.5 or later" in result.stderr and "1.4" in result.stderr
    assert cron_jobs(migrated)["pgqr-tick"][0] == "* * * * *"


def test_schedule_refuses_periods_it_cannot_express(migrated: Database) -> None:
    for every, message in (("7 fortnights", "--every must be"), ("7 minutes", "minutes that divide an hour")):
        result = pgqr(migrated, "schedule", "--every", every)
        assert result.returncode == 2, every
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_pause_and_resume_switch_every_pgqr_job_in_pg_cron(migrated: Database) -> None:
    paused = pgqr(migrated, "pause")
    assert paused.returncode == 0, paused.stderr
    assert {name: active for name, (_, active, _) in cron_jobs(migrated).items()} == {
        "pgqr-tick": False, "pgqr-alerts": False, "pgqr-housekeeping": False, "pgqr-cron-history": False}
    assert migrated.value("SELECT bool_or(active) FROM pgqr.jobs") is False
    resumed = pgqr(migrated, "resume")
    assert resumed.returncode == 0, resumed.stderr
    assert all(active for _, active, _ in cron_jobs(migrated).values())
    assert cron_jobs(migrated)["pgqr-cron-history"][2] == "postgres"  # still runs in pg_cron's database


# --------------------------------------------------------------------------------------------- uninstall


def test_uninstall_unschedules_but_keeps_everything_working(migrated: Database) -> None:
    add(migrated, "alpha")
    result = pgqr(migrated, "uninstall")
    assert result.returncode == 0, result.stderr
    assert cron_jobs(migrated) == {}
    assert migrated.value("SELECT to_regclass('pgqr.jobs') IS NOT NULL") is True
    add(migrated, "beta")  # the app's writes behave as before install: no trigger, no state row
    assert migrated.value("SELECT count(*) FROM pgqr.instance_state") == 1
    assert pgqr(migrated, "migrate").returncode == 0  # migrate schedules again and installs the trigger
    assert len(cron_jobs(migrated)) == 4
    migrated.query("SELECT pgqr.tick()")  # the tick's sync picks up what was written meanwhile
    assert migrated.value("SELECT count(*) FROM pgqr.instance_state") == 2


def test_uninstall_drop_data_drops_schema_and_trigger_but_never_instance_rows(migrated: Database) -> None:
    add(migrated, "alpha")
    migrated.query("UPDATE public.evolution_instances SET qr_code = 'data:x', last_qr_update = now()")
    result = pgqr(migrated, "uninstall", "--drop-data")
    assert result.returncode == 0, result.stderr
    assert cron_jobs(migrated) == {}
    assert migrated.value("SELECT to_regnamespace('pgqr') IS NULL") is True
    assert migrated.query("SELECT tgname FROM pg_trigger WHERE tgrelid = 'public.evolution_instances'::regclass "
                          "AND NOT tgisinternal") == []
    rows = migrated.query("SELECT instance_name, instance_token, qr_code FROM public.evolution_instances")
    assert rows == [{"instance_name": "alpha", "instance_token": TOKEN, "qr_code": "data:x"}]
    add(migrated, "beta")  # inserts work without pgqr
    assert migrated.value("SELECT count(*) FROM public.evolution_instances") == 2
    assert migrated.value("SELECT count(*) FROM pg_roles WHERE rolname = 'pgqr_monitor'") == 1
    assert pgqr(migrated, "status").returncode == 2  # not installed
    assert pgqr(migrated, "migrate").returncode == 0  # a clean reinstall
    assert migrated.value("SELECT count(*) FROM pgqr.instance_state") == 2


def test_every_is_an_interval_postgresql_parses(quiet: Database) -> None:
    for every, expression in (("5m", "*/5 * * * *"), (" 2 Hours ", "0 */2 * * *"), ("1 day", "0 0 * * *"),
                              ("1 minute", "* * * * *")):
        result = pgqr(quiet, "schedule", "--every", every)
        assert (result.returncode, result.stdout.strip()) == (0, f"pgqr-tick now runs on schedule '{expression}'")
    for bad in ("0s", "fortnight", "1.5 minutes", "-1m", "7 fortnights", "30s"):
        result = pgqr(quiet, "schedule", f"--every={bad}")
        assert result.returncode == 2 and result.stdout == "", (bad, result.stdout)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
