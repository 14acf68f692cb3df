"""What `pgqr status/doctor/schedule/pause/resume/uninstall` do. The SQL they run lives in sql/ as pgqr
functions and views (a psql user can call the same ones); this module connects, calls them, and reaches
pg_cron's own database where pg_cron lives elsewhere."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict

from . import cron, hooks, migrations
from .errors import ConfigurationError, MigrationError
from .evolution import EvolutionClient, EvolutionState, Failure, display_url
from .hooks import Target, names_text
from .settings import ConfigError, Settings, first_line, reveal

Conn = psycopg.Connection[tuple[Any, ...]]


class NotInstalled(MigrationError):
    """The database has no pgqr schema (exit status 1, with the fix)."""


def _connect(settings: Settings) -> Conn:
    return psycopg.connect(settings.dsn, autocommit=True, prepare_threshold=None)


def _installed(conn: Conn) -> bool:
    row = conn.execute("SELECT to_regclass('pgqr.jobs') IS NOT NULL").fetchone()
    return bool(row and row[0])


def _require_installed(conn: Conn) -> None:
    if not _installed(conn):
        raise NotInstalled(f"pgqr is not installed in database {conn.info.dbname}: run `pgqr migrate`")


# ---------------------------------------------------------------------------------------------- status


def status(settings: Settings) -> dict[str, Any]:
    """pgqr.status(): instances (the health view), listeners, jobs, last tick, firing alerts."""
    with _connect(settings) as conn:
        _require_installed(conn)
        row = conn.execute("SELECT pgqr.status() || jsonb_build_object('now', now())").fetchone()
    assert row is not None
    doc: dict[str, Any] = row[0]
    return doc


def _when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(abs(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h" if s < 172800 else f"{s // 86400}d"


def _relative(now: datetime, value: str | None) -> str:
    moment = _when(value)
    if moment is None:
        return "-"
    delta = (moment - now).total_seconds()
    return f"in {_age(delta)}" if delta > 0 else f"{_age(delta)} ago"


def describe_binding(binding: dict[str, Any] | None) -> str:
    """One line: the bound table, its key, name and status columns with their values, and the optional columns
    that are bound."""
    if not binding:
        return "nothing bound (run `pgqr bind`)"
    b = binding
    parts = [f"key {b['key_column']}", f"name {b['name_column']}",
             f"status {b['status_column']} (waiting {','.join(b['waiting_values'])}; connected "
             f"{b['connected_value']}; gave up {b['gave_up_value'] or '-'})"]
    parts += [f"{label} {b[attr]}" for label, attr in (
        ("token", "token_column"), ("url", "url_column"), ("qr", "qr_column"), ("qr at", "qr_at_column"),
        ("qr expires", "qr_expires_column"), ("pairing", "pairing_column"), ("phone", "phone_column"))
        if b.get(attr)]
    return f"{b['table_name']}: " + ", ".join(parts)


def format_status(doc: dict[str, Any]) -> str:
    """The status document as a table for humans, with a summary line of listeners, ticks, jobs, alerts."""
    now = datetime.fromisoformat(doc["now"])
    header = ("INSTANCE", "STATUS", "QR AGE", "QR EXPIRES", "LAST ATTEMPT", "OUTCOME", "FAILURES", "NEXT ATTEMPT",
              "LEASE")
    rows = [header]
    for i in doc["instances"]:
        outcome = i["last_outcome"] or "-"
        if i["last_error_class"]:
            outcome += f" ({i['last_error_class']})"
        rows.append((
            i["instance_name"], i["status"], _age(i["qr_age_seconds"]),
            _relative(now, i["qr_expires_at"]) if i["waiting"] else "-", _relative(now, i["last_attempt_at"]),
            outcome, str(i["consecutive_failures"]), _relative(now, i["next_attempt_at"]),
            i["lease_owner"] or "-",
        ))
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if not doc["instances"]:
        lines.append("(no instances)")
    live = [x for x in doc["listeners"] if x["live"]]
    active = [j for j in doc["jobs"] if j["active"]]
    alerts = ", ".join(f"{a['rule']} ({a['count']})" for a in doc["alerts_firing"]) or "none"
    lines.append("")
    lines.append(
        f"listeners: {len(live)} live · last tick: {_relative(now, doc['last_tick_at'])} · "
        f"jobs: {len(active)}/{len(doc['jobs'])} active · alerts firing: {alerts}"
    )
    fresh = doc.get("freshness") or {}
    if fresh.get("waiting"):
        expired = f"; the oldest expired {_age(fresh['oldest_expired_seconds'])} ago" \
            if fresh["oldest_expired_seconds"] else ""
        lines.append(f"freshness: {fresh['qr_valid']} of {fresh['waiting']} waiting instance(s) hold a QR within its "
                     f"estimated life{expired}")
    lines.append(f"binding: {describe_binding(doc.get('binding'))}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- schedule/pause/resume

_EVERY = re.compile(
    r"^\s*(\d+)\s*(s|sec|secs|second|seconds|m|min|mins|minute|minutes|h|hr|hrs|hour|hours|d|day|days)\s*$",
    re.IGNORECASE,
)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_every(text: str) -> timedelta:
    """'30s', '5 minutes', '1h', '1 day' -> timedelta; ConfigError for anything else."""
    match = _EVERY.match(text)
    if not match or int(match.group(1)) == 0:
        raise ConfigError(
            f"--every must be a positive number and a unit (seconds, minutes, hours, days), like '5 minutes' "
            f"or '30s'; got {text!r}"
        )
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)[0].lower()])


def cron_version(dsn: str, setup: cron.CronSetup) -> str | None:
    """pg_cron's extversion in its database ('1.4-1'), None when the extension is not created there."""
    with cron.connect(cron.cron_conninfo(dsn, setup)) as cron_db:
        row = cron_db.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'").fetchone()
    return str(row[0]) if row else None


def _resync(settings: Settings, conn: Conn, setup: cron.CronSetup) -> None:
    """pgqr.jobs changed: apply it in pg_cron's database (pgqr.sync_cron() can only do that from there)."""
    cron.schedule_jobs(settings.dsn, setup, cron.wanted_jobs(conn))


def schedule(settings: Settings, every: str) -> str:
    """Tick every `every`; returns the cron expression. ConfigError for a period pg_cron cannot run."""
    period = parse_every(every)
    with _connect(settings) as conn:
        _require_installed(conn)
        setup = cron.cron_setup(conn)
        version = cron_version(settings.dsn, setup)
        try:
            row = conn.execute("SELECT pgqr.schedule(%s, %s)", (period, version)).fetchone()
        except (errors.InvalidParameterValue, errors.FeatureNotSupported) as exc:
            raise ConfigError(exc.diag.message_primary or str(exc)) from None
        _resync(settings, conn, setup)
    assert row is not None
    return str(row[0])


def set_active(settings: Settings, active: bool) -> int:
    """pgqr.pause() / pgqr.resume(), then pg_cron; returns how many jobs changed state."""
    with _connect(settings) as conn:
        _require_installed(conn)
        setup = cron.cron_setup(conn)
        row = conn.execute("SELECT pgqr.resume()" if active else "SELECT pgqr.pause()").fetchone()
        _resync(settings, conn, setup)
    return int(row[0]) if row else 0


# ------------------------------------------------------------------------------------------- uninstall

def uninstall(settings: Settings, drop_data: bool) -> list[str]:
    """Unschedule pgqr's jobs and remove its trigger from the app's table (the app's writes then behave as
    before install); with drop_data also drop schema pgqr. Never touches the app's table or its rows.

    The role pgqr_monitor stays when another database still uses it (roles are cluster-wide).
    """
    done: list[str] = []
    with _connect(settings) as conn:
        try:
            with conn.transaction():
                # a listener in mid-transaction would make us wait forever; fail with the fix instead (LOCAL: a
                # pooler hands this connection to someone else afterwards)
                conn.execute("SET LOCAL lock_timeout = '10s'")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (cron.LOCK_KEY,))  # not while a migrate runs
                done += _uninstall(settings, conn, drop_data)
        except errors.LockNotAvailable:
            raise MigrationError(
                "pgqr's tables are in use: stop every `pgqr run`, then uninstall again") from None
    return done


def _uninstall(settings: Settings, conn: Conn, drop_data: bool) -> list[str]:
    done: list[str] = []
    installed = _installed(conn)
    jobs = cron.wanted_jobs(conn) if installed else []
    try:
        setup: cron.CronSetup | None = cron.cron_setup(conn)
    except ConfigurationError:
        setup = None  # no pg_cron, so nothing scheduled
    if setup is not None and jobs:
        if drop_data:
            _forget_history(settings.dsn, setup, jobs)
        removed = cron.unschedule_jobs(settings.dsn, setup, jobs)
        done.append(f"unscheduled {removed} pg_cron job(s) in database {setup.cron_database}")
    table = None
    if installed:
        row = conn.execute("SELECT pgqr.qualified(to_regclass(table_name)) FROM pgqr.binding").fetchone()
        table = row[0] if row else None
    if table:
        conn.execute(f"DROP TRIGGER IF EXISTS pgqr_instance_change ON {table}".encode())
        done.append(f"removed pgqr's trigger from {table}; its rows are untouched")
    if drop_data:
        conn.execute("DROP SCHEMA IF EXISTS pgqr CASCADE")
        done.append("dropped schema pgqr (state, history, settings)")
        if _drop_monitor_role(conn):
            done.append("dropped role pgqr_monitor")
        elif conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'pgqr_monitor'").fetchone():
            done.append("kept role pgqr_monitor: another database still grants it rights")
    else:
        done.append("kept schema pgqr and its data; `pgqr migrate` installs the trigger and jobs again, "
                    "`--drop-data` removes everything")
    return done


def _drop_monitor_role(conn: Conn) -> bool:
    """Drop pgqr_monitor unless another database still has objects or privileges for it."""
    try:
        with conn.transaction():
            conn.execute("DROP ROLE IF EXISTS pgqr_monitor")
        return True
    except (errors.DependentObjectsStillExist, errors.InsufficientPrivilege):
        return False


def _forget_history(dsn: str, setup: cron.CronSetup, jobs: list[cron.Job]) -> None:
    with psycopg.connect(cron.cron_conninfo(dsn, setup), autocommit=True) as cron_db:
        for job in jobs:
            cron_db.execute(
                "DELETE FROM cron.job_run_details WHERE jobid IN "
                "(SELECT jobid FROM cron.job WHERE jobname = %s AND database = %s)",
                (setup.jobname(job.name), job.database(setup)),
            )


# ---------------------------------------------------------------------------------------------- doctor


@dataclass(frozen=True)
class Check:
    """One doctor finding: `fix` says what to do when it failed."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"PASS  {self.name}: {self.detail}"
        return f"FAIL  {self.name}: {self.detail}" + (f" -> fix: {self.fix}" if self.fix else "")


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

    with _connect(settings) as conn:
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
            guarded("listener", lambda: _check_listener(conn, checks))
            guarded("listen", lambda: _check_listen(conn, checks))
            guarded("tokens", lambda: _check_tokens(conn, settings, checks))
            rows = guarded("instances", lambda: hooks.targets(conn, settings)) or []  # type: ignore[assignment]
    checks += asyncio.run(_check_evolution(settings, rows))
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
    if not _installed(conn):
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


def _check_listen(conn: Conn, checks: list[Check]) -> None:
    """Live listeners whose LISTEN does not deliver (listen_ok = false in their heartbeat) serve by polling only."""
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE listen_ok IS FALSE), count(*), "
        "       string_agg(host || ':' || pid, ', ' ORDER BY host, pid) FILTER (WHERE listen_ok IS FALSE) "
        "FROM pgqr.listeners WHERE live"
    ).fetchone()
    failing, live, which = row or (0, 0, None)
    if failing:
        checks.append(Check("listen", False, f"{failing} of {live} live listener(s) get no notifications ({which}): "
                            "their LISTEN goes through a transaction-mode pooler, so they poll every second "
                            "instead", LISTEN_FIX))
    else:
        checks.append(Check("listen", True, f"notifications reach all {live} live listener(s)"))


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


async def _check_evolution(settings: Settings, rows: list[Target]) -> list[Check]:
    """What will fail at Evolution: the key, each waiting row's token and name, each waiting row's webhook."""
    waiting = [r for r in rows if r.waiting]
    async with hooks.client(settings) as http:
        checks = [await _check_key(http, settings, rows)]
        states = await hooks.each(waiting, lambda t: _state(http, t))
        checks.append(_check_instances(waiting, states))
        checks.append(await _check_webhooks(http, settings, waiting, states))
    return checks


async def _check_key(http: EvolutionClient, settings: Settings, rows: list[Target]) -> Check:
    """Reachable, accepted, and a global key rather than one instance's token (fetchInstances shows a global key
    every instance, an instance token only its own row: evolution-api.md section 9)."""
    if not settings.evolution_api_url:
        return Check("evolution", False, "EVOLUTION_API_URL is not set",
                     "set EVOLUTION_API_URL to your Evolution API server, like http://localhost:8080")
    base, key = settings.evolution_api_url.reveal(), reveal(settings.evolution_api_key) or ""
    where = display_url(base)
    listed = await http.fetch_instances(base, key)
    if isinstance(listed, Failure):
        if listed.error_class == "unauthorized" and not key:
            return Check("evolution", True, f"{where} is reachable (no EVOLUTION_API_KEY to check; instance "
                                            "tokens are used)")
        if listed.error_class == "unauthorized":
            return Check("evolution", False, f"{where} rejects EVOLUTION_API_KEY ({listed.detail})",
                         "set EVOLUTION_API_KEY to the server's AUTHENTICATION_API_KEY")
        return Check("evolution", False, f"{where} is not usable: {listed.error_class}: {listed.detail}",
                     "check EVOLUTION_API_URL (with its path, if Evolution is behind one) and that the server is up")
    if listed.key_scope == "global":
        return Check("evolution", True, f"{where} accepts EVOLUTION_API_KEY as the global key "
                                        f"({len(listed.rows)} instance(s) in Evolution)")
    if listed.key_scope == "unknown":
        return Check("evolution", True, f"{where} accepts EVOLUTION_API_KEY; it lists no instances, so a global "
                                        "key cannot be told from an instance token")
    owner = listed.rows[0].name
    without = sum(not r.own_token for r in rows)
    what = f"EVOLUTION_API_KEY is instance {owner!r}'s token, not the global key ({where} shows it only that instance)"
    if without:
        return Check("evolution", False, f"{what}: the {without} instance(s) without a token of their own get 401",
                     "set EVOLUTION_API_KEY to Evolution's global key (AUTHENTICATION_API_KEY), or give every row "
                     "its own token")
    return Check("evolution", True, f"{what}; every row has a token of its own, so it is not used")


async def _state(http: EvolutionClient, target: Target) -> EvolutionState | Failure | None:
    """connectionState (no side effect) with the row's own key; None when the row cannot be called at all."""
    if target.problem() is not None or target.base_url is None or target.apikey is None:
        return None
    return await http.connection_state(target.base_url, target.name, target.apikey)


_FIXES = {
    "wrong token (401)": "put the instance's own Evolution token (create's `hash`) in the row's token column, or "
                         "clear it to use EVOLUTION_API_KEY",
    "unknown to Evolution (404)": "create the instance in Evolution, or fix the row's name or URL",
    "route not found (check the base URL)": "fix the base URL (with its path, if Evolution is behind one)",
    "cannot be called (no Evolution URL or key)": "set EVOLUTION_API_URL and EVOLUTION_API_KEY, or the row's URL "
                                                  "and token",
}


def _kind(state: EvolutionState | Failure | None) -> str | None:
    if state is None:
        return "cannot be called (no Evolution URL or key)"
    if not isinstance(state, Failure):
        return None
    if state.error_class == "unauthorized":
        return "wrong token (401)"
    if state.error_class == "not_found":
        return "route not found (check the base URL)" if "route" in state.detail else "unknown to Evolution (404)"
    return f"{state.error_class}: {state.detail}"


def _grouped(problems: list[tuple[Target, str]]) -> str:
    """`at <base URL>: <n> <kind>: a, b, ...; ...`, grouped by the base URL each row was called at."""
    by_where: dict[str, dict[str, list[str]]] = {}
    for target, kind in problems:
        by_where.setdefault(target.where, {}).setdefault(kind, []).append(target.name)
    return "; ".join(
        f"at {where}: " + "; ".join(f"{len(names)} {kind}: {names_text(names)}" for kind, names in kinds.items())
        for where, kinds in by_where.items())


def _places(targets: list[Target]) -> str:
    return ", ".join(sorted({t.where for t in targets}))


def _check_instances(waiting: list[Target], states: list[EvolutionState | Failure | None]) -> Check:
    if not waiting:
        return Check("instances", True, "no waiting instance to check")
    problems = [(t, kind) for t, s in zip(waiting, states, strict=True) if (kind := _kind(s)) is not None]
    if not problems:
        return Check("instances", True, f"{len(waiting)} waiting instance(s) known to Evolution and accepted with "
                                        f"their keys at {_places(waiting)}")
    fixes = dict.fromkeys(_FIXES.get(kind, "check the Evolution server") for _, kind in problems)
    return Check("instances", False, f"{len(problems)} of {len(waiting)} waiting instance(s) will fail: "
                 + _grouped(problems), "; ".join(fixes))


async def _check_webhooks(http: EvolutionClient, settings: Settings, waiting: list[Target],
                          states: list[EvolutionState | Failure | None]) -> Check:
    if not settings.webhook_secret or not settings.webhook_secret.reveal():
        return Check("webhooks", True, "off: PGQR_WEBHOOK_SECRET is not set, so QRs arrive by polling only")
    if settings.global_webhook:
        if settings.webhook_jwt_key is not None:
            return Check("webhooks", False, "PGQR_GLOBAL_WEBHOOK=true but PGQR_WEBHOOK_JWT_KEY is set: Evolution's "
                         "global webhook sends no Authorization header, so pgqr refuses its posts",
                         "unset PGQR_WEBHOOK_JWT_KEY, or use per-instance webhooks (`pgqr webhooks register --all`)")
        return Check("webhooks", True, "PGQR_GLOBAL_WEBHOOK=true: Evolution's global webhook points at pgqr "
                     "(doctor cannot see it: it lives in Evolution's environment, WEBHOOK_GLOBAL_URL)")
    if not settings.public_url:
        return Check("webhooks", False, "PGQR_PUBLIC_URL is not set: cannot tell where the instances' webhooks "
                     "should point", "set PGQR_PUBLIC_URL to the sidecar's URL as Evolution reaches it (or "
                     "PGQR_GLOBAL_WEBHOOK=true when Evolution's global webhook points at pgqr)")
    readable = [t for t, s in zip(waiting, states, strict=True) if isinstance(s, EvolutionState)]
    if not readable:
        return Check("webhooks", True, "no waiting instance whose webhook can be read"
                     + (" (see the instances check)" if waiting else ""))

    async def find(t: Target) -> str | None:
        assert t.base_url is not None and t.apikey is not None
        found = await http.find_webhook(t.base_url, t.name, t.apikey)
        return f"{found.error_class}: {found.detail}" if isinstance(found, Failure) else hooks.judge(found, settings)

    verdicts = await hooks.each(readable, find)
    problems = [(t, verdict) for t, verdict in zip(readable, verdicts, strict=True) if verdict is not None]
    target = display_url(hooks.hook_url(settings))
    if problems:
        return Check("webhooks", False, f"{len(problems)} of {len(readable)} waiting instance(s) send no webhook to "
                     f"{target}: " + _grouped(problems),
                     "run `pgqr webhooks register --all` (or set PGQR_GLOBAL_WEBHOOK=true when Evolution's global "
                     "webhook points at pgqr)")
    return Check("webhooks", True, f"{len(readable)} waiting instance(s) at {_places(readable)} send their "
                                   f"webhooks to {target}")
