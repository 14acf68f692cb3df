"""pgqr where the apps' databases are: behind Debian's real PgBouncer (1.18), in session and transaction mode.

Each pooler is a real `pgbouncer` process (installed by `make system`, never at test time) started from a small
ini file in a temporary directory, as the unprivileged `postgres` account when we are root, on a free loopback
port, in front of the session's test server. Its pools are small, so clients share server connections.
`pgqr run` is a real child process wherever its log matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from conftest import Database, command_env, end_process, run_pgqr
from psycopg.conninfo import make_conninfo
from service_fixtures import Env, log_records, running_service, start_pgqr, wait_until

from pgqr import devdb, migrations
from pgqr.settings import Secret
from pgqr.simulator import Simulator

PGBOUNCER = Path(os.environ.get("PGQR_PGBOUNCER", "/usr/sbin/pgbouncer"))
SESSION_POOL_SIZE = 12  # session mode pins a server per client: `pgqr run` holds up to 9 (8 work + 1 listen)
TRANSACTION_POOL_SIZE = 2  # transaction mode: every client of a database shares these two server connections


@dataclass
class Pooler:
    """A running pgbouncer in front of the test server; `dsn(db)` reaches any of its databases through it."""

    mode: str
    port: int
    base: Path
    process: subprocess.Popen[bytes]

    def dsn(self, dbname: str) -> str:
        return make_conninfo(host="127.0.0.1", port=self.port, user=devdb.SUPERUSER, dbname=dbname)

    def log(self) -> str:
        path = self.base / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


@contextlib.contextmanager
def running_pgbouncer(server: devdb.DevServer, mode: str, pool_size: int) -> Iterator[Pooler]:
    if not os.access(PGBOUNCER, os.X_OK):
        pytest.fail(f"{PGBOUNCER} is missing: run `make system` (it installs Debian's pgbouncer)")
    run_as = devdb.SERVICE_ACCOUNT if os.geteuid() == 0 else None  # pgbouncer, like PostgreSQL, refuses root
    base = Path(tempfile.mkdtemp(prefix=f"pgqr-pgbouncer-{mode}-"))
    port = devdb.free_port()
    (base / "users.txt").write_text(f'"{devdb.SUPERUSER}" ""\n')  # trust still wants the user to be listed
    (base / "pgbouncer.ini").write_text(f"""\
[databases]
* = host={server.host} port={server.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {base}/users.txt
pool_mode = {mode}
max_client_conn = 60
default_pool_size = {pool_size}
ignore_startup_parameters = extra_float_digits,options
logfile = {base}/pgbouncer.log
""")
    if run_as:
        account = pwd.getpwnam(run_as)
        for path in (base, base / "users.txt", base / "pgbouncer.ini"):
            os.chown(path, account.pw_uid, account.pw_gid)
    process = subprocess.Popen([str(PGBOUNCER), str(base / "pgbouncer.ini")], user=run_as,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    pooler = Pooler(mode, port, base, process)
    try:
        deadline = time.monotonic() + 15
        while not _accepts(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not start: {pooler.log()[-1000:]}")
            time.sleep(0.05)
        yield pooler
    finally:
        end_process(process)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def session_pooler(pg_server: devdb.DevServer) -> Iterator[Pooler]:
    with running_pgbouncer(pg_server, "session", SESSION_POOL_SIZE) as pooler:
        yield pooler


@pytest.fixture(scope="module")
def transaction_pooler(pg_server: devdb.DevServer) -> Iterator[Pooler]:
    with running_pgbouncer(pg_server, "transaction", TRANSACTION_POOL_SIZE) as pooler:
        yield pooler


# -- helpers ----------------------------------------------------------------------------------------


def has_qr(env: Env, name: str) -> bool:
    return env.db.value("SELECT qr_code IS NOT NULL FROM public.evolution_instances WHERE instance_name = %s",
                        (name,)) is True


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status, await resp.text()


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def wait_for_metric(port: int, name: str, value: float, timeout: float = 30) -> str:
    """/metrics once `name` reads `value` (gauges are refreshed every few seconds)."""
    body = ""

    async def check() -> bool:
        nonlocal body
        _, body = await get(port, "/metrics")
        return metric(body, name) == value

    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{name} never read {value}:\n{body}")
        await asyncio.sleep(0.2)
    return body


@dataclass
class Run:
    """`pgqr run` as a child process, with its HTTP port and its log file."""

    proc: asyncio.subprocess.Process
    port: int
    output: Path

    async def get(self, path: str) -> tuple[int, str]:
        return await get(self.port, path)

    def degraded_lines(self) -> list[dict[str, Any]]:
        return [r for r in log_records(self.output) if r.get("action") == "listen_degraded"]

    async def stop(self) -> None:
        self.proc.terminate()
        status = await asyncio.wait_for(self.proc.wait(), 20)
        assert status == 0, self.output.read_text()


async def start_run(children: list[asyncio.subprocess.Process], output: Path, env: Env, database_url: str,
                    listen_url: str | None = None) -> Run:
    """`pgqr run` as a child; returns once /readyz answers 200 (listening, or degraded and polling)."""
    port = devdb.free_port()
    values = {"DATABASE_URL": database_url, "EVOLUTION_API_URL": env.sim.base_url, "PGQR_HTTP_PORT": str(port),
              "PGQR_HEARTBEAT_SECONDS": "1", "PGQR_FALLBACK_SECONDS": "3600", "PGQR_GRACE_SECONDS": "2"}
    if listen_url is not None:
        values["PGQR_LISTEN_DATABASE_URL"] = listen_url
    run = Run(await start_pgqr(command_env(**values), output, "run"), port, output)
    children.append(run.proc)

    async def ready() -> bool:
        if run.proc.returncode is not None:
            raise AssertionError(f"pgqr run exited {run.proc.returncode}:\n{output.read_text()}")
        with contextlib.suppress(aiohttp.ClientError):
            status, _ = await run.get("/readyz")
            return status == 200
        return False

    started = time.monotonic()
    while not await ready():
        if time.monotonic() - started > 30:
            raise AssertionError(f"pgqr run never got ready:\n{output.read_text()}")
        await asyncio.sleep(0.1)
    return run


async def assert_listening_and_not_degraded(run: Run) -> None:
    """Ready without a degraded note, LISTEN delivering, woken by NOTIFY and never by degraded polling."""
    status, body = await run.get("/readyz")
    assert status == 200 and json.loads(body)["degraded"] == [], body
    metrics = await wait_for_metric(run.port, "pgqr_listening", 1.0)
    assert metric(metrics, "pgqr_listen_degraded") == 0.0
    assert (metric(metrics, 'pgqr_wakeups_total{source="notify"}') or 0) >= 1, metrics  # the trigger's NOTIFY
    assert (metric(metrics, 'pgqr_wakeups_total{source="degraded_poll"}') or 0) == 0, metrics


def doctor_lines(database_url: str, env: Env, listen_url: str | None = None) -> tuple[int, list[str]]:
    """`pgqr doctor`, run while this test blocks: the simulator serves from this very event loop and could not
    answer, so Evolution is a closed port (refused at once; these tests read the database checks only)."""
    values = {"DATABASE_URL": database_url, "EVOLUTION_API_URL": "http://127.0.0.1:9"}
    if listen_url is not None:
        values["PGQR_LISTEN_DATABASE_URL"] = listen_url
    result = run_pgqr("doctor", env=values)
    return result.returncode, result.stdout.splitlines() + result.stderr.splitlines()


def listen_check(lines: list[str]) -> str:
    """doctor's one `listen` line."""
    found = [line for line in lines if line.split(":", 1)[0].split() in (["PASS", "listen"], ["FAIL", "listen"])]
    assert len(found) == 1, lines
    return found[0]


@contextlib.asynccontextmanager
async def self_tests(db: Database) -> AsyncIterator[list[str]]:
    """Every NOTIFY on the listener's probe channel in this database, as they come (one per self-test or probe),
    seen by a direct LISTEN of our own."""
    seen: list[str] = []
    conn = await psycopg.AsyncConnection.connect(db.dsn, autocommit=True)
    await conn.execute("LISTEN pgqr_probe")

    async def pump() -> None:
        async for notify in conn.notifies():
            seen.append(notify.payload)

    task = asyncio.create_task(pump())
    try:
        yield seen
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await conn.close()


def new_env(db: Database, simulator: Simulator) -> Env:
    env = Env(db, simulator)
    env.set("slow_connect_ms", "40")  # as the env fixture does: the simulator's close branch is fast
    db.pause_cron()  # no real tick may explain a refresh: only NOTIFY (or polling, when degraded) does
    return env


@pytest.fixture
def quiet_env(migrated: Database, simulator: Simulator) -> Env:
    return new_env(migrated, simulator)


# -- the controls: what the poolers really do ---------------------------------------------------------


def test_the_transaction_pooler_drops_a_notify_sent_from_another_connection(
        transaction_pooler: Pooler, session_pooler: Pooler, pg_server: devdb.DevServer) -> None:
    """Why the listener's self-test NOTIFYs from another connection: through the transaction pooler a LISTEN
    hears its own connection's NOTIFY (so a self-NOTIFY would pass) but not anyone else's; through the session
    pooler and directly it hears both."""

    def heard(listen_dsn: str, sender: str) -> list[str]:
        with psycopg.connect(listen_dsn, autocommit=True) as conn:
            conn.execute("LISTEN pooler_check")
            conn.execute("NOTIFY pooler_check, 'own'")
            if sender == "other":
                with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as other:
                    other.execute("NOTIFY pooler_check, 'other'")
            return sorted(n.payload for n in conn.notifies(timeout=1.5))

    assert heard(transaction_pooler.dsn("postgres"), "other") == ["own"]
    assert heard(session_pooler.dsn("postgres"), "other") == ["other", "own"]
    assert heard(pg_server.dsn("postgres"), "other") == ["other", "own"]
    assert "got packet 'A' from server when not linked" in transaction_pooler.log()


def test_the_transaction_pooler_leaks_prepared_statements_to_the_next_client(transaction_pooler: Pooler) -> None:
    """Why every connection pgqr makes has prepare_threshold=None: psycopg prepares a query it ran five times,
    and through the transaction pooler the next client that gets that server connection collides with it."""
    dsn = transaction_pooler.dsn("postgres")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(6):
            conn.execute("SELECT %s::int + 1", (i,))
    with pytest.raises(psycopg.errors.DuplicatePreparedStatement), psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(6):
            conn.execute("SELECT %s::int + 1", (i,))
    # the same queries, never prepared, work any number of times
    for _ in range(2):
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
            for i in range(6):
                conn.execute("SELECT %s::int + 1", (i,))


# -- (a) session mode carries everything ---------------------------------------------------------------


async def test_through_a_session_pooler_migrate_and_run_work_and_a_new_instance_gets_its_qr_promptly(
        db: Database, simulator: Simulator, session_pooler: Pooler, tmp_path: Path,
        children: list[asyncio.subprocess.Process]) -> None:
    url = session_pooler.dsn(db.name)
    migrated = run_pgqr("migrate", env={"DATABASE_URL": url})
    assert migrated.returncode == 0, migrated.stderr
    verified = run_pgqr("migrate", "--verify", env={"DATABASE_URL": url})
    assert (verified.returncode, verified.stdout.strip()) == (0, "pgqr schema is up to date"), verified.stderr
    env = new_env(db, simulator)
    run = await start_run(children, tmp_path / "run.log", env, url)
    env.add("through-session")
    await wait_until(lambda: has_qr(env, "through-session"), 20, "the QR through the session pooler")
    await assert_listening_and_not_degraded(run)
    await run.stop()
    assert run.degraded_lines() == [], run.output.read_text()


# -- (b) transaction mode for work, a direct URL for LISTEN ---------------------------------------------


async def test_work_through_a_transaction_pooler_with_a_direct_listen_url_is_not_degraded(
        quiet_env: Env, transaction_pooler: Pooler, tmp_path: Path,
        children: list[asyncio.subprocess.Process]) -> None:
    env, url = quiet_env, transaction_pooler.dsn(quiet_env.db.name)
    run = await start_run(children, tmp_path / "run.log", env, url, listen_url=env.db.dsn)
    for name in ("tx-1", "tx-2", "tx-3"):
        env.add(name)
        await wait_until(lambda name=name: has_qr(env, name), 20, f"the QR of {name}")  # type: ignore[misc]
    await assert_listening_and_not_degraded(run)
    await wait_until(lambda: env.db.value("SELECT bool_and(listen_ok) FROM pgqr.listeners WHERE live"), 10,
                     "a heartbeat with listen_ok")
    _, lines = doctor_lines(url, env, listen_url=env.db.dsn)  # the doctor through the transaction pooler, too
    line = listen_check(lines)
    assert line.startswith("PASS  listen: a NOTIFY from another connection reached a LISTEN on "
                           "PGQR_LISTEN_DATABASE_URL"), lines
    assert line.endswith("; notifications reach all 1 live listener(s)"), line
    await run.stop()
    assert run.degraded_lines() == [], run.output.read_text()
    assert "PGQR_LISTEN_DATABASE_URL" not in run.output.read_text()


async def test_idle_probes_sent_through_the_transaction_pooler_keep_proving_a_direct_listen(
        quiet_env: Env, transaction_pooler: Pooler) -> None:
    """The idle probe NOTIFYs from a work connection (through the pooler), the way a trigger's NOTIFY comes."""
    env = quiet_env
    settings = env.settings(database_url=Secret(transaction_pooler.dsn(env.db.name)),
                            listen_database_url=Secret(env.db.dsn), probe_seconds=1.0, fallback_seconds=3600.0)
    async with self_tests(env.db) as probes, running_service(settings) as service:
        await wait_until(lambda: len(probes) >= 3, 30, "a few idle probes")
        assert service.listener.listening.is_set() and not service.listener.degraded
        assert service.metrics.registry.get_sample_value("pgqr_listener_reconnects_total") == 0
        env.add("after-probes")
        await wait_until(lambda: has_qr(env, "after-probes"), 20, "the QR after the probes")


# -- (c) everything through transaction mode: degraded, said once, still serving -------------------------


async def test_everything_through_a_transaction_pooler_degrades_once_loudly_and_polling_serves_every_instance(
        quiet_env: Env, transaction_pooler: Pooler, tmp_path: Path,
        children: list[asyncio.subprocess.Process]) -> None:
    env, url = quiet_env, transaction_pooler.dsn(quiet_env.db.name)
    async with self_tests(env.db) as probes:
        run = await start_run(children, tmp_path / "run.log", env, url)
        await wait_until(run.degraded_lines, 20, "the degraded line")
        status, body = await run.get("/readyz")
        assert status == 200, body
        notes = json.loads(body)["degraded"]
        assert len(notes) == 1 and "PGQR_LISTEN_DATABASE_URL" in notes[0], body
        metrics = await wait_for_metric(run.port, "pgqr_listen_degraded", 1.0)
        assert metric(metrics, "pgqr_listening") == 0.0

        # polling serves every instance, one after another and several at once
        for name in ("poll-1", "poll-2"):
            env.add(name)
            await wait_until(lambda name=name: has_qr(env, name), 10, f"the polled QR of {name}")  # type: ignore[misc]
        for name in ("poll-3", "poll-4", "poll-5"):
            env.add(name)
        await wait_until(lambda: all(has_qr(env, n) for n in ("poll-3", "poll-4", "poll-5")), 10, "the polled QRs")
        _, metrics = await run.get("/metrics")
        assert (metric(metrics, 'pgqr_wakeups_total{source="degraded_poll"}') or 0) >= 1, metrics

        await wait_until(lambda: env.db.value("SELECT bool_or(NOT listen_ok) FROM pgqr.listeners WHERE live"), 10,
                         "a heartbeat with listen_ok = false")
        code, lines = doctor_lines(url, env)
        line = listen_check(lines)
        assert code == 1 and line.startswith("FAIL  listen: a NOTIFY sent from another connection never reached"), lines
        assert "; 1 of 1 live listener(s) get no notifications either" in line, line
        assert "-> fix: set PGQR_LISTEN_DATABASE_URL to a direct or session-mode URL" in line, line

        # the listener tests again every minute; the line is not repeated while the degradation lasts
        await wait_until(lambda: len(probes) >= 2, 90, "the second self-test")
        await asyncio.sleep(3)  # the second self-test's 2 s answer window
        env.add("poll-6")
        await wait_until(lambda: has_qr(env, "poll-6"), 10, "the polled QR after the retry")
    status, body = await run.get("/readyz")
    assert status == 200 and json.loads(body)["degraded"], body
    await run.stop()
    lines = run.degraded_lines()
    assert len(lines) == 1, run.output.read_text()
    assert lines[0]["level"] == "error" and "PGQR_LISTEN_DATABASE_URL" in lines[0]["message"], lines
    assert sum("PGQR_LISTEN_DATABASE_URL" in str(r.get("message")) for r in log_records(run.output)) == 1


# -- doctor tests the listen URL itself, before any `pgqr run` ------------------------------------------


def test_doctor_through_a_transaction_pooler_with_no_listener_fails_listen_and_names_the_listen_url(
        quiet_env: Env, transaction_pooler: Pooler, session_pooler: Pooler) -> None:
    env, url = quiet_env, transaction_pooler.dsn(quiet_env.db.name)
    code, lines = doctor_lines(url, env)
    line = listen_check(lines)
    assert code == 1, lines
    assert line.startswith("FAIL  listen: a NOTIFY sent from another connection never reached a LISTEN on "
                           f"DATABASE_URL (host 127.0.0.1 port {transaction_pooler.port}, database {env.db.name}, "
                           "user "), line
    assert "a transaction-mode pooler and PGQR_LISTEN_DATABASE_URL is not set" in line, line
    assert "-> fix: set PGQR_LISTEN_DATABASE_URL to a direct or session-mode URL" in line, line
    assert "FAIL  listener: no listener is running -> fix: start `pgqr run`" in lines, lines
    # the controls: a direct listen URL, a direct DATABASE_URL and the session pooler all carry the round trip
    for database_url, listen_url, named in ((url, env.db.dsn, "PGQR_LISTEN_DATABASE_URL"),
                                            (env.db.dsn, None, "DATABASE_URL"),
                                            (session_pooler.dsn(env.db.name), None, "DATABASE_URL")):
        _, lines = doctor_lines(database_url, env, listen_url=listen_url)
        line = listen_check(lines)
        assert line.startswith(f"PASS  listen: a NOTIFY from another connection reached a LISTEN on {named}"), line
        assert line.endswith(" ms"), line  # no listener runs: nothing said of listeners


# -- (d) migrate through the transaction pooler ------------------------------------------------------


def test_migrate_and_verify_work_through_a_transaction_pooler_concurrently_and_again(
        db: Database, transaction_pooler: Pooler) -> None:
    url = transaction_pooler.dsn(db.name)
    env = command_env(DATABASE_URL=url)

    runs = [subprocess.Popen([sys.executable, "-m", "pgqr", "migrate"], env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=120) for proc in runs]
    assert [proc.returncode for proc in runs] == [0, 0], outputs
    files = [m.name for m in migrations.load()]
    applied = [line for out, _ in outputs for line in out.splitlines() if line.startswith("applied ")]
    assert sorted(applied) == sorted(f"applied {name}" for name in files), outputs  # each file once, by one of them
    for _ in range(2):  # again: a second client gets the server connections the first one used
        again = run_pgqr("migrate", env={"DATABASE_URL": url})
        assert again.returncode == 0 and "applied" not in again.stdout, again.stdout + again.stderr
        verified = run_pgqr("migrate", "--verify", env={"DATABASE_URL": url})
        assert (verified.returncode, verified.stdout.strip()) == (0, "pgqr schema is up to date"), verified.stderr
    assert db.value("SELECT count(*) FROM pgqr.migrations") == len(files)
    with psycopg.connect(db.server.dsn("postgres"), autocommit=True) as conn:
        jobs = conn.execute("SELECT jobname FROM cron.job WHERE database = %s ORDER BY jobname", (db.name,)).fetchall()
    assert ("pgqr-tick@" + db.name,) in jobs, jobs
    # the pooler's server connections carry nothing of pgqr's: no prepared statement, no setting
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        for _ in range(TRANSACTION_POOL_SIZE * 2):
            assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
