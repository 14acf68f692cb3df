"""Every setting pgqr reads from the environment or a flag, declared once: name, environment variable, flag, type,
default, help. The commands' flags and the README's settings table come from this one list.

Secrets (API keys, webhook secrets, URLs that may carry a password) are `Secret` values: they print as `***`
in repr(), str() and f-strings; `reveal()` is the one way to the value, for the one place that sends it.
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .values import ConfigError as ConfigError
from .values import Secret as Secret
from .values import (
    boolean,
    column,
    dsn,
    link_secret,
    non_negative_float,
    port,
    positive_float,
    positive_int,
    public_url,
    secret,
    text,
    url,
    words,
)
from .values import check_url as check_url
from .values import reveal as reveal

# -- the declaration ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    attr: str
    env: str
    parse: Callable[[str, str], Any]
    default: Any
    help: str
    commands: tuple[str, ...]  # which commands take it as a flag ("*": every command with a database)
    flag: bool = True
    default_doc: str | None = None  # what an unset value means, when that is not a plain value


    @property
    def flag_name(self) -> str:
        return "--" + self.attr.replace("_", "-")

    def default_text(self) -> str:
        if self.default_doc is not None:
            return self.default_doc
        if self.default is None:
            return "required" if self.attr == "database_url" else "none"
        if isinstance(self.default, tuple):
            return ",".join(self.default)
        return str(self.default)


SERVICE = ("run", "refresh", "doctor", "demo", "webhooks", "bench")
BINDING = ("migrate", "bind")

OPTIONS: tuple[Option, ...] = (
    Option("database_url", "DATABASE_URL", dsn, None, "libpq URL or DSN of the application database", ("*",)),
    Option("database_wait_seconds", "PGQR_DATABASE_WAIT_SECONDS", non_negative_float, 60.0,
           "at start, how long `pgqr run` waits for a database that is down or starting, or whose role or database "
           "does not exist yet (saying so every 10 s); then it exits. Refused credentials exit at once", ("run",)),
    Option("listen_database_url", "PGQR_LISTEN_DATABASE_URL", dsn, None,
           "a direct or session-mode URL for LISTEN, when DATABASE_URL goes through a transaction pooler",
           ("run", "doctor"), default_doc="DATABASE_URL"),
    Option("evolution_api_url", "EVOLUTION_API_URL", url, None,
           "default Evolution base URL (a row's URL column wins)", SERVICE),
    Option("evolution_api_key", "EVOLUTION_API_KEY", secret, None,
           "Evolution's global key, used for rows without a token of their own", SERVICE, flag=False),
    Option("concurrency", "PGQR_CONCURRENCY", positive_int, 100, "Evolution calls in flight", SERVICE),
    Option("http_timeout", "PGQR_HTTP_TIMEOUT", positive_float, 15.0,
           "seconds per Evolution call (a connect on a closed instance can take 8 s and more)", SERVICE),
    Option("max_reply_bytes", "PGQR_MAX_REPLY_BYTES", positive_int, 1_048_576,
           "largest Evolution reply read", SERVICE, flag=False),
    Option("grace_seconds", "PGQR_GRACE_SECONDS", non_negative_float, 10.0,
           "on SIGTERM, time for in-flight calls before they are cancelled", ("run",)),
    Option("fallback_seconds", "PGQR_FALLBACK_SECONDS", positive_float, 90.0,
           "look for due instances at least this often, even without a NOTIFY", ("run",), flag=False),
    Option("probe_seconds", "PGQR_PROBE_SECONDS", positive_float, 30.0,
           "idle time before the listener proves its LISTEN with a self-NOTIFY", ("run",), flag=False),
    Option("heartbeat_seconds", "PGQR_HEARTBEAT_SECONDS", positive_float, 15.0,
           "how often a listener says it is alive", ("run",), flag=False),
    Option("flush_ms", "PGQR_FLUSH_MS", positive_float, 10.0,
           "results wait at most this long before they are written back", ("run",), flag=False),
    Option("http_host", "PGQR_HTTP_HOST", text, "127.0.0.1", "address for health, metrics and webhooks", ("run",)),
    Option("http_port", "PGQR_HTTP_PORT", port, None, "port for health, metrics and webhooks (off when unset)",
           ("run",)),
    Option("webhook_secret", "PGQR_WEBHOOK_SECRET", secret, None,
           "authenticates Evolution's webhooks (path or X-Pgqr-Token header; per-instance tokens derive from it)",
           ("run", "webhooks", "doctor"), flag=False),
    Option("webhook_jwt_key", "PGQR_WEBHOOK_JWT_KEY", secret, None,
           "when set, every webhook must carry Evolution's HS256 `Authorization: Bearer` JWT signed with it "
           "(`webhooks register` sets it as the webhook's jwt_key; the global webhook cannot send one)",
           ("run", "webhooks", "doctor"), flag=False),
    Option("public_url", "PGQR_PUBLIC_URL", public_url, None,
           "the sidecar's base URL as Evolution and people's browsers reach it: `webhooks register` points "
           "webhooks at <it>/webhooks/evolution, `pgqr link` starts its URLs with it", ("webhooks", "doctor", "link")),
    Option("global_webhook", "PGQR_GLOBAL_WEBHOOK", boolean, False,
           "Evolution's global webhook (WEBHOOK_GLOBAL_URL) points at pgqr: doctor does not look for "
           "per-instance webhooks", ("doctor",), flag=False),
    Option("alert_webhook_url", "PGQR_ALERT_WEBHOOK_URL", url, None,
           "where alert transitions are POSTed (JSON)", ("run",), flag=False),
    # the live QR page (pgqr link, /instances/{key} on the sidecar)
    Option("link_secret", "PGQR_LINK_SECRET", link_secret, None,
           "signs the live page's links; the page is off while unset; changing it revokes every link",
           ("run", "link"), flag=False),
    Option("link_secret_previous", "PGQR_LINK_SECRET_PREVIOUS", link_secret, None,
           "the link secret before a rotation: its links keep working until this is unset", ("run",), flag=False),
    # the binding: which table and columns are the app's instances (pgqr migrate / pgqr bind)
    Option("table", "PGQR_TABLE", text, "public.evolution_instances", "the app's instances table", BINDING),
    Option("key_column", "PGQR_KEY_COLUMN", column, None, "a unique NOT NULL key column", BINDING,
           default_doc="the single-column primary key"),
    Option("name_column", "PGQR_NAME_COLUMN", text, "instance_name", "the Evolution instance name", BINDING),
    Option("status_column", "PGQR_STATUS_COLUMN", column, "instance_status",
           "the app's status column; none: the table has none, and Evolution's state decides which rows wait",
           BINDING),
    Option("waiting_values", "PGQR_WAITING_VALUES", words, ("connecting",),
           "status values that mean \"needs a QR\" (comma-separated)", BINDING),
    Option("connected_value", "PGQR_CONNECTED_VALUE", text, "connected",
           "status pgqr writes once the instance is connected", BINDING),
    Option("gave_up_value", "PGQR_GAVE_UP_VALUE", column, None,
           "status pgqr writes when Evolution gives up (QR limit, logout, delete); none: keep waiting", BINDING),
    Option("disconnected_value", "PGQR_DISCONNECTED_VALUE", column, None,
           "status pgqr writes when a connected instance drops (logout, closed, deleted in Evolution); "
           "none: never written", BINDING),
    Option("token_column", "PGQR_TOKEN_COLUMN", column, "instance_token", "the instance's own Evolution token",
           BINDING),
    Option("url_column", "PGQR_URL_COLUMN", column, "evolution_url", "the instance's Evolution base URL", BINDING),
    Option("qr_column", "PGQR_QR_COLUMN", column, "qr_code", "where the QR data URL is written", BINDING),
    Option("qr_at_column", "PGQR_QR_AT_COLUMN", column, "last_qr_update", "when the QR was written", BINDING),
    Option("qr_expires_column", "PGQR_QR_EXPIRES_COLUMN", column, None,
           "the QR's estimated expiry, for a countdown", BINDING),
    Option("pairing_column", "PGQR_PAIRING_COLUMN", column, "pairing_code", "the phone pairing code", BINDING),
    Option("phone_column", "PGQR_PHONE_COLUMN", column, None,
           "a phone number: pgqr asks Evolution for a pairing code for it", BINDING),
)

BINDING_ATTRS = tuple(o.attr for o in OPTIONS if o.commands == BINDING)


@dataclass(frozen=True)
class Settings:
    """The resolved settings of one command. `explicit` names the ones the user gave (flag or environment)."""

    database_url: Secret
    database_wait_seconds: float = 60.0
    listen_database_url: Secret | None = None
    evolution_api_url: Secret | None = None
    evolution_api_key: Secret | None = None
    concurrency: int = 100
    http_timeout: float = 15.0
    max_reply_bytes: int = 1_048_576
    grace_seconds: float = 10.0
    fallback_seconds: float = 90.0
    probe_seconds: float = 30.0
    heartbeat_seconds: float = 15.0
    flush_ms: float = 10.0
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    webhook_secret: Secret | None = None
    webhook_jwt_key: Secret | None = None
    public_url: str | None = None
    global_webhook: bool = False
    alert_webhook_url: Secret | None = None
    link_secret: Secret | None = None
    link_secret_previous: Secret | None = None
    table: str = "public.evolution_instances"
    key_column: str | None = None
    name_column: str = "instance_name"
    status_column: str | None = "instance_status"
    waiting_values: tuple[str, ...] = ("connecting",)
    connected_value: str = "connected"
    gave_up_value: str | None = None
    disconnected_value: str | None = None
    token_column: str | None = "instance_token"
    url_column: str | None = "evolution_url"
    qr_column: str | None = "qr_code"
    qr_at_column: str | None = "last_qr_update"
    qr_expires_column: str | None = None
    pairing_column: str | None = "pairing_code"
    phone_column: str | None = None
    explicit: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def dsn(self) -> str:
        return self.database_url.reveal()

    @property
    def listen_dsn(self) -> str:
        return (self.listen_database_url or self.database_url).reveal()

    @property
    def default_evolution_url(self) -> str | None:
        return reveal(self.evolution_api_url)

    def evolution_for(self, url: str | None, token: str | None) -> tuple[str | None, str | None]:
        """Where and with which key pgqr calls one instance: the row's own Evolution URL and token, else
        EVOLUTION_API_URL and EVOLUTION_API_KEY. The one place this rule lives: the engine, the sweep, webhook
        registration, doctor and the webhook receiver all ask here."""
        return url or self.default_evolution_url, token or reveal(self.evolution_api_key)

    def binding_given(self) -> bool:
        return any(attr in self.explicit for attr in BINDING_ATTRS)


def _check_declaration() -> None:
    names = {f.name for f in fields(Settings)} - {"explicit"}
    declared = {o.attr for o in OPTIONS}
    assert names == declared, f"Settings and OPTIONS differ: {names ^ declared}"
    for o in OPTIONS:
        default = next(f.default for f in fields(Settings) if f.name == o.attr)
        assert o.attr == "database_url" or default == o.default, f"default of {o.attr} differs"


_check_declaration()


def options_for(command: str) -> list[Option]:
    return [o for o in OPTIONS if o.flag and ("*" in o.commands or command in o.commands)]


class Parser(argparse.ArgumentParser):
    """A command line parser whose usage errors are one line and exit status 2, and that takes no abbreviated
    flag (a typo in a flag must never pass for another flag)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")

    def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """parse_args(), but an unknown flag is named by the (sub)command that was given it, with the flag meant."""
        args, extra = self.parse_known_args(argv)
        if extra:
            parser: Parser = getattr(args, "parser", self)
            parser.refuse_unknown(extra)
        return args

    def refuse_unknown(self, extra: list[str]) -> NoReturn:
        """The usage error for arguments this parser does not take, naming the flag meant where it can."""
        flag = next((x.split("=", 1)[0] for x in extra if x.startswith("-")), None)
        if flag is None:
            self.error(f"unexpected argument {extra[0]!r}")
        flags = [f for action in self._actions for f in action.option_strings]
        meant = [f for f in flags if f.startswith(flag)] or difflib.get_close_matches(flag, flags, n=1)
        self.error(f"unknown flag {flag}" + (f"; did you mean {' or '.join(meant)}?" if meant else ""))


def add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """The flags of `command`, from the declaration; each help names its variable and its default once."""
    for o in options_for(command):
        default = "" if o.default is None and o.default_doc is None else f" or {o.default_text()}"
        parser.add_argument(o.flag_name, dest=o.attr, default=None, metavar=o.attr.upper().split("_")[-1],
                            help=f"{o.help} (default: ${o.env}{default})")


def load(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None,
         require_database: bool = True) -> Settings:
    """Settings from flags (non-None attributes of args) over the environment over the defaults."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    explicit: set[str] = set()
    for o in OPTIONS:
        flag = getattr(args, o.attr, None) if args is not None else None
        if flag is not None:
            values[o.attr] = o.parse(o.flag_name, str(flag))
        elif environ.get(o.env) not in (None, ""):
            values[o.attr] = o.parse(o.env, environ[o.env])
        else:
            continue
        explicit.add(o.attr)
    if "database_url" not in values:
        if require_database:
            raise ConfigError("DATABASE_URL is not set (e.g. postgresql://postgres@localhost:5432/app)")
        values["database_url"] = Secret("")
    return Settings(**values, explicit=frozenset(explicit))


def rejected_dsn(exc: psycopg.Error, name: str = "DATABASE_URL") -> ConfigError | None:
    """The one-line configuration error when libpq refused a URL's options before any network I/O (a bad
    sslmode, port or timeout value), or None for a real connection failure worth retrying."""
    message = first_line(exc)
    if isinstance(exc, psycopg.OperationalError) and message.startswith("connection is bad: "):
        return ConfigError(f"{name} is not usable: {message.removeprefix('connection is bad: ')}")
    if isinstance(exc, psycopg.ProgrammingError) and ("bad value for" in message or "invalid URI" in message):
        return ConfigError(f"{name} is not usable: {message}")
    return None


# What a server says when it answered and refused who we are or what we asked for (libpq's FATAL line, or
# libpq's own word when the server asked for a password and none was given). Waiting cannot heal the lasting
# ones; a role or a database that does not exist may still be being created.
_LASTING_REFUSALS = ("password authentication failed", "no pg_hba.conf entry", "not permitted to log in",
                     "permission denied for database", "no password supplied")
_REFUSALS = ("does not exist", *_LASTING_REFUSALS)


class DatabaseRefusal(ConfigError):
    """The server refused the role, the password or the database. `lasting`: no retry can change that."""

    def __init__(self, message: str, lasting: bool) -> None:
        super().__init__(message)
        self.lasting = lasting


def database_refusal(exc: BaseException, database_url: str) -> DatabaseRefusal | None:
    """The one-line configuration error when the server refused the role, the password or the database
    (naming host, port, database and user from the URL, never the password), or None for anything else."""
    if not isinstance(exc, psycopg.OperationalError):
        return None
    message = " ".join(str(exc).split())
    reason = message.split("FATAL:", 1)[1].strip() if "FATAL:" in message else ""
    if not reason and "no password supplied" in message:
        reason = "no password supplied"  # libpq's own: the server asked for one
    if not any(r in reason for r in _REFUSALS):
        return None
    return DatabaseRefusal(f"the database refused the connection: {reason} ({database_target(database_url)})",
                           lasting=any(r in reason for r in _LASTING_REFUSALS))


def database_target(database_url: str) -> str:
    """host, port, database and user a URL points at (libpq's defaults where it names none)."""
    try:
        info = conninfo_to_dict(database_url)
    except psycopg.ProgrammingError:
        info = {}
    user = info.get("user") or os.environ.get("PGUSER") or "(your login name)"
    host = info.get("host") or os.environ.get("PGHOST") or "localhost"
    port = info.get("port") or os.environ.get("PGPORT") or "5432"
    database = info.get("dbname") or os.environ.get("PGDATABASE") or user
    return f"host {host} port {port}, database {database}, user {user}"


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (psycopg's name host and port, never a password)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def describe(exc: BaseException) -> str:
    """`Type: first line`, for logs."""
    return f"{type(exc).__name__}: {first_line(exc)}"


def markdown_table(options: Iterable[Option] = OPTIONS) -> str:
    """The README's settings table."""
    rows = ["| setting | flag | default | meaning |", "|---|---|---|---|"]
    for o in options:
        flag = f"`{o.flag_name}`" if o.flag else ""
        rows.append(f"| `{o.env}` | {flag} | {o.default_text()} | {o.help} |")
    return "\n".join(rows)
