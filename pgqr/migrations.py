"""Load sql/, check it with pglast, apply it under an advisory lock, schedule pgqr's pg_cron jobs, verify.

Each numbered file records its version (with a checksum of the file) in the transaction that applies it, and
one migrate applies every pending file and the binding in one transaction, so a crash or a refusal never
leaves half an installation. Every file is parsed before the database
is touched: a syntax error anywhere means nothing is applied.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, cast

import pglast
import psycopg
from pglast import ast

from .cron import (
    LOCK_KEY,
    connect,
    cron_setup,
    ensure_extension,
    missing_jobs,
    schedule_jobs,
    wanted_jobs,
)
from .errors import ConfigurationError, MigrationError
from .evolution import ERROR_CLASSES
from .settings import BINDING_ATTRS, Secret, Settings
from .status import describe_binding

# One lock for every pgqr migrate against this database, whichever process runs it.
FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

# A file is never changed once applied (tests/golden/migrations.sha256 records each; a change is a new file).
# One was, before that rule was checked: 0002 as first released created instance_state's name index as a
# btree. 0003 drops that index and creates it as a hash index whichever 0002 ran, so a database that applied
# the first 0002 ends the same as one that applied today's: its checksum is accepted too.
SUPERSEDED: dict[int, frozenset[str]] = {
    2: frozenset({"44fefba189bc1cdb37de639126f5df1753a30b3f262733fe0b0f9035555b1d8c"}),
}


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def statements(self) -> list[tuple[int, str]]:
        """(line number, statement) pairs, in order."""
        out = []
        for piece in pglast.split(self.text, with_parser=True, only_slices=True):
            out.append((self.text.count("\n", 0, piece.start) + 1, self.text[piece]))
        return out


def sql_dir() -> Path:
    """The migrations: shipped inside the wheel as pgqr/sql, or the repository's top-level sql/."""
    packaged = resources.files("pgqr") / "sql"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "sql"


def load(directory: Path | None = None) -> list[Migration]:
    """Read and parse every migration; raise MigrationError as `file:line:column: message` on bad SQL."""
    directory = directory or sql_dir()
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path}: migration file names look like 0001_name.sql")
        text = path.read_text()
        check_syntax(path, text)
        migrations.append(Migration(int(match.group(1)), path.name, text))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{directory}: two migration files share a version number")
    return migrations


def check_syntax(path: Path, text: str) -> None:
    try:
        pglast.parse_sql(text)
    except pglast.parser.ParseError as exc:
        message, offset = exc.args[0], exc.args[1]
        line = text.count("\n", 0, offset) + 1
        column = offset - (text.rfind("\n", 0, offset) + 1) + 1
        raise MigrationError(f"{path}:{line}:{column}: {message}") from None


@dataclass
class Plan:
    applied: dict[int, str]  # version -> checksum
    pending: list[Migration]


def _applied(conn: psycopg.Connection[tuple[object, ...]]) -> dict[int, str]:
    exists = conn.execute("SELECT to_regclass('pgqr.migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute("SELECT version, checksum FROM pgqr.migrations").fetchall()
    return {int(str(v)): str(c) for v, c in rows}


def plan(conn: psycopg.Connection[tuple[object, ...]], migrations: list[Migration]) -> Plan:
    applied = _applied(conn)
    known = max((m.version for m in migrations), default=0)
    newest = max(applied, default=0)
    if newest > known:
        raise MigrationError(
            f"the database's pgqr schema is at version {newest}, newer than this pgqr (knows up to "
            f"{known}): upgrade pgqr"
        )
    return Plan(applied, [m for m in migrations if m.version not in applied])


BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS pgqr;
CREATE TABLE IF NOT EXISTS pgqr.migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


def _apply(conn: psycopg.Connection[tuple[object, ...]], migration: Migration) -> None:
    with conn.transaction():
        for line, statement in migration.statements():
            try:
                conn.execute(statement.encode())
            except psycopg.Error as exc:
                message = (exc.diag.message_primary or str(exc)).splitlines()[0]
                raise MigrationError(f"{migration.name}:{line}: {message}") from None
        conn.execute(
            "INSERT INTO pgqr.migrations (version, name, checksum) VALUES (%s, %s, %s)",
            (migration.version, migration.name, migration.checksum),
        )


def migrate(dsn: str, migrations: list[Migration] | None = None, *, dry_run: bool = False,
            binding: Settings | None = None) -> list[str]:
    """Apply pending migrations, bind the app's table and (re)schedule pgqr's jobs. Returns what was (or would
    be) done. The migrations, the error classes and the binding commit in one transaction under the advisory
    lock: a refused binding or a failing file leaves this database exactly as it was, concurrent runs wait for
    each other, and nothing depends on a session (a transaction pooler is fine)."""
    migrations = load() if migrations is None else migrations
    with connect(dsn) as conn:
        setup = cron_setup(conn)
        if dry_run:
            pending = plan(conn, migrations).pending
            out = [f"-- {m.name}\n{m.text}" for m in pending]
            out.append(f"-- then in database {setup.cron_database}: cron.schedule_in_database() for each row of "
                       f"pgqr.jobs, to run in {setup.app_database}")
            return out
        plan(conn, migrations)  # refuses a newer database before anything is created
        if not setup.same_database:
            ensure_extension(dsn, setup)  # in pg_cron's own database; this one is not touched
        done = []
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            if setup.same_database:  # here, the extension is part of what a refusal leaves undone
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
            conn.execute(BOOTSTRAP.encode())
            for migration in plan(conn, migrations).pending:  # read again: another migrate may have run meanwhile
                _apply(conn, migration)
                done.append(f"applied {migration.name}")
            sync_error_classes(conn)
            done += bind(conn, binding or Settings(database_url=Secret(dsn)), only_if_unbound=True)
        schedule_jobs(dsn, setup, wanted_jobs(conn))
        return done


def sync_error_classes(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Copy the one table of error classes (pgqr/evolution/errors.py) into pgqr.error_classes."""
    rows = [(name, i.transient, i.backoff_base, i.backoff_max, i.meaning) for name, i in ERROR_CLASSES.items()]
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        conn.execute("DELETE FROM pgqr.error_classes")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO pgqr.error_classes VALUES (%s, %s, make_interval(secs => %s), "
                            "make_interval(secs => %s), %s)", rows)


# the optional columns of the seed's layout: an adopted table that lacks one simply does not bind it
SEED_OPTIONAL = ("token_column", "url_column", "qr_column", "qr_at_column", "pairing_column")


def stored_binding(conn: psycopg.Connection[tuple[object, ...]]) -> dict[str, Any] | None:
    """The binding as pgqr.binding holds it (column name -> value), or None before the first bind."""
    row = conn.execute("SELECT to_jsonb(b) FROM pgqr.binding b").fetchone()
    return cast(dict[str, Any], row[0]) if row else None


def _binding_args(conn: psycopg.Connection[tuple[object, ...]], settings: Settings,
                  stored: dict[str, Any] | None) -> dict[str, Any]:
    """What to bind: the stored binding with only the settings given changed; the settings and their defaults
    when nothing is bound yet or another table is named."""
    args = {attr: getattr(settings, attr) for attr in BINDING_ATTRS}
    args["waiting_values"] = list(settings.waiting_values)
    if stored and "table" in settings.explicit:
        row = conn.execute("SELECT pgqr.qualified(to_regclass(%s))", (settings.table,)).fetchone()
        if not row or row[0] != stored["table_name"]:
            stored = None  # another table: the stored columns are not its columns
    if stored:
        given = settings.explicit & set(BINDING_ATTRS)
        args.update({attr: stored["table_name" if attr == "table" else attr]
                     for attr in BINDING_ATTRS if attr not in given})
        return args
    for attr in SEED_OPTIONAL:
        if attr not in settings.explicit and args[attr] is not None:
            row = conn.execute("SELECT pgqr.column_type(to_regclass(%s), %s)", (settings.table, args[attr])).fetchone()
            if not row or row[0] is None:
                args[attr] = None
    return args


def bind(conn: psycopg.Connection[tuple[object, ...]], settings: Settings, *,
         only_if_unbound: bool = False) -> list[str]:
    """Bind pgqr to the app's table: start from the stored binding and change only the binding settings given
    (a first bind, or one naming another table, starts from the defaults, which are the seed's layout). With
    only_if_unbound (what migrate does), an existing binding stays unless binding settings were given."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        stored = stored_binding(conn)
        if stored and only_if_unbound and not settings.binding_given():
            conn.execute("SELECT pgqr.install_binding(b) FROM pgqr.binding b")  # the current generator's SQL
            return []
        created = False
        # only a first install makes the seed's table: a re-bind that does not name a table must not create one
        # (and quietly move pgqr's trigger onto it)
        if not stored and "table" not in settings.explicit and settings.table == "public.evolution_instances":
            row = conn.execute("SELECT pgqr.create_default_table()").fetchone()
            created = bool(row and row[0])
        args = _binding_args(conn, settings, stored)
        table = args.pop("table")
        named = ", ".join(f"{k} => %({k})s" for k in args)
        try:
            row = conn.execute(f"SELECT table_name, key_column FROM pgqr.bind(%(table)s, {named})",
                               {"table": table, **args}).fetchone()
        except psycopg.errors.InvalidParameterValue as exc:
            raise ConfigurationError((exc.diag.message_primary or str(exc)).replace("\n", "\n  ")) from None
        now = stored_binding(conn)
    assert row is not None
    lines = [f"created {table} (the default layout)"] if created else []
    return [*lines, f"bound {row[0]} (key {row[1]})", f"binding: {describe_binding(now)}"]


def verify(dsn: str, migrations: list[Migration] | None = None) -> list[str]:
    """Every problem that makes this database not match the code; empty when all is well."""
    migrations = load() if migrations is None else migrations
    problems: list[str] = []
    with connect(dsn) as conn:
        setup = cron_setup(conn)
        current = plan(conn, migrations)
        problems += [f"pending: {m.name}" for m in current.pending]
        for m in migrations:
            checksum = current.applied.get(m.version)
            if checksum is not None and checksum != m.checksum and checksum not in SUPERSEDED.get(m.version, ()):
                problems.append(f"changed since applied: {m.name}")
        for kind, name in expected_objects(migrations):
            if not _exists(conn, kind, name):
                problems.append(f"missing {kind}: {name}")
        if not current.pending:
            problems += missing_jobs(dsn, setup, wanted_jobs(conn))
    return problems


def expected_objects(migrations: list[Migration]) -> list[tuple[str, str]]:
    """(kind, qualified name) of every table, view, function and trigger the migrations create."""
    found: list[tuple[str, str]] = []
    for m in migrations:
        for raw in pglast.parse_sql(m.text):
            stmt = raw.stmt
            if isinstance(stmt, ast.CreateStmt):
                found.append(("table", _qualified(stmt.relation)))
            elif isinstance(stmt, ast.ViewStmt):
                found.append(("view", _qualified(stmt.view)))
            elif isinstance(stmt, ast.CreateFunctionStmt):
                found.append(("function", ".".join(n.sval for n in stmt.funcname or ())))
            elif isinstance(stmt, ast.CreateTrigStmt):
                found.append(("trigger", f"{_qualified(stmt.relation)}.{stmt.trigname}"))
    return found


def _qualified(range_var: ast.RangeVar | None) -> str:
    assert range_var is not None  # CREATE TABLE/VIEW/TRIGGER always name their relation
    return f"{range_var.schemaname or 'public'}.{range_var.relname}"


def _exists(conn: psycopg.Connection[tuple[object, ...]], kind: str, name: str) -> bool:
    if kind in ("table", "view"):
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    elif kind == "function":
        schema, func = name.split(".", 1)
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = %s AND p.proname = %s)",
            (schema, func),
        ).fetchone()
    else:
        table, trigger = name.rsplit(".", 1)
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND tgname = %s)",
            (table, trigger),
        ).fetchone()
    return bool(row and row[0])

