"""Evolution's per-instance webhooks pointed at pgqr: `pgqr webhooks register`, and what `pgqr doctor` reads of them.

Each instance's webhook goes to PGQR_PUBLIC_URL + /webhooks/evolution with the header `X-Pgqr-Token: <the
instance's derived token>` (pgqr.tokens.derive), for QRCODE_UPDATED and CONNECTION_UPDATE, set with the
instance's own token (or EVOLUTION_API_KEY for a row without one). With PGQR_WEBHOOK_JWT_KEY the webhook also
gets `jwt_key`, so Evolution (2.3.0+) signs each post. A webhook that is already right is left alone.
`judge` reads a stored webhook the way pgqr's receiver will read its posts: the header values Evolution holds
are compared with what pgqr expects in constant time, and a finding names what the posts get (401, 404 or
nothing). No token, key or secret is ever printed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import psycopg

from . import tokens
from .evolution import WEBHOOK_EVENTS, EvolutionClient, Failure, NoWebhook, WebhookConfig, display_url
from .settings import ConfigError, Settings

CONCURRENCY = 10  # Evolution calls in flight for register and doctor
SHOWN = 10  # names listed in a message; the rest are counted
JWT_HEADER = "jwt_key"  # the webhook header Evolution turns into `Authorization: Bearer <JWT>` (2.3.0+)

_T = TypeVar("_T")


@dataclass(frozen=True)
class Target:
    """One app row as Evolution is called for it: the base URL and the key to send (never shown)."""

    name: str
    base_url: str | None = field(repr=False)
    apikey: str | None = field(repr=False)
    own_token: bool
    waiting: bool

    @property
    def where(self) -> str:
        return display_url(self.base_url) if self.base_url else "(no Evolution URL)"

    def problem(self) -> str | None:
        """Why this row cannot be called at all, or None."""
        if not self.base_url:
            return "no Evolution URL (set EVOLUTION_API_URL or the row's URL column)"
        if not self.apikey:
            return "no token of its own and EVOLUTION_API_KEY is not set"
        return None


def targets(conn: psycopg.Connection[Any], settings: Settings, names: Iterable[str] | None = None) -> list[Target]:
    """The app's rows (those named, or all), each with the URL and key pgqr would call Evolution with."""
    where, params = ("WHERE name = ANY(%s)", (list(names),)) if names is not None else ("", ())
    rows = conn.execute(f"SELECT name, token, url, waiting FROM pgqr.app_instances {where} ORDER BY name, key",
                        params).fetchall()
    return [Target(str(name), *settings.evolution_for(url, token), bool(token), bool(waiting))
            for name, token, url, waiting in rows]


def hook_url(settings: Settings) -> str:
    if not settings.public_url:
        raise ConfigError("PGQR_PUBLIC_URL is not set: the sidecar's base URL as Evolution reaches it, "
                          "like http://pgqr:8080")
    return settings.public_url + "/webhooks/evolution"


def _secret(settings: Settings) -> str:
    if settings.webhook_secret is None or not settings.webhook_secret.reveal():
        raise ConfigError("PGQR_WEBHOOK_SECRET is not set: the instances' webhook tokens derive from it")
    return settings.webhook_secret.reveal()


def hook_headers(settings: Settings, name: str) -> dict[str, str]:
    headers = {tokens.HEADER: tokens.derive(_secret(settings), name)}
    if settings.webhook_jwt_key is not None:
        headers[JWT_HEADER] = settings.webhook_jwt_key.reveal()
    return headers


NOTHING = "pgqr gets no posts"


def judge(found: WebhookConfig | NoWebhook, settings: Settings, name: str) -> str | None:
    """None when the instance's posts will be accepted by pgqr's receiver (pgqr.web); else what is wrong and
    what its posts get, in a few words. The receiver's own rules, read off the stored webhook."""
    if isinstance(found, NoWebhook):
        return f"missing ({NOTHING})"
    target = hook_url(settings)
    url = found.url.rstrip("/")
    rest = url[len(target):] if url.startswith(target) else None
    if rest is None or (rest and not rest.startswith("/")):
        if _origin(url) == _origin(target):
            return "points at pgqr but not at /webhooks/evolution (404)"
        return f"points elsewhere ({NOTHING})"
    if not found.enabled:
        return f"disabled ({NOTHING})"
    if missing := [e for e in WEBHOOK_EVENTS if e not in found.events]:
        return f"misses {', '.join(missing)} (pgqr never hears of those)"
    path = [unquote(part) for part in rest.split("/")[1:]]
    values = dict(found.header_values)
    header = next((h for h in found.header_names if h.lower() == tokens.HEADER.lower()), None)
    # Evolution appends the event to the path "by events"; no route of the receiver takes more segments
    if len(path) + found.by_events > (1 if header is not None else 2):
        return "extra path segments after /webhooks/evolution (404)"
    return _credentials(settings, name, path[0] if path else None,
                        None if header is None else values.get(header, ""), values, found.header_names)


def _credentials(settings: Settings, name: str, path_secret: str | None, token: str | None,
                 values: dict[str, str], header_names: tuple[str, ...]) -> str | None:
    """What of the credentials Evolution will send is wrong (the receiver answers 401 to each), or None."""
    secret = _secret(settings)
    wrong = []
    if token is None and path_secret is None:
        wrong.append(f"without {tokens.HEADER}")
    elif token is None and not tokens.same(path_secret or "", secret):
        wrong.append("wrong secret in the URL")
    elif token is not None and not (tokens.same(token, tokens.derive(secret, name)) or tokens.same(token, secret)):
        wrong.append(f"wrong {tokens.HEADER}")
    if settings.webhook_jwt_key is not None:
        if JWT_HEADER not in header_names:
            wrong.append(f"without {JWT_HEADER} (PGQR_WEBHOOK_JWT_KEY is set)")
        elif not tokens.same(values.get(JWT_HEADER, ""), settings.webhook_jwt_key.reveal()):
            wrong.append(f"wrong {JWT_HEADER}")
    return " and ".join(wrong) + " (401)" if wrong else None


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def names_text(names: list[str]) -> str:
    """The first SHOWN names, then how many more."""
    shown = ", ".join(names[:SHOWN])
    return shown + (f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else "")


async def each(items: list[Target], call: Callable[[Target], Awaitable[_T]]) -> list[_T]:
    """`call` for every item, results in order (the client bounds the concurrency)."""
    return list(await asyncio.gather(*(call(item) for item in items)))


def client(settings: Settings) -> EvolutionClient:
    return EvolutionClient(timeout=settings.http_timeout, max_reply_bytes=settings.max_reply_bytes,
                           concurrency=min(settings.concurrency, CONCURRENCY))


# ------------------------------------------------------------------------------------------- register


@dataclass(frozen=True)
class Registered:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{self.name}\t{'ok' if self.ok else 'FAILED'}\t{self.detail}"


def _failed(target: Target, what: str, failure: Failure) -> Registered:
    return Registered(target.name, False, f"{what} at {target.where}: {failure.error_class}: {failure.detail}")


async def _register_one(http: EvolutionClient, settings: Settings, target: Target, dry_run: bool) -> Registered:
    if (problem := target.problem()) is not None:
        return Registered(target.name, False, problem)
    assert target.base_url is not None and target.apikey is not None
    found = await http.find_webhook(target.base_url, target.name, target.apikey)
    if isinstance(found, Failure):
        return _failed(target, "cannot read its webhook", found)
    before = judge(found, settings, target.name)
    if before is None:
        return Registered(target.name, True, "unchanged")
    if dry_run:
        return Registered(target.name, True, f"would set (now: {before})")
    stored = await http.set_webhook(target.base_url, target.name, target.apikey, url=hook_url(settings),
                                    headers=hook_headers(settings, target.name))
    if isinstance(stored, Failure):
        return _failed(target, "webhook/set failed", stored)
    if (after := judge(stored, settings, target.name)) is not None:
        return Registered(target.name, False, f"Evolution stored a webhook that {after}")
    return Registered(target.name, True, f"set (was: {before})")


def register(settings: Settings, name: str | None, dry_run: bool) -> tuple[list[Registered], str]:
    """Point each named instance's (or every instance's) webhook at pgqr; returns the per-instance report and
    the URL they point at (shown without credentials)."""
    url = hook_url(settings)
    _secret(settings)
    with psycopg.connect(settings.dsn, autocommit=True, prepare_threshold=None) as conn:
        if conn.execute("SELECT to_regclass('pgqr.binding') IS NOT NULL").fetchone() != (True,):
            raise ConfigError("pgqr is not installed in this database: run `pgqr migrate` first")
        rows = targets(conn, settings, None if name is None else [name])

    async def run() -> list[Registered]:
        async with client(settings) as http:
            return await each(rows, lambda t: _register_one(http, settings, t, dry_run))

    return asyncio.run(run()), display_url(url)
