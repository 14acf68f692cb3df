"""Fault injection with real processes: a replica killed mid-reconcile, PostgreSQL away for 20 s, Evolution
misbehaving in every way the simulator knows, hostile names and webhook bodies, bad configuration, a complete
uninstall, and never a secret in anything these tests made pgqr print.

Every output the children write is kept in OUTPUTS with the secrets they were given; the last test searches
it all (run the file whole for that one to mean something)."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from aiohttp import web
from conftest import Database, command_env, run_pgqr
from service_fixtures import Env, log_records, start_pgqr, wait_until
from sim_fixtures import fast_sim_config

from pgqr import devdb, migrations
from pgqr.simulator import Simulator

OUTPUTS: list[tuple[str, Path | str]] = []   # (which test, a log file or a captured output)
SECRETS: set[str] = set()                    # every token, key, webhook secret and password handed out


def secret(prefix: str) -> str:
    value = f"{prefix}-{secrets.token_hex(10)}"
    SECRETS.add(value)
    return value


def keep(what: str, output: Path | str) -> None:
    OUTPUTS.append((what, output))


def text_of(output: Path | str) -> str:
    return output.read_text(errors="replace") if isinstance(output, Path) else output


def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def http_status(url: str) -> int | None:
    try:
        async with aiohttp.ClientSession() as http, http.get(url, timeout=aiohttp.ClientTimeout(total=3)) as resp:
            return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def wait_status(url: str, status: int, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while await http_status(url) != status:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.2)


def run_env(env: Env, **extra: str) -> dict[str, str]:
    return command_env(DATABASE_URL=env.db.dsn, EVOLUTION_API_URL=env.sim.base_url,
                       EVOLUTION_API_KEY=secret("key"), **extra)


@pytest.fixture(autouse=True)
def no_cron_ticks(request: pytest.FixtureRequest) -> None:
    """A real pg_cron minute must not explain a refresh."""
    if "env" in request.fixturenames:
        env: Env = request.getfixturevalue("env")
        env.db.pause_cron()


# -- replicas -------------------------------------------------------------------------------------------


async def test_a_replica_killed_mid_reconcile_leaves_no_instance_behind_and_none_called_twice_at_once(
        env: Env, tmp_path: Path, children: list[asyncio.subprocess.Process]) -> None:
    env.set("lease_seconds", "5")  # the lease is then max(5, 2 x http timeout + 5) = 9 s
    env.sim.config.latency = 0.3
    names = [f"replica-{i:02d}" for i in range(48)]
    for name in names:
        env.add(name, sim_state="connecting", token=secret("tok"), triggers=False)
    logs = [tmp_path / f"replica-{i}.log" for i in range(3)]
    for log in logs:
        keep("replicas", log)
        children.append(await start_pgqr(run_env(env, PGQR_CONCURRENCY="4", PGQR_HTTP_TIMEOUT="2",
                                                 PGQR_FALLBACK_SECONDS="3"), log, "run"))
    victim = children[0]

    def victim_leases() -> list[str]:
        rows = env.db.query("SELECT key FROM pgqr.schedule WHERE lease_owner LIKE %s",
                            (f"%:{victim.pid}:%",))
        return [str(r["key"]) for r in rows]

    await wait_until(lambda: victim_leases() or victim.returncode is not None, 30, "the victim's first claims")
    victim.send_signal(signal.SIGKILL)
    assert await asyncio.wait_for(victim.wait(), 5) == -signal.SIGKILL
    held = victim_leases()
    assert held, logs[0].read_text()

    def everyone_refreshed() -> bool:
        return env.db.value(
            "SELECT count(*) FROM pgqr.instance_state s WHERE EXISTS (SELECT 1 FROM pgqr.refresh_log l WHERE "
            "l.instance_key = s.key AND l.written AND l.qr_updated AND l.owner NOT LIKE %s)",
            (f"%:{victim.pid}:%",)) == len(names)

    # the lease (9 s) plus one fallback period (3 s), with a generous margin for a busy machine
    await wait_until(everyone_refreshed, 9 + 3 + 45, "every instance refreshed by a surviving replica")
    assert all(p.returncode is None for p in children[1:]), [log.read_text()[-2000:] for log in logs[1:]]
    assert not victim_leases()
    assert {n: env.sim.stats(n).max_concurrent_connects for n in names} == dict.fromkeys(names, 1)


# -- PostgreSQL away -----------------------------------------------------------------------------------


async def test_postgresql_away_for_20_seconds_is_waited_out_with_capped_reconnects(
        simulator: Simulator, tmp_path: Path, children: list[asyncio.subprocess.Process]) -> None:
    with devdb.running(cron_database="postgres") as server:
        dsn = server.dsn("postgres")
        migrations.migrate(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE cron.job SET active = false")  # no real tick may explain a refresh

        def add(name: str) -> None:
            token = simulator.add_instance(name, secret("tok"), state="connecting")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO public.evolution_instances (instance_name, instance_token) "
                             "VALUES (%s, %s)", (name, token))

        def has_qr(name: str) -> bool:
            with psycopg.connect(dsn, autocommit=True) as conn:
                row = conn.execute("SELECT qr_code IS NOT NULL FROM public.evolution_instances "
                                   "WHERE instance_name = %s", (name,)).fetchone()
            return row == (True,)

        port = devdb.free_port()
        ready = f"http://127.0.0.1:{port}/readyz"
        log = tmp_path / "run.log"
        keep("outage", log)
        proc = await start_pgqr(command_env(DATABASE_URL=dsn, EVOLUTION_API_URL=simulator.base_url,
                                            PGQR_HTTP_PORT=str(port), PGQR_HTTP_TIMEOUT="2"),
                                log, "run", "--log-format", "json")
        children.append(proc)
        await wait_status(ready, 200, 30, "/readyz 200 before the outage")
        add("before")
        await wait_until(lambda: has_qr("before"), 15, "the first QR")
        # falls due while the server is away: caught up after it comes back
        add("during")
        await wait_until(lambda: has_qr("during"), 15, "the second QR")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE pgqr.schedule SET due_at = now() + interval '5 seconds', recent_polls = '{}' "
                         "WHERE key IN (SELECT key FROM pgqr.instance_state WHERE name = 'during')")
            calls_before = simulator.stats("during").connect_calls

        stopped_at = asyncio.get_running_loop().time()
        lines_before = len(log_records(log))
        await asyncio.to_thread(server.stop, "fast")
        await wait_status(ready, 503, 30, "/readyz 503 while PostgreSQL is away")
        await asyncio.sleep(max(0.0, 20 - (asyncio.get_running_loop().time() - stopped_at)))
        assert await http_status(ready) == 503
        outage = log_records(log)[lines_before:]
        await asyncio.to_thread(server.start)

        await wait_status(ready, 200, 60, "/readyz 200 after PostgreSQL is back")
        await wait_until(lambda: simulator.stats("during").connect_calls > calls_before, 30,
                         "the instance that fell due during the outage to be polled")
        add("after")
        await wait_until(lambda: has_qr("after"), 30, "a QR for an instance inserted after the outage")
        assert proc.returncode is None

        reconnects = [r for r in log_records(log) if r.get("action") == "reconnect"]
        assert reconnects and all(r["delay_s"] <= 10 for r in reconnects)
        # capped exponential backoff: a handful of attempts in 20 s, not a hot loop
        assert len([r for r in outage if r.get("action") == "reconnect"]) <= 12, reconnects
        assert len(outage) <= 60, [r.get("message", r.get("raw")) for r in outage]
        assert not any("raw" in r and "Traceback" in r["raw"] for r in log_records(log))


# -- Evolution misbehaving -------------------------------------------------------------------------------


FAULTS = {  # the simulator's fault -> the class pgqr records for it
    "hang": "timeout", "http_500": "server_error", "html_502": "server_error", "garbage_json": "bad_reply",
    "huge_body": "too_large", "slow_drip": "timeout", "reset": "network",
}


async def test_each_evolution_fault_gets_its_class_and_backoff_and_costs_nobody_else(
        env: Env, tmp_path: Path, children: list[asyncio.subprocess.Process]) -> None:
    env.sim.config.hang_seconds = 10
    env.add("healthy", token=secret("tok"), sim_state="connecting", triggers=False)
    for mode in FAULTS:
        env.add(f"fault-{mode}", token=secret("tok"), sim_state="connecting", mode=mode, triggers=False)  # type: ignore[arg-type]
    log = tmp_path / "run.log"
    keep("faults", log)
    proc = await start_pgqr(run_env(env, PGQR_HTTP_TIMEOUT="3"), log, "run", "--log-format", "json")
    children.append(proc)
    await wait_until(lambda: env.db.value("SELECT count(*) FROM pgqr.instance_state WHERE last_outcome IS NULL")
                     == 0 or proc.returncode is not None, 45, "an outcome for every instance")
    assert proc.returncode is None, log.read_text()[-3000:]

    rows = {str(r["name"]): r for r in env.db.query(
        "SELECT s.name, s.last_outcome::text, s.last_error_class, q.due_at > now() AS later, "
        "       q.due_at >= q.last_attempt_at + c.backoff_base * 0.5 AS backs_off "
        "FROM pgqr.instance_state s JOIN pgqr.schedule q USING (key) "
        "LEFT JOIN pgqr.error_classes c ON c.error_class = s.last_error_class")}
    assert rows.pop("healthy")["last_outcome"] == "qr"
    assert str(env.row("healthy")["qr_code"]).startswith("data:image/png;base64,")
    got = {name.removeprefix("fault-"): (r["last_outcome"], r["last_error_class"], r["later"], r["backs_off"])
           for name, r in rows.items()}
    assert got == {mode: ("failed", cls, True, True) for mode, cls in FAULTS.items()}
    # the 50 MB body was read only up to the reply cap
    assert vm_rss_mb(proc.pid) < 200
    assert not [line for line in log.read_text().splitlines() if "Traceback" in line]


# -- hostile names and bodies ---------------------------------------------------------------------------

SENDABLE = ["../x", "%2F", "a/b", "it's \"quoted\"", "new\nline", "ünïcødé 名前 🙂", "?q=1#f", "n" * 1000]
UNSENDABLE = [".", ".."]


@pytest.fixture
async def recording_sim() -> AsyncIterator[tuple[Simulator, list[str]]]:
    """A simulator that also records the raw path of every request it receives."""
    seen: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append(request.raw_path)
        response: web.StreamResponse = await handler(request)
        return response

    sim = Simulator(fast_sim_config())
    sim.app.middlewares.insert(0, record)
    await sim.start("127.0.0.1", 0)
    try:
        yield sim, seen
    finally:
        await sim.stop()


async def test_hostile_instance_names_reach_evolution_exactly_and_dots_are_refused_unsent(
        quiet: Database, recording_sim: tuple[Simulator, list[str]], tmp_path: Path) -> None:
    sim, seen = recording_sim
    for name in SENDABLE + UNSENDABLE:
        token = sim.add_instance(name, secret("tok"), state="connecting")
        quiet.query("INSERT INTO public.evolution_instances (instance_name, instance_token) VALUES (%s, %s)",
                    (name, token))
    out = tmp_path / "refresh.json"
    keep("hostile names", out)
    proc = await start_pgqr(command_env(DATABASE_URL=quiet.dsn, EVOLUTION_API_URL=sim.base_url), out,
                            "refresh", "--once", "--json")
    assert await asyncio.wait_for(proc.wait(), 60) == 1  # the two refused names fail the pass
    text = out.read_text()
    assert "Traceback" not in text
    doc = json.loads(text[text.index('{\n  "success"'):])
    outcomes = {r["instance_name"]: (r["outcome"], r["error_class"]) for r in doc["results"]}
    assert outcomes == {**dict.fromkeys(SENDABLE, ("qr_stored", None)),
                        **dict.fromkeys(UNSENDABLE, ("failed", "config"))}
    # each name arrived exactly as it is (the simulator found each instance by it) and once
    assert {n: sim.stats(n).connect_calls for n in SENDABLE + UNSENDABLE} == {
        **dict.fromkeys(SENDABLE, 1), **dict.fromkeys(UNSENDABLE, 0)}
    assert len(seen) == len(SENDABLE)
    # each row holds its own instance's QR, nobody else's
    current = sim.current()
    stored = {str(r["name"]): r["qr_md5"] for r in quiet.query("SELECT name, qr_md5 FROM pgqr.instance_state")}
    assert {n: stored[n] for n in SENDABLE} == {n: current[n]["md5"] for n in SENDABLE}
    assert {n: stored[n] for n in UNSENDABLE} == dict.fromkeys(UNSENDABLE, None)


HOSTILE_BODIES: dict[str, bytes] = {
    "an array": b"[1, 2, 3]",
    "a string": b'"qrcode.updated"',
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "deep nesting in an object": b'{"event": "qrcode.updated", "instance": "x", "data": ' + b"[" * 50_000
                                 + b"]" * 50_000 + b"}",
    "instance of the wrong type": json.dumps({"event": "qrcode.updated", "instance": ["x"]}).encode(),
    "event of the wrong type": json.dumps({"event": 5, "instance": "x"}).encode(),
    "data of the wrong type": json.dumps({"event": "connection.update", "instance": "x", "data": "open"}).encode(),
    "qrcode of the wrong type": json.dumps({"event": "qrcode.updated", "instance": "x",
                                            "data": {"qrcode": {"base64": 5}}}).encode(),
    "a NUL in the name": json.dumps({"event": "connection.update", "instance": "x\u0000",
                                     "data": {"state": "open"}}).encode(),
    "huge": json.dumps({"event": "qrcode.updated", "instance": "x", "pad": "x" * 3_000_000}).encode(),
    "not JSON": b"{nope",
}


async def test_hostile_webhook_bodies_are_refused_with_4xx_and_change_nothing(
        env: Env, tmp_path: Path, children: list[asyncio.subprocess.Process]) -> None:
    env.add("x", token=secret("tok"), sim_state="connecting", triggers=False)
    hook_secret, port = secret("whs"), devdb.free_port()
    log = tmp_path / "run.log"
    keep("hostile bodies", log)
    proc = await start_pgqr(run_env(env, PGQR_HTTP_PORT=str(port), PGQR_WEBHOOK_SECRET=hook_secret), log, "run",
                            "--log-format", "json")
    children.append(proc)
    await wait_status(f"http://127.0.0.1:{port}/readyz", 200, 30, "readiness")
    await wait_until(lambda: env.row("x")["qr_code"] is not None, 15, "the first poll")
    before = env.row("x")
    url = f"http://127.0.0.1:{port}/webhooks/evolution/{hook_secret}"
    statuses = {}
    async with aiohttp.ClientSession() as http:
        for what, body in HOSTILE_BODIES.items():
            async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                statuses[what] = resp.status
        # positive control: a well-formed event the receiver does not use is fine, and one it uses is recorded
        async with http.post(url, json={"event": "messages.upsert", "instance": "x", "data": {}}) as resp:
            ignored = resp.status
        async with http.post(url, json={"event": "connection.update", "instance": "x",
                                        "data": {"state": "close"}}) as resp:
            recorded = (resp.status, await resp.json())
    assert {w: 400 <= s < 500 for w, s in statuses.items()} == dict.fromkeys(HOSTILE_BODIES, True), statuses
    assert statuses["huge"] == 413
    assert ignored == 200 and recorded == (200, {"recorded": True, "qr_updated": False})
    after = env.row("x")
    assert (after["qr_code"], after["instance_status"]) == (before["qr_code"], before["instance_status"])
    assert proc.returncode is None
    assert not [line for line in log.read_text().splitlines() if "Traceback" in line or '"level": "error"' in line]


async def test_an_app_insert_with_an_8000_character_name_never_fails(quiet: Database) -> None:
    long_names = ["n" * 8000, "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8000))]
    with psycopg.connect(quiet.dsn, autocommit=True) as conn:
        # an app table without a unique index on the name (the default table's would refuse such a name itself)
        conn.execute("ALTER TABLE public.evolution_instances DROP CONSTRAINT evolution_instances_instance_name_key")
        for name in long_names:
            conn.execute("INSERT INTO public.evolution_instances (instance_name, instance_token) VALUES (%s, 't')",
                         (name,))
    assert quiet.value("SELECT count(*) FROM public.evolution_instances") == 2
    assert quiet.value("SELECT count(*) FROM pgqr.instance_state WHERE length(name) = 8000 AND waiting") == 2
    assert quiet.value("SELECT count(*) FROM pgqr.trigger_errors") == 0


# -- bad configuration -----------------------------------------------------------------------------------


def said_while_waiting(line: str) -> bool:
    """`pgqr run`'s log lines while it connects to the database (where, then every 10 s what it waits for)."""
    try:
        return bool(json.loads(line).get("action") == "database_wait")
    except ValueError:
        return False


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not said_while_waiting(line)]
    assert len(lines) == 1, stderr
    keep("configuration", stderr)
    return lines[0]


@pytest.mark.parametrize("bad", ["not a url", "ftp://evolution.example:21/"])
def test_a_bad_evolution_url_stops_run_at_start_with_exit_2(quiet: Database, bad: str) -> None:
    result = run_pgqr("run", env={"DATABASE_URL": quiet.dsn, "EVOLUTION_API_URL": bad}, timeout=30)
    assert result.returncode == 2
    assert one_line(result.stderr) == "pgqr: EVOLUTION_API_URL must be an http(s) URL, like http://localhost:8080"


async def test_a_bad_url_on_one_row_is_that_instances_config_outcome(env: Env) -> None:
    env.add("good", token=secret("tok"), triggers=False)
    for name, url in (("no-url", "not a url"), ("ftp", "ftp://evolution.example:21"), ("no-host", "http://")):
        env.add(name, sim_state=None, token=secret("tok"), triggers=False)
        env.db.query("UPDATE public.evolution_instances SET evolution_url = %s WHERE instance_name = %s",
                     (url, name))
    summary = await env.reconcile()
    got = {r.instance_name: (r.outcome, r.error_class) for r in summary.results}
    assert got == {"good": ("qr_stored", None), "no-url": ("failed", "config"), "ftp": ("failed", "config"),
                   "no-host": ("failed", "config")}


def test_an_unresolvable_http_host_is_named(quiet: Database) -> None:
    result = run_pgqr("run", env={"DATABASE_URL": quiet.dsn, "EVOLUTION_API_URL": "http://127.0.0.1:9",
                                  "PGQR_HTTP_HOST": "bogus.invalid", "PGQR_HTTP_PORT": "0"}, timeout=30)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "bogus.invalid" in line and "does not resolve" in line and "Unknown error" not in line, line


@pytest.mark.parametrize("what", ["role", "database"])
@pytest.mark.parametrize("command", [("run",), ("migrate",), ("status",), ("refresh", "--once")])
def test_a_database_that_refuses_the_role_or_does_not_exist_exits_2_naming_it(
        pg_server: devdb.DevServer, what: str, command: tuple[str, ...]) -> None:
    password = secret("pw")
    user, database = ("nobody_here", "postgres") if what == "role" else ("postgres", "no_such_db")
    dsn = f"postgresql://{user}:{password}@127.0.0.1:{pg_server.port}/{database}"
    result = run_pgqr(*command, env={"DATABASE_URL": dsn, "EVOLUTION_API_URL": "http://127.0.0.1:9",
                                     "PGQR_DATABASE_WAIT_SECONDS": "2"}, timeout=60)
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert f'{what} "{user if what == "role" else database}" does not exist' in line, line
    assert f"host 127.0.0.1 port {pg_server.port}, database {database}, user {user}" in line, line
    assert password not in line


def test_run_waits_for_a_database_that_is_down_then_gives_up_naming_it(pg_server: devdb.DevServer) -> None:
    closed = devdb.free_port()
    result = run_pgqr("run", env={"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{closed}/app",
                                  "EVOLUTION_API_URL": "http://127.0.0.1:9", "PGQR_DATABASE_WAIT_SECONDS": "3"},
                      timeout=60)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "cannot reach the database" in line and "127.0.0.1" in line and "waited 3 s" in line, line


def test_a_database_wait_that_is_not_a_number_is_a_usage_error(quiet: Database) -> None:
    result = run_pgqr("run", env={"DATABASE_URL": quiet.dsn, "PGQR_DATABASE_WAIT_SECONDS": "soon"})
    assert result.returncode == 2
    assert one_line(result.stderr) == "pgqr: PGQR_DATABASE_WAIT_SECONDS must be a number, got 'soon'"


# -- uninstall --------------------------------------------------------------------------------------------


def test_uninstall_drop_data_leaves_nothing_of_pgqr_but_keeps_the_apps_rows(migrated: Database) -> None:
    migrated.query("INSERT INTO public.evolution_instances (instance_name, instance_token) VALUES ('kept', 't')")
    migrated.query("SELECT pgqr.tick()")
    cron_dsn = migrated.server.dsn("postgres")

    def leftovers() -> dict[str, object]:
        with psycopg.connect(cron_dsn, autocommit=True) as cron:
            jobs = cron.execute("SELECT count(*) FROM cron.job WHERE database = %s OR jobname LIKE %s",
                                (migrated.name, f"%@{migrated.name}")).fetchone()
        return {
            "schema": migrated.value("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'pgqr%%'"),
            "functions": migrated.value("SELECT count(*) FROM pg_proc WHERE proname LIKE 'pgqr%%' OR "
                                        "pronamespace::regnamespace::text LIKE 'pgqr%%'"),
            "triggers": migrated.value("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgqr%%'"),
            "types": migrated.value("SELECT count(*) FROM pg_type WHERE typnamespace::regnamespace::text "
                                    "LIKE 'pgqr%%'"),
            "jobs": jobs[0] if jobs else None,
        }

    assert all(v for v in leftovers().values())  # positive control: installed, everything is there
    result = run_pgqr("uninstall", "--drop-data", env={"DATABASE_URL": migrated.dsn})
    keep("uninstall", result.stdout + result.stderr)
    assert result.returncode == 0, result.stderr
    assert leftovers() == dict.fromkeys(["schema", "functions", "triggers", "types", "jobs"], 0)
    assert [r["instance_name"] for r in migrated.query("SELECT instance_name FROM public.evolution_instances")] \
        == ["kept"]


# -- secrets ------------------------------------------------------------------------------------------------


def test_no_output_of_these_tests_holds_a_token_key_or_secret() -> None:
    if not OUTPUTS:
        pytest.skip("run the whole file: this searches what the other tests made pgqr print")
    texts = {f"{what} ({out})": text_of(out) for what, out in OUTPUTS}
    assert sum(len(t) for t in texts.values()) > 10_000  # positive control: there is something to search
    leaks = {name: sorted(s for s in SECRETS if s in text) for name, text in texts.items()}
    assert {name: found for name, found in leaks.items() if found} == {}
