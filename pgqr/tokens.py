"""Webhook credentials: the per-instance token pgqr derives from its secret, and the checks the receiver runs.

Evolution signs nothing (evolution-api.md section 4), so a webhook proves itself with what pgqr gave out:
- the global secret (PGQR_WEBHOOK_SECRET), in the path (Evolution's global webhook sends no custom headers) or
  in the `X-Pgqr-Token` header;
- an instance's derived token in `X-Pgqr-Token` (what `pgqr webhooks register` sets): valid for that one name;
- optionally Evolution's `Authorization: Bearer` HS256 JWT (2.3.0+, signed with the webhook's `jwt_key`);
- and the body's `apikey` (the instance's Evolution token when Evolution exposes it) must not contradict the row.
Every comparison runs in constant time; no value here is ever logged.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Literal

import jwt

from .settings import Secret

HEADER = "X-Pgqr-Token"
_CONTEXT = "pgqr-webhook:"
JWT_LEEWAY_SECONDS = 30  # clock skew between Evolution's host and ours


def derive(secret: str, instance_name: str) -> str:
    """The instance's webhook token: HMAC-SHA256(secret, "pgqr-webhook:" + name), hex."""
    return hmac.new(secret.encode(), (_CONTEXT + instance_name).encode(), hashlib.sha256).hexdigest()


def same(given: str, expected: str) -> bool:
    """Constant-time equality of two strings (any characters)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


Scope = Literal["global", "instance"]


@dataclass(frozen=True)
class WebhookAuth:
    """What the webhook receiver checks a request against. Holds the secrets; answers yes or no."""

    secret: Secret | None           # PGQR_WEBHOOK_SECRET; None: every webhook is refused
    api_key: Secret | None = None   # EVOLUTION_API_KEY: a body apikey may be the global key
    jwt_key: Secret | None = None   # PGQR_WEBHOOK_JWT_KEY: when set, a valid Bearer JWT is required

    @property
    def enabled(self) -> bool:
        return self.secret is not None and self.secret.reveal() != ""

    def path_secret_ok(self, given: str) -> bool:
        return self.enabled and self.secret is not None and same(given, self.secret.reveal())

    def header_scope(self, given: str, instance_name: str | None) -> Scope | None:
        """'global' for the secret itself, 'instance' for `instance_name`'s derived token, else None."""
        if not self.enabled or self.secret is None:
            return None
        secret = self.secret.reveal()
        if same(given, secret):
            return "global"
        if instance_name is not None and same(given, derive(secret, instance_name)):
            return "instance"
        return None

    def could_be_header_token(self, given: str) -> bool:
        """Cheap pre-check before the body is read: the secret, or something shaped like a derived token."""
        if not self.enabled:
            return False
        if self.secret is not None and same(given, self.secret.reveal()):
            return True
        return len(given) == 64 and all(c in "0123456789abcdef" for c in given)

    def apikey_ok(self, apikey: str, row_token: str | None) -> bool:
        """The body's apikey is the row's own token or the global key. A row without a token of its own
        cannot be checked against (Evolution sends the instance's token, which pgqr does not hold): then the
        path or header credential alone decides."""
        if row_token:
            if same(apikey, row_token):
                return True
            return self.api_key is not None and same(apikey, self.api_key.reveal())
        return True

    def jwt_problem(self, authorization: str | None) -> str | None:
        """None when no JWT is required or the Bearer token verifies; else the rejection reason."""
        if self.jwt_key is None:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "jwt_missing"
        try:
            claims = jwt.decode(token.strip(), self.jwt_key.reveal(), algorithms=["HS256"],
                                options={"require": ["exp", "iat"]}, leeway=JWT_LEEWAY_SECONDS)
        except jwt.ExpiredSignatureError:
            return "jwt_expired"
        except jwt.PyJWTError:
            return "jwt_invalid"
        if claims.get("app") != "evolution" or claims.get("action") != "webhook":
            return "jwt_invalid"
        return None
