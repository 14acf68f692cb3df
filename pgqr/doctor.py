"""`pgqr doctor`: a list of typed checks, each a finding with its fix; all must pass for a healthy installation."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable

import psycopg
from psycopg.conninfo import conninfo_to_dict

from . import cron, hooks, migrations
from .admin import Conn, connect, cron_version, installed
from .doctor_evolution import check_evolution
from .errors import ConfigurationError
from .findings import Check
from .hooks import Target
from .settings import Settings, database_target, first_line
from .status import describe_binding


def doctor(settings: Settings) -> list[Check]:
    """Every check, in order; all must pass for a healthy installation. A check the role cannot run (a
    permission it lacks) fails with what the database said, and the others still run."""
    checks: list[Check] = []
    rows: list[Target] = []

    def guarded(name: str, check: Callable[[], object]) -> object:
        try:
            return check()
        except psycopg.Error as exc:
            checks.append(Check(name, False, f"could not check: {first_line(exc)}",
                                f"run `pgqr doctor` as a role that may (role {settings_user(settings)})"))
            return None

    with connect(settings) as conn:
        setup = guarded("pg_cron", lambda: _check_pg_cron(conn, settings, checks))
        installed = bool(guarded("schema", lambda: _check_schema(conn, checks)))
        if installed and isinstance(setup, cron.CronSetup):
            guarded("jobs", lambda: _check_jobs(conn, settings, setup, checks))
        elif installed:
            checks.append(Check("jobs", False, "cannot check the jobs without pg_cron",
                                "see the pg_cron check"))
        if installed:
            guarded("binding", lambda: _check_binding(conn, checks))
            guarded("names", lambda: _check_names(conn, settings, checks))
            guarded("servers", lambda: _check_servers(conn, checks))
            guarded("listener", lambda: _check_listener(conn, checks))
        guarded("listen", lambda: _check_listen(conn if installed else None, settings, checks))
        if installed:
            guarded("tokens", lambda: _check_tokens(conn, settings, checks))
            rows = guarded("instances", lambda: hooks.targets(conn, settings)) or []  # type: ignore[assignment]
    checks += asyncio.run(check_evolution(settings, rows))
    return checks


def settings_user(settings: Settings) -> str:
    return str(conninfo_to_dict(settings.dsn).get("user") or "of DATABASE_URL")


def _check_pg_cron(conn: Conn, settings: Settings, checks: list[Check]) -> cron.CronSetup | None:
    try:
        setup = cron.cron_setup(conn)
    except ConfigurationError as exc:
        checks.append(Check("pg_cron", False, "not in shared_preload_libraries", str(exc)))
        return None
    try:
        version = cron_version(settings.dsn, setup)
    except psycopg.OperationalError:
        checks.append(Check("pg_cron", False,
                            f"preloaded, but its database {setup.cron_database} is unreachable",
                            f"create database {setup.cron_database} or set cron.database_name"))
        return None
    if version is None:
        checks.append(Check("pg_cron", False,
                            f"preloaded, but the extension is missing in {setup.cron_database}",
                            "run `pgqr migrate` (it creates the extension)"))
        return None
    where = "this database" if setup.same_database else f"database {setup.cron_database}"
    checks.append(Check("pg_cron", True, f"preloaded, version {version}, lives in {where}"))
    return setup


def _check_schema(conn: Conn, checks: list[Check]) -> bool:
    if not installed(conn):
        checks.append(Check("schema", False, f"pgqr is not installed in database {conn.info.dbname}",
                            "run `pgqr migrate`"))
        return False
    pending = migrations.plan(conn, migrations.load()).pending
    if pending:
        checks.append(Check("schema", False, f"{len(pending)} migration(s) pending ({pending[0].name}, ...)",
                            "run `pgqr migrate`"))
    else:
        checks.append(Check("schema", True, "pgqr schema is up to date"))
    return True


def _check_jobs(conn: Conn, settings: Settings, setup: cron.CronSetup, checks: list[Check]) -> None:
    jobs = cron.wanted_jobs(conn)
    names = [setup.jobname(j.name) for j in jobs]
    with cron.connect(cron.cron_conninfo(settings.dsn, setup)) as cron_db:
        found = {
            str(name): (str(schedule), bool(active), str(database))
            for name, schedule, active, database in cron_db.execute(
                "SELECT jobname, schedule, active, database FROM cron.job WHERE jobname = ANY(%s)", (names,)
            )
        }
        failed = cron_db.execute(
            """SELECT DISTINCT ON (j.jobname) j.jobname, d.status, d.return_message
               FROM cron.job j JOIN cron.job_run_details d ON d.jobid = j.jobid
               WHERE j.jobname = ANY(%s) AND d.status IN ('succeeded', 'failed')
               ORDER BY j.jobname, d.start_time DESC""",
            (names,),
        ).fetchall()
    missing = [n for n in names if n not in found]
    changed = [
        setup.jobname(j.name) for j in jobs
        if (got := found.get(setup.jobname(j.name))) and (got[0], got[2]) != (j.schedule, j.database(setup))
    ]
    paused = [setup.jobname(j.name) for j in jobs if not j.active]
    inactive = [n for n, (_, active, _) in found.items() if not active]
    if missing or changed:
        checks.append(Check("jobs", False, f"not scheduled as pgqr.jobs says: {', '.join(missing + changed)}",
                            "run `pgqr migrate`"))
    elif paused or inactive:
        checks.append(Check("jobs", False, f"paused: {', '.join(sorted(set(paused + inactive)))}",
                            "run `pgqr resume`"))
    else:
        checks.append(Check("jobs", True, f"{len(names)} jobs scheduled and active in {setup.cron_database}"))
    bad = [(str(n), str(m or "").strip().splitlines()[0][:200] if m else "") for n, s, m in failed
           if s == "failed"]
    if bad:
        checks.append(Check(
            "job runs", False, "last run failed: " + "; ".join(f"{n}: {m}" for n, m in bad),
            f"read cron.job_run_details in database {setup.cron_database} (or SELECT * FROM pgqr.cron_runs)",
        ))
    else:
        checks.append(Check("job runs", True, f"no failed last run among {len(failed)} job(s) that ran"))


def _check_binding(conn: Conn, checks: list[Check]) -> None:
    row = conn.execute(
        """SELECT to_jsonb(b) - 'singleton', to_regclass(b.table_name) IS NOT NULL,
                  EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = to_regclass(b.table_name)
                          AND t.tgname = 'pgqr_instance_change')
           FROM pgqr.binding b""").fetchone()
    if row is None:
        checks.append(Check("binding", False, "no table is bound", "run `pgqr bind --table ...`"))
        return
    binding, exists, triggered = row
    if not exists:
        checks.append(Check("binding", False, f"{binding['table_name']} no longer exists",
                            "run `pgqr bind --table ...` with the app's instances table"))
    elif not triggered:
        checks.append(Check("binding", False, f"pgqr's trigger is missing on {binding['table_name']}",
                            "run `pgqr migrate` (it installs the trigger again)"))
    elif hidden := _rows_hidden_by_rls(conn, binding["table_name"]):
        checks.append(Check("binding", False, hidden,
                            "connect as the table's owner, a superuser or a BYPASSRLS role (Supabase: postgres)"))
    else:
        checks.append(Check("binding", True, describe_binding(binding)))


def _rows_hidden_by_rls(conn: Conn, table: str) -> str | None:
    """Row-level security that hides rows from pgqr's role: pgqr would neither poll nor write them."""
    row = conn.execute(
        """SELECT c.relrowsecurity AND (c.relforcerowsecurity OR c.relowner <> r.oid) AND NOT r.rolbypassrls
                  AND NOT r.rolsuper
           FROM pg_class c, pg_roles r WHERE c.oid = to_regclass(%s) AND r.rolname = current_user""",
        (table,)).fetchone()
    if row and row[0]:
        return f"{table} has row-level security and role {conn.info.user} is subject to it: pgqr sees only " \
               "the rows its policies allow"
    return None


def _check_names(conn: Conn, settings: Settings, checks: list[Check]) -> None:
    """Evolution's instance names are unique per server: two rows with one name and one server are one
    Evolution instance, which both would poll and whose webhooks cannot tell them apart."""
    rows = conn.execute(
        """SELECT a.name, count(*) FROM pgqr.app_instances a
           GROUP BY a.name, rtrim(coalesce(nullif(a.url, ''), %s), '/')
           HAVING count(*) > 1 ORDER BY count(*) DESC, a.name LIMIT 6""",
        (settings.default_evolution_url,)).fetchall()
    if not rows:
        checks.append(Check("names", True, "no two rows share an instance name on one Evolution server"))
        return
    shown = ", ".join(f"{_clip(str(name))} ({count} rows)" for name, count in rows[:5])
    more = " and more" if len(rows) > 5 else ""
    checks.append(Check("names", False, f"rows share an instance name on one Evolution server: {shown}{more}",
                        "give each row its own instance name, or its own server in the URL column"))


def _check_servers(conn: Conn, checks: list[Check]) -> None:
    """A server on which every bound row is not found (the sweep and polls say so) has a wrong base URL or is
    another Evolution: one problem, not as many deleted instances (pgqr.missing_servers)."""
    rows = conn.execute("SELECT server, instances FROM pgqr.missing_servers()").fetchall()
    if not rows:
        checks.append(Check("servers", True, "every Evolution server knows at least one of its bound instances"))
        return
    shown = ", ".join(f"{server} ({count} rows)" for server, count in rows)
    checks.append(Check("servers", False, f"no bound instance is known to {shown}",
                        "check EVOLUTION_API_URL or the rows' URL column: it names another Evolution server"))


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _check_listener(conn: Conn, checks: list[Check]) -> None:
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE live), count(*), min(heartbeat_age) FROM pgqr.listeners"
    ).fetchone()
    live, running, youngest = (row or (0, 0, None))
    if live:
        checks.append(Check("listener", True, f"{live} live listener(s)"))
    elif running:
        checks.append(Check("listener", False, f"no live listener; {running} went silent, last heartbeat "
                            f"{int(youngest.total_seconds())}s ago", "restart `pgqr run` and read its log"))
    else:
        checks.append(Check("listener", False, "no listener is running", "start `pgqr run`"))


LISTEN_FIX = ("set PGQR_LISTEN_DATABASE_URL to a direct or session-mode URL of this database (Supabase: port "
              "5432, not the transaction pooler's 6543) and restart `pgqr run`")


DOCTOR_CHANNEL = "pgqr_doctor"  # not the listeners' probe channel: a running listener never sees doctor's tests
ROUND_TRIP_SECONDS = 5.0


def _check_listen(conn: Conn | None, settings: Settings, checks: list[Check]) -> None:
    """The listen URL itself, whether or not a listener runs: a NOTIFY sent from another connection (as the
    triggers and the tick send theirs) must reach a LISTEN on it. Then, when pgqr is installed, the live
    listeners' own verdicts (listen_ok in their heartbeat)."""
    which = "PGQR_LISTEN_DATABASE_URL" if settings.listen_database_url else "DATABASE_URL"
    where = f"{which} ({database_target(settings.listen_dsn)})"
    try:
        took = _round_trip(settings.listen_dsn, settings.dsn, ROUND_TRIP_SECONDS)
    except psycopg.Error as exc:  # unreachable, refused, or no LISTEN there (a hot standby)
        what = "cannot connect to" if isinstance(exc, psycopg.OperationalError) else "cannot LISTEN on"
        checks.append(Check("listen", False, f"{what} {where}: {first_line(exc)}",
                            "set PGQR_LISTEN_DATABASE_URL to a direct or session-mode URL of this database's "
                            "primary"))
        return
    failing, live, which_listeners = _listeners_listen_ok(conn)
    if took is None:
        unset = "" if settings.listen_database_url else " and PGQR_LISTEN_DATABASE_URL is not set"
        others = f"; {failing} of {live} live listener(s) get no notifications either" if failing else ""
        checks.append(Check("listen", False, f"a NOTIFY sent from another connection never reached a LISTEN on "
                            f"{where} within {ROUND_TRIP_SECONDS:g} s: it goes through a transaction-mode pooler"
                            f"{unset}, so `pgqr run` would poll the database every second instead of listening"
                            f"{others}", LISTEN_FIX))
    elif failing:
        checks.append(Check("listen", False, f"{failing} of {live} live listener(s) get no notifications "
                            f"({which_listeners}): their LISTEN goes through a transaction-mode pooler, so they "
                            f"poll every second instead (a LISTEN on {where} works)", LISTEN_FIX))
    else:
        reach = f"; notifications reach all {live} live listener(s)" if live else ""
        checks.append(Check("listen", True, f"a NOTIFY from another connection reached a LISTEN on {where} in "
                                            f"{took * 1000:.0f} ms{reach}"))


def _listeners_listen_ok(conn: Conn | None) -> tuple[int, int, str | None]:
    """Live listeners whose LISTEN does not deliver (listen_ok = false in their heartbeat), of all live ones."""
    if conn is None:
        return 0, 0, None
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE listen_ok IS FALSE), count(*), "
        "       string_agg(host || ':' || pid, ', ' ORDER BY host, pid) FILTER (WHERE listen_ok IS FALSE) "
        "FROM pgqr.listeners WHERE live"
    ).fetchone()
    failing, live, which = row or (0, 0, None)
    return int(failing), int(live), which


def _round_trip(listen_dsn: str, send_dsn: str, within: float) -> float | None:
    """Seconds a NOTIFY from a connection to `send_dsn` took to reach a LISTEN on `listen_dsn`; None when it
    did not come within `within` seconds (a transaction-mode pooler drops it: see pgqr.listener)."""
    token = secrets.token_hex(8)
    with _connect(listen_dsn) as listen:
        listen.execute(f"LISTEN {DOCTOR_CHANNEL}")
        try:
            started = time.monotonic()
            with _connect(send_dsn) as sender:
                sender.execute("SELECT pg_notify(%s, %s)", (DOCTOR_CHANNEL, token))
            for notify in listen.notifies(timeout=max(0.0, within - (time.monotonic() - started))):
                if notify.payload == token:
                    return time.monotonic() - started
            return None
        finally:
            with contextlib.suppress(psycopg.Error):  # through a pooler, best effort (as the listener's)
                listen.execute(f"UNLISTEN {DOCTOR_CHANNEL}")


def _connect(dsn: str) -> Conn:
    return psycopg.connect(dsn, autocommit=True, prepare_threshold=None, connect_timeout=10,
                           application_name="pgqr-doctor")


def _check_tokens(conn: Conn, settings: Settings, checks: list[Check]) -> None:
    if settings.evolution_api_key:
        checks.append(Check("tokens", True, "EVOLUTION_API_KEY is set; it serves instances without a token"))
        return
    row = conn.execute(
        "SELECT count(*) FROM pgqr.app_instances WHERE coalesce(token, '') = ''"
    ).fetchone()
    missing = int(row[0]) if row else 0
    if missing:
        checks.append(Check("tokens", False,
                            f"{missing} instance(s) have no token of their own and EVOLUTION_API_KEY is not set",
                            "set EVOLUTION_API_KEY, or fill the binding's token column"))
    else:
        checks.append(Check("tokens", True, "every instance has a token of its own"))
