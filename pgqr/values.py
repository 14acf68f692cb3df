"""How a setting's raw text becomes a value: the parsers the declaration (settings.py) names, each refusing bad
input with one line (ConfigError), and Secret, which never prints its value."""

from __future__ import annotations

import math

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .evolution import is_http_url


class ConfigError(ValueError):
    """Bad or missing configuration; str() is the one line shown to the user (exit status 2)."""


class Secret:
    """A value that must never reach a log, an error or a page by accident."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def reveal(value: Secret | None) -> str | None:
    return None if value is None else value.reveal()


# -- parsers: (name shown in errors, raw text) -> value; ConfigError with one line otherwise ----------------


def _number(name: str, raw: str, kind: type[int] | type[float]) -> float:
    try:
        number: float = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a {'whole ' if kind is int else ''}number, got {raw!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be a finite number, got {raw!r}")
    return number


def positive_int(name: str, raw: str) -> int:
    number = int(_number(name, raw, int))
    if number <= 0:
        raise ConfigError(f"{name} must be greater than 0, got {raw}")
    return number


def positive_float(name: str, raw: str) -> float:
    number = _number(name, raw, float)
    if number <= 0:
        raise ConfigError(f"{name} must be greater than 0, got {raw}")
    return number


def non_negative_float(name: str, raw: str) -> float:
    number = _number(name, raw, float)
    if number < 0:
        raise ConfigError(f"{name} must not be negative, got {raw}")
    return number


def port(name: str, raw: str) -> int:
    number = int(_number(name, raw, int))
    if not 0 <= number <= 65535:
        raise ConfigError(f"{name} must be a TCP port (0-65535), got {raw}")
    return number


def text(name: str, raw: str) -> str:
    return raw


def secret(name: str, raw: str) -> Secret:
    return Secret(raw)


def dsn(name: str, raw: str) -> Secret:
    """A libpq URL or key=value DSN; the message never echoes it (it may hold a password)."""
    try:
        conninfo_to_dict(raw)
    except psycopg.ProgrammingError:
        raise ConfigError(f"{name} is not a valid libpq URL or DSN (postgresql://user@host/db)") from None
    return Secret(raw)


def check_url(raw: str, name: str) -> str:
    """An http(s) URL with a host and a valid port. The message never echoes it (it may hold credentials)."""
    if not is_http_url(raw):
        raise ConfigError(f"{name} must be an http(s) URL, like http://localhost:8080")
    return raw  # as given: for an alert endpoint a trailing slash can matter


def url(name: str, raw: str) -> Secret:
    return Secret(check_url(raw, name))


def public_url(name: str, raw: str) -> str:
    return check_url(raw, name).rstrip("/")


def link_secret(name: str, raw: str) -> Secret:
    """A key for signing links: long enough that guessing it is hopeless. The message never echoes it."""
    if len(raw) < 16:
        raise ConfigError(f"{name} must be at least 16 characters (e.g. openssl rand -hex 16)")
    return Secret(raw)
def boolean(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def words(name: str, raw: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in raw.split(",") if v.strip())
    if not values:
        raise ConfigError(f"{name} needs at least one value (comma-separated)")
    return values


def column(name: str, raw: str) -> str | None:
    """A column name; empty or 'none' means the table has no such column."""
    return None if raw.strip().lower() in ("", "none", "-") else raw.strip()
