"""Evolution's per-instance webhooks pointed at pgqr: `pgqr webhooks register`, and what `pgqr doctor` reads of them.

Each instance's webhook goes to PGQR_PUBLIC_URL + /webhooks/evolution with the header `X-Pgqr-Token: <the
instance's derived token>` (pgqr.tokens.derive), for QRCODE_UPDATED and CONNECTION_UPDATE, set with the
instance's own token (or EVOLUTION_API_KEY for a row without one). With PGQR_WEBHOOK_JWT_KEY the webhook also
gets `jwt_key`, so Evolution (2.3.0+) signs each post. Setting it again is harmless: the same body each time.
No token, key or secret is ever printed; a header's value cannot even be read back (only its name is kept).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg

from . import tokens
from .evolution import WEBHOOK_EVENTS, EvolutionClient, Failure, NoWebhook, WebhookConfig, display_url
from .settings import ConfigError, Settings, reveal

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
    default_url, default_key = reveal(settings.evolution_api_url), reveal(settings.evolution_api_key)
    return [Target(str(name), url or default_url, token or default_key, bool(token), bool(waiting))
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


def judge(found: WebhookConfig | NoWebhook, settings: Settings) -> str | None:
    """None when the instance's webhook reaches pgqr and authenticates; else what is wrong, in a few words."""
    if isinstance(found, NoWebhook):
        return "missing"
    target = hook_url(settings)
    secret = reveal(settings.webhook_secret) or ""
    if found.url.rstrip("/") == target:
        if tokens.HEADER.lower() not in {h.lower() for h in found.header_names}:
            return f"no {tokens.HEADER} header"
        if settings.webhook_jwt_key is not None and JWT_HEADER not in found.header_names:
            return "no jwt_key header (PGQR_WEBHOOK_JWT_KEY is set)"
    elif not (secret and tokens.same(found.url.rstrip("/"), f"{target}/{secret}")):  # the path form, by hand
        return "points elsewhere"
    if not found.enabled:
        return "disabled"
    if missing := [e for e in WEBHOOK_EVENTS if e not in found.events]:
        return f"misses {', '.join(missing)}"
    return None


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
    before = judge(found, settings) or "already pointed at pgqr"
    if dry_run:
        return Registered(target.name, True, f"would set (now: {before})")
    stored = await http.set_webhook(target.base_url, target.name, target.apikey, url=hook_url(settings),
                                    headers=hook_headers(settings, target.name))
    if isinstance(stored, Failure):
        return _failed(target, "webhook/set failed", stored)
    if (after := judge(stored, settings)) is not None:
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
