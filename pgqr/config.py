"""Settings from the environment, flags overriding; validated once. Secrets never appear in repr()."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import psycopg
from psycopg.conninfo import conninfo_to_dict
from yarl import URL


class ConfigError(ValueError):
    """Bad or missing configuration; str() is the one line shown to the user (exit status 2)."""


@dataclass(frozen=True)
class Settings:
    database_url: str = field(repr=False)
    # URLs can carry credentials (user:password@host, a token in the path), so they stay out of repr() too
    evolution_api_url: str | None = field(default=None, repr=False)
    evolution_api_key: str | None = field(default=None, repr=False)
    concurrency: int = 16
    http_timeout: float = 8.0
    max_reply_bytes: int = 1_048_576
    grace_seconds: float = 10.0
    # a little longer than the cron period, so a lost NOTIFY or a dead scheduler costs one period
    fallback_seconds: float = 90.0
    # how often the listener proves its LISTEN still works by notifying itself
    probe_seconds: float = 30.0
    heartbeat_seconds: float = 15.0
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    alert_webhook_url: str | None = field(default=None, repr=False)


# (flag attribute, environment variable, parser); flags win over the environment.
_SOURCES: dict[str, tuple[str, str]] = {
    "database_url": ("DATABASE_URL", "dsn"),
    "evolution_api_url": ("EVOLUTION_API_URL", "url"),
    "evolution_api_key": ("EVOLUTION_API_KEY", "str"),
    "concurrency": ("PGQR_CONCURRENCY", "posint"),
    "http_timeout": ("PGQR_HTTP_TIMEOUT", "posfloat"),
    "grace_seconds": ("PGQR_GRACE_SECONDS", "nonnegfloat"),
    "fallback_seconds": ("PGQR_FALLBACK_SECONDS", "posfloat"),
    "probe_seconds": ("PGQR_PROBE_SECONDS", "posfloat"),
    "heartbeat_seconds": ("PGQR_HEARTBEAT_SECONDS", "posfloat"),
    "http_host": ("PGQR_HTTP_HOST", "str"),
    "http_port": ("PGQR_HTTP_PORT", "port"),
    "webhook_secret": ("PGQR_WEBHOOK_SECRET", "str"),
    "alert_webhook_url": ("PGQR_ALERT_WEBHOOK_URL", "url"),
}


def _parse(kind: str, name: str, raw: str) -> object:
    if kind == "dsn":
        return check_dsn(raw, name)
    if kind == "url":
        return check_url(raw, name)
    if kind == "str":
        return raw
    try:
        number: float = float(raw) if kind.endswith("float") else int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be a finite number, got {raw!r}")
    if kind == "port" and not 0 <= number <= 65535:
        raise ConfigError(f"{name} must be a TCP port (0-65535), got {raw}")
    if kind.startswith("pos") and number <= 0:
        raise ConfigError(f"{name} must be greater than 0, got {raw}")
    if kind.startswith("nonneg") and number < 0:
        raise ConfigError(f"{name} must not be negative, got {raw}")
    return number


def check_url(raw: str, name: str) -> str:
    """An http(s) URL with a host and a valid port. The message never echoes it (it may hold credentials)."""
    try:
        url = URL(raw)
        valid = url.scheme in ("http", "https") and bool(url.host) and url.port is not None
    except (ValueError, TypeError):
        valid = False
    if not valid:
        raise ConfigError(f"{name} must be an http(s) URL, like http://localhost:8080")
    return raw  # as given: for an alert endpoint a trailing slash can matter


def check_dsn(raw: str, name: str = "DATABASE_URL") -> str:
    """Accept a libpq URL or key=value DSN; the message never echoes it (it may hold a password)."""
    try:
        conninfo_to_dict(raw)
    except psycopg.ProgrammingError:
        raise ConfigError(f"{name} is not a valid libpq URL or DSN (postgresql://user@host/db)") from None
    return raw


def rejected_dsn(exc: psycopg.Error) -> ConfigError | None:
    """The one-line configuration error when libpq refused DATABASE_URL's options before any network I/O
    (a bad sslmode, port or timeout value), or None for a real connection failure worth retrying."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, psycopg.OperationalError) and text.startswith("connection is bad: "):
        return ConfigError(f"DATABASE_URL is not usable: {text.removeprefix('connection is bad: ')}")
    if isinstance(exc, psycopg.ProgrammingError) and ("bad value for" in text or "invalid URI" in text):
        return ConfigError(f"DATABASE_URL is not usable: {text}")
    return None


def load(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from flags (non-None attributes of args) over the environment."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for attr, (env_name, kind) in _SOURCES.items():
        flag = getattr(args, attr, None) if args is not None else None
        if flag is not None:
            values[attr] = _parse(kind, "--" + attr.replace("_", "-"), str(flag))
        elif environ.get(env_name):
            values[attr] = _parse(kind, env_name, environ[env_name])
    if "database_url" not in values:
        raise ConfigError("DATABASE_URL is not set (e.g. postgresql://postgres@localhost:5432/app)")
    return Settings(**values)  # type: ignore[arg-type]
