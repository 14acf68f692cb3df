"""Which URLs pgqr calls Evolution at, and how it shows them: the check a setting's or a row's URL must pass, the
route URLs the client builds (an unusable one is a `config` Failure before anything is sent), and a display form
that never shows credentials.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

from yarl import URL

from .replies import Failure, fail


def is_http_url(raw: str) -> bool:
    """An http(s) URL with a host and a valid port (a setting's, or a row's URL column)."""
    try:
        url = URL(raw)
        return url.scheme in ("http", "https") and bool(url.host) and url.port is not None
    except (ValueError, TypeError):
        return False


def api_base(base_url: str) -> str | Failure:
    """The base URL without its trailing slash, or a `config` Failure when it is not an http(s) URL with a
    host (a row's URL column is the app's to fill: "not a url" or ftp://... must not pass for a network error).
    The message never echoes the URL (it may carry credentials)."""
    if not is_http_url(base_url):
        return fail("config", None, "the Evolution base URL is not an http(s) URL with a host")
    return base_url.rstrip("/")


def instance_url(base_url: str, route: str, name: str) -> str | Failure:
    """{base}/{route}/{name}, the name percent-encoded whole (a slash in it stays part of the name). "." and
    ".." would be resolved away as path segments and reach another route: refused before anything is sent."""
    base = api_base(base_url)
    if isinstance(base, Failure):
        return base
    if name in (".", ".."):
        return fail("config", None, f"the instance name {name!r} cannot be sent in a URL path")
    return f"{base}/{route}/{quote(name, safe='')}"


def display_url(url: str, *, with_path: bool = True) -> str:
    """A URL as shown to people: scheme, host, port and (with_path) path, like `https://host/api`; never
    user:password, query or fragment, which may hold credentials."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    if ":" in host:
        host = f"[{host}]"
    path = parts.path.rstrip("/") if with_path else ""
    return f"{parts.scheme}://{host}{port}{path}"
