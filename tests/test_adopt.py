"""Adopting the app's own instances table as it is: five layouts the way real apps differ, installed, refreshed and
uninstalled through the real command line, with the app writing as its own roles (RLS included) throughout.

After `pgqr uninstall` the table's schema is what it was before install (pg_dump) and its rows are too, except
what pgqr writes by design: the QR columns and the connected status of the row it refreshed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from conftest import Database, command_env, run_pgqr
from psycopg import sql
from psycopg.rows import dict_row
from service_fixtures import Env
from sim_fixtures import hanging_evolution, serve

from pgqr.simulator import Simulator

PG_DUMP = "/usr/lib/postgresql/15/bin/pg_dump"

# Supabase's roles and auth.uid(), as far as an app's policies see them.
SUPABASE = """
DO $$
BEGIN
    CREATE ROLE anon NOLOGIN;
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
DO $$
BEGIN
    CREATE ROLE authenticated NOLOGIN;
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
CREATE SCHEMA IF NOT EXISTS auth;
CREATE OR REPLACE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS
    $f$ SELECT nullif(current_setting('request.jwt.claim.sub', true), '')::uuid $f$;
GRANT USAGE ON SCHEMA auth TO anon, authenticated;
"""

APP_ROLE = """
DO $$
BEGIN
    CREATE ROLE app_rw NOLOGIN;
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
"""

UPDATED_AT = """
CREATE OR REPLACE FUNCTION public.touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS
    $f$ BEGIN NEW.updated_at := now(); RETURN NEW; END $f$;
"""


def rls_policies(table: str, owner: str = "user_id") -> str:
    return f"""
ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_select ON {table} FOR SELECT TO authenticated USING ({owner} = auth.uid());
CREATE POLICY own_insert ON {table} FOR INSERT TO authenticated WITH CHECK ({owner} = auth.uid());
CREATE POLICY own_update ON {table} FOR UPDATE TO authenticated USING ({owner} = auth.uid())
    WITH CHECK ({owner} = auth.uid());
CREATE POLICY own_delete ON {table} FOR DELETE TO authenticated USING ({owner} = auth.uid());
GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO authenticated;
"""


def md5(text: object) -> str:
    return hashlib.md5(str(text).encode()).hexdigest()


@dataclass(frozen=True)
class Layout:
    """One app's instances table: its DDL, the binding flags that adopt it, and how the app writes it."""

    id: str
    table: str                      # as given to --table and pg_dump -t
    qualified: str                  # as pgqr names it
    ddl: str
    flags: tuple[str, ...]
    key: str
    name: str
    status: str
    token: str
    waiting: str
    connected: str
    closed: str
    conflict: str                   # the upsert's ON CONFLICT target
    role: str                       # the role the app writes as
    url: str | None = None
    qr: tuple[str, ...] = ()        # columns pgqr writes with a new QR (the first holds the image)
    app_touched: tuple[str, ...] = ()  # columns the app's own triggers set on every update
    extra: dict[str, str] = field(default_factory=dict)  # other columns of an insert: column -> SQL literal
    upsert_key: bool = False        # the upsert names the key itself (no other unique column)

    @property
    def rls(self) -> bool:
        return self.role == "authenticated"


WORKSPACE = "'6f1c2c4e-0000-4000-8000-000000000001'"

LAYOUTS = [
    # Supabase: uuid key, names unique per workspace, a CHECK on status, RLS by user, the app's updated_at trigger
    Layout(
        id="supabase-whatsapp_instances", table="whatsapp_instances", qualified="public.whatsapp_instances",
        ddl=SUPABASE + UPDATED_AT + """
CREATE TABLE public.whatsapp_instances (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id       uuid NOT NULL DEFAULT auth.uid(),
    workspace_id  uuid NOT NULL,
    name          text NOT NULL,
    api_key       text,
    base_url      text,
    status        text NOT NULL DEFAULT 'close' CHECK (status IN ('connecting', 'open', 'close')),
    qr_code       text,
    qr_updated_at timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, name)
);
CREATE TRIGGER whatsapp_instances_updated_at BEFORE UPDATE ON public.whatsapp_instances
    FOR EACH ROW EXECUTE FUNCTION public.touch_updated_at();
""" + rls_policies("public.whatsapp_instances"),
        flags=("--table", "whatsapp_instances", "--name-column", "name", "--status-column", "status",
               "--connected-value", "open", "--token-column", "api_key", "--url-column", "base_url",
               "--qr-column", "qr_code", "--qr-at-column", "qr_updated_at"),
        key="id", name="name", status="status", token="api_key", url="base_url",
        waiting="connecting", connected="open", closed="close", qr=("qr_code", "qr_updated_at"),
        app_touched=("updated_at",), extra={"workspace_id": WORKSPACE}, conflict="(workspace_id, name)",
        role="authenticated"),
    # bigint identity key, names not unique at all, a varchar status with no CHECK, a timestamp without zone
    Layout(
        id="bigint-instances", table="instances", qualified="public.instances",
        ddl=APP_ROLE + """
CREATE TABLE public.instances (
    id           bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name         text NOT NULL,
    instance_key text,
    api_url      text,
    status       varchar(20) NOT NULL DEFAULT 'disconnected',
    qr           text,
    qr_at        timestamp
);
GRANT SELECT, INSERT, UPDATE, DELETE ON public.instances TO app_rw;
""",
        flags=("--table", "instances", "--name-column", "name", "--status-column", "status",
               "--connected-value", "open", "--token-column", "instance_key", "--url-column", "api_url",
               "--qr-column", "qr", "--qr-at-column", "qr_at"),
        key="id", name="name", status="status", token="instance_key", url="api_url",
        waiting="connecting", connected="open", closed="disconnected", qr=("qr", "qr_at"),
        conflict="(id)", upsert_key=True, role="app_rw"),
    # its own schema, an enum status, names unique per tenant, no URL and no QR column (pgqr keeps the QR)
    Layout(
        id="enum-app-schema", table="app.whatsapp_instances", qualified="app.whatsapp_instances",
        ddl=APP_ROLE + UPDATED_AT + """
CREATE SCHEMA app;
CREATE TYPE app.wa_status AS ENUM ('connecting', 'open', 'close', 'disconnected');
CREATE TABLE app.whatsapp_instances (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id  bigint NOT NULL,
    name       varchar(64) NOT NULL,
    api_key    text NOT NULL,
    status     app.wa_status NOT NULL DEFAULT 'disconnected',
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);
CREATE TRIGGER touch BEFORE UPDATE ON app.whatsapp_instances FOR EACH ROW EXECUTE FUNCTION public.touch_updated_at();
GRANT USAGE ON SCHEMA app TO app_rw;
GRANT SELECT, INSERT, UPDATE, DELETE ON app.whatsapp_instances TO app_rw;
""",
        flags=("--table", "app.whatsapp_instances", "--name-column", "name", "--status-column", "status",
               "--connected-value", "open", "--token-column", "api_key"),
        key="id", name="name", status="status", token="api_key",
        waiting="connecting", connected="open", closed="disconnected",
        app_touched=("updated_at",), extra={"tenant_id": "7"}, conflict="(tenant_id, name)", role="app_rw"),
    # Prisma: quoted camelCase names, a text id, unique names, RLS by user, a countdown column
    Layout(
        id="prisma-camelcase", table='"WhatsappInstance"', qualified='public."WhatsappInstance"',
        ddl=SUPABASE + """
CREATE TABLE public."WhatsappInstance" (
    id              text PRIMARY KEY DEFAULT md5(random()::text),
    "userId"        uuid NOT NULL DEFAULT auth.uid(),
    "instanceName"  text NOT NULL UNIQUE,
    "apiKey"        text,
    "baseUrl"       text,
    status          text NOT NULL DEFAULT 'disconnected'
                    CHECK (status IN ('connecting', 'open', 'close', 'disconnected')),
    "qrCode"        text,
    "qrUpdatedAt"   timestamp(3),
    "qrExpiresAt"   timestamp(3) with time zone,
    "createdAt"     timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP
);
""" + rls_policies('public."WhatsappInstance"', '"userId"'),
        flags=("--table", '"WhatsappInstance"', "--name-column", "instanceName", "--status-column", "status",
               "--connected-value", "open", "--token-column", "apiKey", "--url-column", "baseUrl",
               "--qr-column", "qrCode", "--qr-at-column", "qrUpdatedAt", "--qr-expires-column", "qrExpiresAt"),
        key="id", name="instanceName", status="status", token="apiKey", url="baseUrl",
        waiting="connecting", connected="open", closed="disconnected",
        qr=("qrCode", "qrUpdatedAt", "qrExpiresAt"), conflict='("instanceName")', role="authenticated"),
    # keyed by the instance name itself, several waiting values, a pairing-code column
    Layout(
        id="name-keyed-sessions", table="public.wa_sessions", qualified="public.wa_sessions",
        ddl=APP_ROLE + """
CREATE TABLE public.wa_sessions (
    session       text PRIMARY KEY,
    token         text,
    state         text NOT NULL DEFAULT 'close' CHECK (state IN ('connecting', 'qr', 'open', 'close')),
    qr_image      text,
    qr_refreshed  timestamptz,
    pairing       text
);
GRANT SELECT, INSERT, UPDATE, DELETE ON public.wa_sessions TO app_rw;
""",
        flags=("--table", "public.wa_sessions", "--name-column", "session", "--status-column", "state",
               "--waiting-values", "connecting,qr", "--connected-value", "open", "--token-column", "token",
               "--qr-column", "qr_image", "--qr-at-column", "qr_refreshed", "--pairing-column", "pairing"),
        key="session", name="session", status="state", token="token",
        waiting="qr", connected="open", closed="close", qr=("qr_image", "qr_refreshed", "pairing"),
        conflict="(session)", role="app_rw"),
]


class App:
    """The app, writing its table as its own role (under RLS as `authenticated` with a JWT subject)."""

    def __init__(self, db: Database, layout: Layout, sim: Simulator) -> None:
        self.db, self.layout, self.sim = db, layout, sim
        self.user = str(uuid.uuid4())
        self.warnings: list[str] = []

    def connect(self, user: str | None = None) -> psycopg.Connection[dict[str, Any]]:
        conn = psycopg.connect(self.db.dsn, autocommit=True, row_factory=dict_row)
        conn.add_notice_handler(lambda d: self.warnings.append(str(d.message_primary))
                                if d.severity_nonlocalized == "WARNING" else None)
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(self.layout.role)))
        if self.layout.rls:
            conn.execute("SELECT set_config('request.jwt.claim.sub', %s, false)", (user or self.user,))
        return conn

    def run(self, statement: sql.Composable, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        with self.connect() as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []

    @property
    def t(self) -> sql.Composable:
        return sql.SQL(self.layout.qualified)

    def values(self, name: str, status: str, url: str | None = None) -> dict[str, sql.Composable]:
        lay = self.layout
        cols: dict[str, sql.Composable] = {lay.name: sql.Literal(name), lay.status: sql.Literal(status),
                                           lay.token: sql.Literal("tok-" + name)}
        if lay.url:
            cols[lay.url] = sql.Literal(url or self.sim.base_url)
        cols.update({c: sql.SQL(v) for c, v in lay.extra.items()})
        return cols

    def insert(self, name: str, status: str, url: str | None = None) -> str:
        cols = self.values(name, status, url)
        rows = self.run(sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING {}::text AS key").format(
            self.t, sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join(cols.values()),
            sql.Identifier(self.layout.key)))
        return str(rows[0]["key"])

    def upsert(self, name: str, status: str) -> None:
        cols = self.values(name, status)
        if self.layout.upsert_key:
            cols[self.layout.key] = sql.Literal(zlib.crc32(name.encode()))
        self.run(sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT {} DO UPDATE SET {} = EXCLUDED.{}").format(
            self.t, sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join(cols.values()),
            sql.SQL(self.layout.conflict), sql.Identifier(self.layout.status), sql.Identifier(self.layout.status)))

    def update(self, name: str, column: str, value: str) -> int:
        with self.connect() as conn:
            return conn.execute(sql.SQL("UPDATE {} SET {} = %s WHERE {} = %s").format(
                self.t, sql.Identifier(column), sql.Identifier(self.layout.name)), (value, name)).rowcount

    def delete(self, name: str) -> int:
        with self.connect() as conn:
            return conn.execute(sql.SQL("DELETE FROM {} WHERE {} = %s").format(
                self.t, sql.Identifier(self.layout.name)), (name,)).rowcount

    def status_of(self, name: str) -> str | None:
        rows = self.run(sql.SQL("SELECT {}::text AS s FROM {} WHERE {} = %(n)s").format(
            sql.Identifier(self.layout.status), self.t, sql.Identifier(self.layout.name)), {"n": name})
        return str(rows[0]["s"]) if rows else None

    def writes(self, tag: str) -> None:
        """Insert, update, rename, upsert (new row, then the conflict path) and delete; every one succeeds."""
        lay = self.layout
        self.insert(f"{tag}-a", lay.waiting)
        assert self.update(f"{tag}-a", lay.status, lay.closed) == 1
        assert self.update(f"{tag}-a", lay.name, f"{tag}-renamed") == 1
        self.upsert(f"{tag}-b", lay.waiting)
        self.upsert(f"{tag}-b", lay.closed)
        assert self.delete(f"{tag}-renamed") == 1
        assert self.status_of(f"{tag}-b") == lay.closed and self.status_of(f"{tag}-renamed") is None
        if lay.rls:  # the policies are real: another user sees none of these rows
            with self.connect(str(uuid.uuid4())) as conn:
                assert conn.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(self.t)).fetchone() == {"n": 0}

    def rows(self) -> dict[str, dict[str, Any]]:
        """Every row as the table's owner sees it, by key."""
        rows = self.db.query(sql.SQL("SELECT {}::text AS key, to_jsonb(t) AS row FROM {} t").format(
            sql.Identifier(self.layout.key), self.t).as_string())
        return {str(r["key"]): dict(r["row"]) for r in rows}  # type: ignore[call-overload]


def schema_dump(db: Database, table: str) -> str:
    """pg_dump --schema-only of one table, less the random \\restrict key newer pg_dumps print."""
    server = db.server
    out = subprocess.run(
        [PG_DUMP, "--schema-only", "-t", table, "-h", server.host, "-p", str(server.port), "-U", server.user,
         db.name], capture_output=True, text=True, check=True).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


async def pgqr_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """The real command line, without blocking this event loop (where the simulator answers)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgqr", *args, env=command_env(**env), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def make_due(db: Database) -> None:
    db.query("UPDATE pgqr.schedule SET due_at = now(), recent_polls = '{}' WHERE due_at IS NOT NULL")


BY_ID = {lay.id: lay for lay in LAYOUTS}


def install(db: Database, lay: Layout, *flags: str) -> str:
    """`pgqr migrate` with the layout's binding flags (the table exists); pg_cron's jobs then paused, so no
    real tick races the test. Returns what migrate printed."""
    result = run_pgqr("migrate", *lay.flags, *flags, env={"DATABASE_URL": db.dsn})
    assert result.returncode == 0, result.stderr
    db.pause_cron()
    return result.stdout


def adopted(db: Database, layout_id: str, sim: Simulator) -> App:
    """The layout's table, created and bound."""
    lay = BY_ID[layout_id]
    db.query(lay.ddl)
    install(db, lay)
    return App(db, lay, sim)


@pytest.fixture(params=LAYOUTS, ids=[lay.id for lay in LAYOUTS])
def layout(request: pytest.FixtureRequest, db: Database) -> Layout:
    lay: Layout = request.param
    db.query(lay.ddl)
    return lay


@pytest.fixture
def app(db: Database, layout: Layout, simulator: Simulator) -> App:
    return App(db, layout, simulator)


async def test_an_adopted_table_is_refreshed_and_left_as_it_was(db: Database, layout: Layout, app: App,
                                                                simulator: Simulator) -> None:
    lay = layout
    shop = app.insert("shop", lay.waiting)
    done = app.insert("done", lay.connected)
    app.insert("idle", lay.closed)
    app.writes("before")
    schema_before, rows_before = schema_dump(db, lay.table), app.rows()
    simulator.add_instance("shop", "tok-shop")
    simulator.add_instance("done", "tok-done", state="open")
    urls = {"DATABASE_URL": db.dsn, "EVOLUTION_API_URL": simulator.base_url}

    installed = run_pgqr("migrate", *lay.flags, env={"DATABASE_URL": db.dsn})
    assert installed.returncode == 0, installed.stderr
    assert f"bound {lay.qualified} (key {lay.key})" in installed.stdout
    assert db.value("SELECT to_regclass('public.evolution_instances')") is None
    db.pause_cron()

    code, out, err = await pgqr_cli("refresh", "--once", "--json", env=urls)
    assert code == 0, out + err
    assert [(r["instance_name"], r["outcome"]) for r in json.loads(out)["results"]] == [("shop", "qr_stored")]
    stored = app.rows()[shop].get(lay.qr[0]) if lay.qr else db.value(
        "SELECT qr FROM pgqr.instance_state WHERE key = %s", (shop,))
    assert md5(stored) == simulator.current()["shop"]["md5"] and str(stored).startswith("data:image/png")
    assert simulator.stats("done").connect_calls == 0  # only waiting rows are polled

    simulator.scan("shop")
    make_due(db)
    code, out, err = await pgqr_cli("refresh", "--once", "--json", env=urls)
    assert code == 0, err
    assert json.loads(out)["connected"] == 1 and app.status_of("shop") == lay.connected
    assert simulator.stats("done").connect_calls == 0

    app.writes("after")
    assert db.value("SELECT count(*) FROM pgqr.trigger_errors") == 0 and app.warnings == []
    assert db.query("SELECT key, name FROM pgqr.instance_state ORDER BY key") == sorted(
        ({"key": k, "name": r[lay.name]} for k, r in app.rows().items()), key=lambda r: r["key"])

    removed = run_pgqr("uninstall", env={"DATABASE_URL": db.dsn})
    assert removed.returncode == 0, removed.stderr
    assert f"removed pgqr's trigger from {lay.qualified}" in removed.stdout
    app.writes("uninstalled")
    assert app.warnings == []

    assert schema_dump(db, lay.table) == schema_before
    rows_after = app.rows()
    for key, before in rows_before.items():
        after = dict(rows_after[key])
        if key == shop:  # what pgqr wrote, and what the app's own triggers did on that write
            assert after[lay.status] == lay.connected
            for col in (*lay.qr, lay.status, *lay.app_touched):
                before.pop(col, None), after.pop(col, None)
        assert after == before, f"row {key} changed"
    assert rows_after[done] == rows_before[done]


async def test_the_default_layout_is_created_and_the_seed_monitoring_queries_run(db: Database,
                                                                                 simulator: Simulator) -> None:
    assert db.value("SELECT to_regclass('public.evolution_instances')") is None
    result = run_pgqr("migrate", env={"DATABASE_URL": db.dsn})
    assert result.returncode == 0, result.stderr
    assert "created public.evolution_instances (the default layout)" in result.stdout
    token = simulator.add_instance("seed")
    db.query("INSERT INTO public.evolution_instances (instance_name, instance_token, instance_status) "
             "VALUES ('seed', %s, 'connecting'), ('other', 't', 'connected')", (token,))
    db.pause_cron()
    summary = await Env(db, simulator).reconcile()
    assert [r.outcome for r in summary.results] == ["qr_stored"]
    rows = db.query("SELECT instance_name, instance_status, last_qr_update FROM public.evolution_instances "
                    "WHERE instance_status = 'connecting'")
    assert [(r["instance_name"], r["instance_status"]) for r in rows] == [("seed", "connecting")]
    assert rows[0]["last_qr_update"] is not None
    assert db.value("SELECT count(*) FROM public.evolution_instances WHERE qr_code LIKE 'data:image/png%'") == 1


def test_migrate_bound_to_another_table_creates_no_evolution_instances(db: Database, simulator: Simulator) -> None:
    adopted(db, "bigint-instances", simulator)
    assert db.value("SELECT to_regclass('public.evolution_instances')") is None
    assert db.value("SELECT table_name FROM pgqr.binding") == "public.instances"
    # nor does a migrate that names a table that is not there
    other = run_pgqr("migrate", "--table", "nowhere", env={"DATABASE_URL": db.dsn})
    assert (other.returncode, other.stderr.strip()) == (2, "pgqr: cannot bind: table nowhere does not exist")
    assert db.value("SELECT to_regclass('public.evolution_instances')") is None


def test_a_view_given_as_the_table_is_one_clear_error_and_nothing_is_bound(db: Database) -> None:
    lay = BY_ID["bigint-instances"]
    db.query(lay.ddl + "CREATE VIEW public.instances_view AS SELECT * FROM public.instances;")
    flags = [f if f != "instances" else "instances_view" for f in lay.flags]
    result = run_pgqr("migrate", *flags, env={"DATABASE_URL": db.dsn})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pgqr: cannot bind: instances_view is a view, not a table: bind the table it reads from"]
    assert db.value("SELECT to_regnamespace('pgqr')") is None  # the refusal installed nothing
    assert db.value("SELECT count(*) FROM pg_trigger WHERE tgname = 'pgqr_instance_change'") == 0
    assert db.value("SELECT to_regclass('public.evolution_instances')") is None
    # positive control: the table it reads from binds
    assert "bound public.instances (key id)" in install(db, lay)


PROBLEM_TABLE = """
CREATE TABLE public.wa (
    id      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    ref     text,
    n       integer,
    name    text NOT NULL,
    status  text NOT NULL CHECK (status IN ('connecting', 'open', 'close')),
    created timestamptz
);
"""
GOOD = {"--table": "wa", "--name-column": "name", "--status-column": "status", "--connected-value": "open",
        "--token-column": "none"}
PROBLEMS = {
    "missing column": ({"--name-column": "nome"}, ["wa has no column nome (the name column)"]),
    "name not text": ({"--name-column": "n"}, ["column n (the name column) is integer, not text-like"]),
    "status not text": ({"--status-column": "created"},
                        ["column created (the status column) is timestamp with time zone, not text-like"]),
    "status value refused": ({"--connected-value": "connected"}, [
        "column status cannot hold 'connected': new row for relation wa violates check constraint "
        '"wa_status_check"']),
    "key not unique": ({"--key-column": "ref"}, ["column ref is not a unique, NOT NULL key of wa"]),
    "all at once": ({"--name-column": "nome", "--key-column": "ref", "--connected-value": "connected"}, [
        "wa has no column nome (the name column)", "column ref is not a unique, NOT NULL key of wa",
        "column status cannot hold 'connected': new row for relation wa violates check constraint "
        '"wa_status_check"']),
}


def flag_list(flags: dict[str, str]) -> list[str]:
    return [x for pair in flags.items() for x in pair]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_each_binding_problem_is_one_line_naming_it_and_nothing_changes(migrated: Database, problem: str) -> None:
    migrated.query(PROBLEM_TABLE)
    flags, lines = PROBLEMS[problem]
    env = {"DATABASE_URL": migrated.dsn}
    result = run_pgqr("bind", *flag_list({**GOOD, **flags}), env=env)
    assert result.returncode == 2, result.stderr
    got = [line.strip() for line in result.stderr.strip().removeprefix("pgqr: cannot bind: ").splitlines()]
    assert got == lines
    assert migrated.value("SELECT table_name FROM pgqr.binding") == "public.evolution_instances"
    # positive control: the same table with the right flags binds
    good = run_pgqr("bind", *flag_list(GOOD), env=env)
    assert good.returncode == 0 and "bound public.wa (key id)" in good.stdout, good.stderr


async def test_only_rows_in_a_waiting_status_are_polled(db: Database, simulator: Simulator) -> None:
    app = adopted(db, "name-keyed-sessions", simulator)
    for name, status in (("a-connecting", "connecting"), ("b-qr", "qr"), ("c-open", "open"), ("d-close", "close")):
        simulator.add_instance(name, "tok-" + name, state="open" if status == "open" else "close")
        app.insert(name, status)
    summary = await Env(db, simulator).reconcile()
    assert sorted(r.instance_name for r in summary.results) == ["a-connecting", "b-qr"]
    assert simulator.stats("c-open").connect_calls == 0 and simulator.stats("d-close").connect_calls == 0
    assert simulator.stats("a-connecting").connect_calls == 1 and simulator.stats("b-qr").connect_calls == 1


@pytest.mark.parametrize("moved", [True, False], ids=["app-moves-row", "control"])
async def test_a_row_the_app_moves_out_of_waiting_mid_call_never_gets_a_qr(db: Database, simulator: Simulator,
                                                                           moved: bool) -> None:
    app = adopted(db, "supabase-whatsapp_instances", simulator)
    entered, release = asyncio.Event(), asyncio.Event()
    async with serve(hanging_evolution(entered, release)) as url:
        key = app.insert("shop", "connecting", url=url)
        run = asyncio.create_task(Env(db, simulator).reconcile())
        await asyncio.wait_for(entered.wait(), 10)
        if moved:  # the user gives up while pgqr's call is in flight
            assert app.update("shop", "status", "close") == 1
        release.set()
        await run
    row = app.rows()[key]
    if moved:
        assert (row["status"], row["qr_code"], row["qr_updated_at"]) == ("close", None, None)
        assert db.value("SELECT bool_or(written) FROM pgqr.refresh_log WHERE instance_key = %s", (key,)) is False
    else:
        assert (row["status"], row["qr_code"]) == ("connecting", "data:image/png;base64,LATE")
    assert app.warnings == []


async def test_rows_sharing_a_name_on_different_servers_each_get_their_own_qr(db: Database,
                                                                              simulator: Simulator) -> None:
    app = adopted(db, "bigint-instances", simulator)
    second = Simulator(simulator.config)
    await second.start("127.0.0.1", 0)
    try:
        simulator.add_instance("shop", "tok-shop", state="connecting")
        second.add_instance("shop", "tok-shop", state="connecting")
        # each QR out now (not first_qr_delay later, when the one below could turn out to match again)
        for server in (simulator, second):
            server.rotate("shop")
        # both servers draw from one pool of images: make theirs differ, so a row given the other's shows
        while second.current()["shop"]["md5"] == simulator.current()["shop"]["md5"]:
            second.rotate("shop")
        first_key = app.insert("shop", "connecting")
        second_key = app.db.value("INSERT INTO public.instances (name, instance_key, api_url, status) "
                                  "VALUES ('shop', 'tok-shop', %s, 'connecting') RETURNING id::text",
                                  (second.base_url,))
        summary = await Env(db, simulator).reconcile()
        assert [r.outcome for r in summary.results] == ["qr_stored", "qr_stored"]
        rows = app.rows()
        assert md5(rows[first_key]["qr"]) == simulator.current()["shop"]["md5"]
        assert md5(rows[str(second_key)]["qr"]) == second.current()["shop"]["md5"]
        assert rows[first_key]["qr"] != rows[str(second_key)]["qr"]
        assert simulator.stats("shop").connect_calls == 1 and second.stats("shop").connect_calls == 1
    finally:
        await second.stop()


async def test_doctor_reports_rows_sharing_a_name_and_server_and_shows_the_binding(db: Database,
                                                                                   simulator: Simulator) -> None:
    app = adopted(db, "bigint-instances", simulator)
    app.insert("shop", "close")
    app.insert("shop", "close", url="http://127.0.0.1:9/")  # same name, another server: fine
    env = {"DATABASE_URL": db.dsn, "EVOLUTION_API_URL": simulator.base_url}
    code, out, _ = await pgqr_cli("doctor", env=env)
    lines = out.splitlines()
    assert "PASS  names: no two rows share an instance name on one Evolution server" in lines
    assert ("PASS  binding: public.instances: key id, name name, status status (waiting connecting; connected "
            "open; gave up -), token instance_key, url api_url, qr qr, qr at qr_at") in lines
    app.insert("shop", "close")
    app.insert("cafe", "close", url=simulator.base_url + "/")
    app.insert("cafe", "close")
    code, out, _ = await pgqr_cli("doctor", env=env)
    assert code == 1
    assert ("FAIL  names: rows share an instance name on one Evolution server: cafe (2 rows), shop (2 rows) -> "
            "fix: give each row its own instance name, or its own server in the URL column") in out.splitlines()


async def test_doctor_fails_when_row_level_security_hides_rows_from_pgqrs_role(db: Database,
                                                                              simulator: Simulator) -> None:
    adopted(db, "bigint-instances", simulator)
    db.query("DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgqr_worker') THEN "
             "CREATE ROLE pgqr_worker LOGIN; END IF; END $$")
    db.query("GRANT USAGE ON SCHEMA pgqr TO pgqr_worker; GRANT SELECT ON ALL TABLES IN SCHEMA pgqr TO pgqr_worker;"
             "GRANT SELECT ON public.instances TO pgqr_worker; GRANT pg_read_all_settings TO pgqr_worker")
    worker = {"DATABASE_URL": db.dsn.replace("user=postgres", "user=pgqr_worker"),
              "EVOLUTION_API_URL": simulator.base_url}
    # positive control: no row-level security, the binding passes for this role
    _, out, err = await pgqr_cli("doctor", env=worker)
    assert any(line.startswith("PASS  binding:") for line in out.splitlines()), out + err
    db.query("ALTER TABLE public.instances ENABLE ROW LEVEL SECURITY")
    _, out, _ = await pgqr_cli("doctor", env=worker)
    assert ("FAIL  binding: public.instances has row-level security and role pgqr_worker is subject to it: pgqr "
            "sees only the rows its policies allow -> fix: connect as the table's owner, a superuser or a "
            "BYPASSRLS role (Supabase: postgres)") in out.splitlines(), out
    # the owner (here a superuser) is not subject to it
    _, out, _ = await pgqr_cli("doctor", env={**worker, "DATABASE_URL": db.dsn})
    assert any(line.startswith("PASS  binding:") for line in out.splitlines()), out


def test_status_shows_the_binding(db: Database, simulator: Simulator) -> None:
    adopted(db, "enum-app-schema", simulator)
    result = run_pgqr("status", env={"DATABASE_URL": db.dsn})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "binding: app.whatsapp_instances: key id, name name, status status (waiting connecting; connected open; "
        "gave up -), token api_key")


def test_a_name_of_8000_characters_inserted_by_the_app_is_tracked_and_ticks_go_on(db: Database,
                                                                                  simulator: Simulator) -> None:
    app = adopted(db, "bigint-instances", simulator)
    long_name = db.value("SELECT string_agg(md5(i::text), '') FROM generate_series(1, 250) i")
    assert isinstance(long_name, str) and len(long_name) == 8000
    key = app.insert(long_name, "connecting")
    normal = app.insert("shop", "connecting")
    assert app.warnings == [] and db.value("SELECT count(*) FROM pgqr.trigger_errors") == 0
    assert db.value("SELECT tick > 0 FROM pgqr.tick() AS tick") is True
    assert db.value("SELECT count(*) FROM pgqr.instance_state WHERE key IN (%s, %s) AND waiting",
                    (key, normal)) == 2
    assert db.value("SELECT count(*) FROM pgqr.find_instances(%s)", (long_name,)) == 1


async def test_rebinding_moves_the_trigger_and_keeps_the_refresh_log(db: Database, simulator: Simulator) -> None:
    assert "created public.evolution_instances" in run_pgqr("migrate", env={"DATABASE_URL": db.dsn}).stdout
    db.pause_cron()
    simulator.add_instance("old", "tok-old")
    db.query("INSERT INTO public.evolution_instances (instance_name, instance_token, instance_status) "
             "VALUES ('old', 'tok-old', 'connecting')")
    await Env(db, simulator).reconcile()
    logged = db.query("SELECT * FROM pgqr.refresh_log")
    assert len(logged) == 1
    default_dump = schema_dump(db, "public.evolution_instances")
    assert "pgqr_instance_change" in default_dump

    lay = BY_ID["supabase-whatsapp_instances"]
    db.query(lay.ddl)
    moved = run_pgqr("bind", *lay.flags, env={"DATABASE_URL": db.dsn})
    assert moved.returncode == 0 and "bound public.whatsapp_instances (key id)" in moved.stdout, moved.stderr
    assert "pgqr_instance_change" not in schema_dump(db, "public.evolution_instances")
    assert "pgqr_instance_change" in schema_dump(db, lay.table)
    db.query("INSERT INTO public.evolution_instances (instance_name, instance_status) VALUES ('ignored', 'connecting')")
    assert db.value("SELECT count(*) FROM pgqr.instance_state") == 0  # the old table's writes touch nothing
    app = App(db, lay, simulator)
    key = app.insert("new", "connecting")
    assert db.value("SELECT key FROM pgqr.instance_state WHERE waiting") == key
    assert db.query("SELECT * FROM pgqr.refresh_log WHERE id <= %s", (logged[-1]["id"],)) == logged


BINDING_COLUMNS = ("table_name, key_column, name_column, status_column, waiting_values, connected_value, "
                   "gave_up_value, token_column, url_column, qr_column, qr_at_column, qr_expires_column, "
                   "pairing_column, phone_column")


def test_bind_with_one_flag_changes_that_setting_of_the_stored_binding_only(db: Database,
                                                                           simulator: Simulator) -> None:
    adopted(db, "supabase-whatsapp_instances", simulator)
    before = db.query(f"SELECT {BINDING_COLUMNS} FROM pgqr.binding")[0]
    result = run_pgqr("bind", "--gave-up-value", "close", env={"DATABASE_URL": db.dsn})
    assert result.returncode == 0, result.stderr
    after = db.query(f"SELECT {BINDING_COLUMNS} FROM pgqr.binding")[0]
    assert after == {**before, "gave_up_value": "close"}
    assert before["gave_up_value"] != "close"
    # it prints the binding it made, and creates no table of the default layout
    assert result.stdout.splitlines()[-1].startswith("binding: public.whatsapp_instances: key id, ")
    assert "gave up close)" in result.stdout.splitlines()[-1]
    assert db.value("SELECT to_regclass('public.evolution_instances')") is None


def test_bind_with_an_abbreviated_flag_is_refused_and_changes_nothing(db: Database, simulator: Simulator) -> None:
    adopted(db, "supabase-whatsapp_instances", simulator)
    before = db.query(f"SELECT {BINDING_COLUMNS} FROM pgqr.binding")
    result = run_pgqr("bind", "--gave-up-val", "close", env={"DATABASE_URL": db.dsn})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "pgqr bind: unknown flag --gave-up-val; did you mean --gave-up-value? (see `pgqr bind --help`)"]
    assert db.query(f"SELECT {BINDING_COLUMNS} FROM pgqr.binding") == before


@pytest.mark.parametrize("breakage", ["refused-name", "state-table-dropped"])
def test_an_error_in_pgqr_bookkeeping_is_a_warning_never_a_failed_app_statement(db: Database, simulator: Simulator,
                                                                               breakage: str) -> None:
    app = adopted(db, "supabase-whatsapp_instances", simulator)
    control = app.insert("fine", "connecting")
    assert app.warnings == [] and db.value("SELECT count(*) FROM pgqr.trigger_errors") == 0
    if breakage == "refused-name":
        db.query("ALTER TABLE pgqr.instance_state ADD CONSTRAINT no_boom CHECK (name NOT LIKE 'boom%')")
    else:
        db.query("DROP TABLE pgqr.instance_state CASCADE")
    app.insert("boom", "connecting")
    assert app.update("boom", "status", "close") == 1
    assert app.update("boom", "name", "boom-2") == 1
    app.upsert("boom-2", "connecting")
    assert app.delete("boom-2") == 1
    assert len(app.warnings) >= 4 and all(w.startswith("pgqr: bookkeeping for a row of whatsapp_instances failed")
                                          for w in app.warnings)
    assert db.value("SELECT count(*) FROM pgqr.trigger_errors") == len(app.warnings)
    if breakage == "refused-name":  # the row that pgqr can keep is still kept
        app.warnings.clear()
        assert app.update("fine", "status", "close") == 1 and app.warnings == []
        assert db.value("SELECT waiting FROM pgqr.instance_state WHERE key = %s", (control,)) is False


async def test_uninstall_with_drop_data_leaves_the_table_as_it_was(db: Database, simulator: Simulator) -> None:
    lay = BY_ID["supabase-whatsapp_instances"]
    db.query(lay.ddl)
    app = App(db, lay, simulator)
    app.insert("shop", "close")
    before = schema_dump(db, lay.table), app.rows()
    install(db, lay)
    app.writes("installed")
    result = run_pgqr("uninstall", "--drop-data", env={"DATABASE_URL": db.dsn})
    assert result.returncode == 0, result.stderr
    assert db.value("SELECT to_regnamespace('pgqr')") is None
    app.writes("gone")
    assert app.warnings == []
    rows = app.rows()
    assert (schema_dump(db, lay.table), {k: rows[k] for k in before[1]}) == before
