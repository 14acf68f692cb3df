"""`pgqr doctor`'s checks at Evolution: the key, each waiting row's token and name (connectionState, no side
effect) and each waiting row's webhook, as pgqr's receiver will judge its posts."""

from __future__ import annotations

from . import hooks
from .evolution import EvolutionClient, EvolutionState, Failure, display_url
from .findings import Check
from .hooks import Target, names_text
from .settings import Settings, reveal


async def check_evolution(settings: Settings, rows: list[Target]) -> list[Check]:
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
        if isinstance(found, Failure):
            return f"cannot read it: {found.error_class}: {found.detail}"
        return hooks.judge(found, settings, t.name)

    verdicts = await hooks.each(readable, find)
    problems = [(t, verdict) for t, verdict in zip(readable, verdicts, strict=True) if verdict is not None]
    target = display_url(hooks.hook_url(settings))
    if problems:
        return Check("webhooks", False, f"{len(problems)} of {len(readable)} waiting instance(s) have no webhook "
                     f"that {target} accepts: " + _grouped(problems),
                     "run `pgqr webhooks register --all` (or set PGQR_GLOBAL_WEBHOOK=true when Evolution's global "
                     "webhook points at pgqr)")
    return Check("webhooks", True, f"{len(readable)} waiting instance(s) at {_places(readable)} send their "
                                   f"webhooks to {target} with the credentials it expects")
