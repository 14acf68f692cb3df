"""The first hour with pgqr (issue 20): refusals change nothing, `pgqr run` answers at once while it waits for
the database, one table of exit statuses for every command, and a complete command line."""

from __future__ import annotations

import asyncio
import contextlib
import io
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psycopg
import pytest
from conftest import Database, command_env, run_pgqr
from service_fixtures import log_records, start_pgqr, wait_until

from pgqr import __version__, cli, devdb
from pgqr.simulator import cli as sim_cli

PASSWORD_ROLE = "pgqr_first_hour"
PASSWORD = "right-" + "p" * 12
WRONG = "wrong-" + "w" * 12


def dump(db: Database) -> str:
    """pg_dump of the whole database: schema and rows."""
    # a fixed \restrict key (pg_dump 15.14+ draws one per run otherwise)
    result = subprocess.run([str(db.server.bindir / "pg_dump"), "--no-owner", "--restrict-key=pgqrtest", db.dsn],
                            capture_output=True, text=True, check=True, timeout=120)
    return result.stdout


def not_installed(db: Database | str) -> str:
    name = db if isinstance(db, str) else db.name
    return f"pgqr: pgqr is not installed in database {name}: run `pgqr migrate` first"


@pytest.fixture(scope="module")
def password_role(pg_server: devdb.DevServer) -> Iterator[str]:
    """A superuser role the server authenticates by password (every other role stays on trust); yields a
    URL template: format it with the password and the database."""
    hba = pg_server.datadir / "pg_hba.conf"
    original = hba.read_text()
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {PASSWORD_ROLE}")
        conn.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
        hba.write_text(f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n{original}")
        conn.execute("SELECT pg_reload_conf()")
    url = f"postgresql://{PASSWORD_ROLE}:{{password}}@127.0.0.1:{pg_server.port}/{{database}}"
    asyncio.run(wait_until(lambda: refused(url.format(password=WRONG, database="postgres")), 30,
                           "the server to ask for the password"))
    try:
        yield url
    finally:
        hba.write_text(original)
        with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
            conn.execute(f"DROP ROLE IF EXISTS {PASSWORD_ROLE}")


def refused(url: str) -> bool:
    try:
        psycopg.connect(url).close()
    except psycopg.OperationalError as exc:
        return "password authentication failed" in str(exc)
    return False


# -- refusals change nothing ---------------------------------------------------------------------------------

STRICT_TABLE = """
CREATE TABLE public.wa (
    id     uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name   text NOT NULL UNIQUE,
    status text NOT NULL CHECK (status IN ('connecting', 'open', 'close'))
);
INSERT INTO public.wa (name, status) VALUES ('shop', 'close');
"""
WA_FLAGS = ("--table", "wa", "--name-column", "name", "--status-column", "status", "--token-column", "none")


def test_a_migrate_whose_binding_the_table_refuses_leaves_the_database_exactly_as_it_was(db: Database) -> None:
    db.query(STRICT_TABLE)
    before = dump(db)
    env = {"DATABASE_URL": db.dsn}
    result = run_pgqr("migrate", *WA_FLAGS, "--connected-value", "connected", env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "pgqr: cannot bind: column status cannot hold 'connected': new row for relation wa violates check "
        'constraint "wa_status_check"']
    assert dump(db) == before
    assert db.value("SELECT to_regnamespace('pgqr')") is None
    # every command then agrees that pgqr is not installed here
    assert run_pgqr("status", env=env).stderr.strip() == not_installed(db)
    assert run_pgqr("migrate", "--verify", env=env).returncode == 1
    # positive control: the value the table takes installs pgqr and binds it
    good = run_pgqr("migrate", *WA_FLAGS, "--connected-value", "open", env=env)
    assert good.returncode == 0, good.stderr
    assert "bound public.wa (key id)" in good.stdout.splitlines()
    assert dump(db) != before
    assert run_pgqr("migrate", "--verify", env=env).returncode == 0


# -- pgqr run answers at once --------------------------------------------------------------------------------


def messages(path: Path) -> list[str]:
    return [r.get("message") or r.get("raw", "") for r in log_records(path)]


async def test_run_says_where_it_connects_then_waits_for_a_database_being_created(
        db: Database, pgqr_template: str, tmp_path: Path, children: list[asyncio.subprocess.Process]) -> None:
    secret = "not-needed-" + "s" * 10  # trust ignores it; it must still never be printed
    with psycopg.connect(db.server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{db.name}"')
    url = f"postgresql://postgres:{secret}@127.0.0.1:{db.server.port}/{db.name}"
    out = tmp_path / "run.log"
    proc = await start_pgqr(command_env(DATABASE_URL=url, EVOLUTION_API_URL="http://127.0.0.1:9",
                                        PGQR_DATABASE_WAIT_SECONDS="300"), out, "run")
    children.append(proc)
    target = f"host 127.0.0.1 port {db.server.port}, database {db.name}, user postgres"
    await wait_until(lambda: any("still waiting" in m for m in messages(out)), 60, "a line while it waits")
    said = messages(out)
    assert said[0] == f"connecting to the database: {target}"
    waiting = next(m for m in said if "still waiting" in m)
    assert f'database "{db.name}" does not exist' in waiting and target in waiting, waiting
    assert proc.returncode is None  # still waiting, as asked
    # the database appears and pgqr is installed: the same process goes on and serves. It appears with pgqr in it
    # (a clone of the migrated template): a retry between an empty database's creation and its migrate would find
    # pgqr not installed and exit 2, as it should
    with psycopg.connect(db.server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db.name}" TEMPLATE "{pgqr_template}"')
    assert run_pgqr("migrate", env={"DATABASE_URL": db.dsn}).returncode == 0
    db.pause_cron()
    await wait_until(lambda: any(r.get("action") == "start" for r in log_records(out)), 120, "pgqr run to start")
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    assert secret not in out.read_text()


async def test_run_with_a_wrong_password_exits_2_at_once(quiet: Database, password_role: str) -> None:
    env = {"EVOLUTION_API_URL": "http://127.0.0.1:9", "PGQR_DATABASE_WAIT_SECONDS": "3600"}
    wrong = password_role.format(password=WRONG, database=quiet.name)
    # a wait of an hour: only a refusal that does not wait comes back within the subprocess timeout
    result = run_pgqr("run", env={**env, "DATABASE_URL": wrong}, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f'pgqr: the database refused the connection: password authentication failed for user '
                    f'"{PASSWORD_ROLE}" (host 127.0.0.1 port {quiet.server.port}, database {quiet.name}, '
                    f'user {PASSWORD_ROLE})')
    assert "connecting to the database" in result.stderr and WRONG not in result.stderr
    # positive control: the right password gets in (status reads the same database)
    right = run_pgqr("status", env={"DATABASE_URL": password_role.format(password=PASSWORD, database=quiet.name)})
    assert right.returncode == 0, right.stderr


# -- one table of exit statuses ------------------------------------------------------------------------------

# every command that needs pgqr installed, with what it needs besides
NEEDS_PGQR: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "bind": (("bind",), {}),
    "run": (("run",), {"EVOLUTION_API_URL": "http://127.0.0.1:9", "PGQR_DATABASE_WAIT_SECONDS": "0"}),
    "refresh": (("refresh", "--once"), {"EVOLUTION_API_URL": "http://127.0.0.1:9"}),
    "status": (("status",), {}),
    "webhooks": (("webhooks", "register", "--all"), {"EVOLUTION_API_URL": "http://127.0.0.1:9",
                                                     "PGQR_PUBLIC_URL": "http://127.0.0.1:9",
                                                     "PGQR_WEBHOOK_SECRET": "w" * 32}),
    "schedule": (("schedule", "--every", "5 minutes"), {}),
    "pause": (("pause",), {}),
    "resume": (("resume",), {}),
    "uninstall": (("uninstall",), {}),
    "link": (("link", "shop"), {"PGQR_PUBLIC_URL": "http://127.0.0.1:9", "PGQR_LINK_SECRET": "l" * 16}),
}
# and those that check what is there
CHECKS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "migrate": (("migrate",), {}),
    "verify": (("migrate", "--verify"), {}),
    "doctor": (("doctor",), {"EVOLUTION_API_URL": "http://127.0.0.1:9"}),
}
WITH_A_DATABASE = {**NEEDS_PGQR, **CHECKS}


@pytest.mark.parametrize("command", NEEDS_PGQR)
def test_every_command_that_needs_pgqr_says_the_same_line_and_exits_2_where_it_is_not_installed(
        db: Database, command: str) -> None:
    args, env = NEEDS_PGQR[command]
    before = dump(db)
    result = run_pgqr(*args, env={**env, "DATABASE_URL": db.dsn})
    assert (result.returncode, result.stderr.strip().splitlines()[-1:]) == (2, [not_installed(db)])
    assert dump(db) == before


def test_doctor_and_verify_report_pgqr_not_installed_as_a_failed_check(db: Database) -> None:
    doctor = run_pgqr("doctor", env={"DATABASE_URL": db.dsn})
    assert doctor.returncode == 1 and "FAIL  schema: pgqr is not installed" in doctor.stdout
    verify = run_pgqr("migrate", "--verify", env={"DATABASE_URL": db.dsn})
    assert verify.returncode == 1 and "pending: 0001_settings.sql" in verify.stdout.splitlines()


@pytest.mark.parametrize("command", WITH_A_DATABASE)
def test_every_command_exits_1_when_the_database_does_not_answer(command: str) -> None:
    args, env = WITH_A_DATABASE[command]
    url = f"postgresql://postgres@127.0.0.1:{devdb.free_port()}/app"
    result = run_pgqr(*args, env={**env, "DATABASE_URL": url})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    if command != "doctor":  # doctor says it as a failed check
        last = result.stderr.strip().splitlines()[-1]  # `run` first says where it connects
        assert last.startswith("pgqr: cannot reach the database") and "127.0.0.1" in last, last


@pytest.mark.parametrize("command", WITH_A_DATABASE)
def test_every_command_exits_2_when_the_database_refuses_the_password(migrated: Database, password_role: str,
                                                                      command: str) -> None:
    args, env = WITH_A_DATABASE[command]
    url = password_role.format(password=WRONG, database=migrated.name)
    result = run_pgqr(*args, env={**env, "DATABASE_URL": url, "PGQR_DATABASE_WAIT_SECONDS": "3600"}, timeout=120)
    output = result.stdout + result.stderr
    assert "password authentication failed" in output and WRONG not in output and "Traceback" not in output
    assert result.returncode == 2, output


@pytest.mark.parametrize("command", [*WITH_A_DATABASE, "simulate", "demo", "bench"])
def test_every_command_refuses_an_unknown_or_abbreviated_flag_with_one_line_and_exit_2(
        command: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = (WITH_A_DATABASE[command][0] if command in WITH_A_DATABASE else (command,))
    with pytest.raises(SystemExit) as exit_:
        cli.main([*args, "--databa", "postgresql://x@y/z"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert len(err.splitlines()) == 1 and "unknown flag --databa" in err, err
    # positive control: the whole flag parses (simulate, demo and bench take no database)
    if command in WITH_A_DATABASE:
        args_ = cli.build_parser().parse_args([*args, "--database-url", "postgresql://x@y/z"])
        assert args_.database_url == "postgresql://x@y/z"


def test_the_exit_status_table_is_in_the_help() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(out.getvalue().split())
    for code, meaning in cli.EXIT_STATUSES:
        assert f"{code} {' '.join(meaning.split())}" in text


# -- a complete command line ---------------------------------------------------------------------------------


def test_version_prints_pgqrs_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"pgqr {__version__}\n"


def parsers() -> Iterator[tuple[str, cli.argparse.ArgumentParser]]:
    """Every parser of the command line: pgqr, each command and subcommand, and the simulator's own."""
    todo: list[cli.argparse.ArgumentParser] = [cli.build_parser()]
    while todo:
        parser = todo.pop()
        yield parser.prog, parser
        for action in parser._actions:
            if isinstance(action, cli.argparse._SubParsersAction):
                todo += list(dict.fromkeys(action.choices.values()))
    yield "pgqr simulate", sim_cli.build_parser()


def test_every_flag_has_help_that_names_its_default_at_most_once() -> None:
    seen = 0
    for prog, parser in parsers():
        for action in parser._actions:
            if not action.option_strings or action.help == cli.argparse.SUPPRESS:
                continue
            seen += 1
            assert action.help, f"{prog} {action.option_strings[0]} has no help"
            shown = action.help.replace("%(default)s", str(action.default))
            assert shown.count("(default") <= 1, f"{prog} {action.option_strings[0]}: {shown}"
    assert seen > 100


def test_usage_shows_required_flags_as_required() -> None:
    for prog, parser in parsers():
        usage = " ".join(parser.format_usage().split())
        for action in parser._actions:
            if action.option_strings and action.required and action.help != cli.argparse.SUPPRESS:
                flag = action.option_strings[0]
                assert f"[{flag}" not in usage and flag in usage, f"{prog}: {usage}"
    refresh = run_pgqr("refresh", env={"DATABASE_URL": "postgresql://x@127.0.0.1:9/app"})
    assert refresh.returncode == 2
    assert refresh.stderr.splitlines() == [
        "pgqr refresh: the following arguments are required: --once (see `pgqr refresh --help`)"]


def test_simulate_without_the_sim_extra_is_one_line_naming_it() -> None:
    script = "import sys; sys.modules['segno'] = None; from pgqr.cli import main; sys.exit(main(sys.argv[1:]))"
    for command in ("simulate", "demo", "bench"):
        result = subprocess.run([sys.executable, "-c", script, command], capture_output=True, text=True,
                                timeout=60, stdin=subprocess.DEVNULL)
        assert (result.returncode, result.stderr.splitlines()) == (
            2, [f"pgqr: pgqr {command} needs the simulator's extra: pip install 'pgqr[sim]'"])


async def test_simulate_prints_the_settings_and_names_for_pgqr_and_they_work(
        tmp_path: Path, children: list[asyncio.subprocess.Process]) -> None:
    assert sim_cli.build_parser().parse_args([]).port == sim_cli.DEFAULT_PORT != 8080  # 8080: the sidecar's
    assert f"(default: {sim_cli.DEFAULT_PORT})" in " ".join(sim_cli.build_parser().format_help().split())
    out = tmp_path / "sim.log"
    proc = await start_pgqr(command_env(), out, "simulate", "--port", "0", "--instances", "2")
    children.append(proc)
    await wait_until(lambda: "instance names" in out.read_text(), 60, "the simulator's start-up lines")
    lines = out.read_text().splitlines()
    base_url = lines[0].split("base_url=", 1)[1].split()[0]
    assert lines[1:] == [
        "for pgqr (every instance answers the global key; the tokens above work too):",
        f"  export EVOLUTION_API_URL={base_url}",
        "  export EVOLUTION_API_KEY=pgqr-simulator-key",
        "  instance names for the app's table: sim-00001, sim-00002"]
    async with aiohttp.ClientSession() as http:
        for name, key in (("sim-00002", "pgqr-simulator-key"), ("sim-00002", "not-the-key")):
            async with http.get(f"{base_url}/instance/connectionState/{name}", headers={"apikey": key}) as r:
                assert r.status == (200 if key == "pgqr-simulator-key" else 401)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0


def test_simulate_on_a_port_in_use_is_one_line_and_exit_2() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_pgqr("simulate", "--port", str(port), timeout=30)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"pgqr simulate: cannot listen on 127.0.0.1:{port}") and "--port" in line
    # (the positive control, a free port, is test_simulate_prints_the_settings_and_names_for_pgqr_and_they_work)
