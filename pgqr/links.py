"""Signed links to the live QR page: `{PGQR_PUBLIC_URL}/instances/{key}?exp=...&sig=...`.

The signature is HMAC-SHA256 with PGQR_LINK_SECRET over the instance key and the expiry (Unix seconds), so a link
opens one instance's page until it expires. Links are signed with the current secret only; PGQR_LINK_SECRET_PREVIOUS
is accepted while a rotation is under way. Changing the secret (and unsetting the previous one) revokes every link.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Sequence
from urllib.parse import quote

from .settings import ConfigError

MAX_TTL_SECONDS = 30 * 86400
_DOMAIN = b"pgqr-link-v1"  # a signature over these bytes means nothing to any other use of the secret
_TTL = re.compile(r"^\s*(\d+)\s*(s|sec|secs|second|seconds|m|min|mins|minute|minutes|h|hr|hrs|hour|hours|d|day|days)"
                  r"?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """'15m', '90s', '2h', '1 day', or plain seconds -> seconds; ConfigError otherwise."""
    match = _TTL.match(text)
    seconds = int(match.group(1)) * _UNIT_SECONDS[(match.group(2) or "s")[0].lower()] if match else 0
    if not 0 < seconds <= MAX_TTL_SECONDS:
        raise ConfigError(f"--ttl must be a positive duration of at most 30 days, like '15m', '2h' or '1d'; "
                          f"got {text!r}")
    return seconds


def signature(secret: str, key: str, expires: int) -> str:
    """URL-safe base64 of HMAC-SHA256(secret, domain NUL key NUL expiry); a key is PostgreSQL text, so has no NUL."""
    message = b"\x00".join((_DOMAIN, key.encode(), str(expires).encode()))
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def page_path(key: str) -> str:
    return "/instances/" + quote(key, safe="")


def make_link(public_url: str, secret: str, key: str, ttl_seconds: int, *, now: float | None = None) -> str:
    expires = int(now if now is not None else time.time()) + ttl_seconds
    return f"{public_url.rstrip('/')}{page_path(key)}?exp={expires}&sig={signature(secret, key, expires)}"


def verify(secrets: Sequence[str], key: str, exp: str | None, sig: str | None, *, now: float | None = None) -> bool:
    """True when `sig` signs (key, exp) with one of `secrets` and exp is still ahead. Constant time per secret."""
    if not secrets or not exp or not sig or not exp.isdigit() or len(exp) > 12:
        return False
    if int(exp) <= (now if now is not None else time.time()):
        return False
    valid = False
    for secret in secrets:  # every secret is checked, so timing does not tell which one matched
        valid |= hmac.compare_digest(signature(secret, key, int(exp)).encode(), sig.encode())
    return valid
