"""The live QR page: what a person opens on a phone to link WhatsApp, from a signed link (pgqr/links.py).

    GET /instances/{key}?exp=&sig=          a small page (inline CSS and JS, no external asset)
    GET /instances/{key}/events?exp=&sig=   server-sent events: the page's state, first at once, then on change

One LISTEN (pgqr_qr_updated, on the service's listener connection) feeds an in-process hub: a notification for a
key somebody watches costs one query, whatever the number of viewers, and every viewer of that key gets the new
state. Viewers cost memory, never a database connection. After the listener reconnects, and every SWEEP_SECONDS
(what no NOTIFY announces, e.g. a failing poll), the hub re-reads the keys it watches in one statement and pushes
only what changed. Events carry what the page shows (image, expiry, words, pairing code), never a token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from aiohttp import web

from . import db, links
from .evolution import ERROR_CLASSES
from .settings import describe

log = logging.getLogger("pgqr.page")

QR_CHANNEL = "pgqr_qr_updated"
SWEEP_SECONDS = 10.0
KEEPALIVE_SECONDS = 15.0   # a comment line: proxies keep the stream open, and a gone viewer is noticed
RETRY_MS = 2000            # how soon a browser's EventSource comes back after the sidecar restarts
READ_CHUNK = 500           # keys per statement when many instances are watched

StateName = Literal["qr", "pairing", "waiting", "connected", "gave_up", "failed", "idle", "gone"]

# The page speaks to the person linking a phone, who can fix nothing behind it: every failure says, in plain words,
# whether to wait or whom to ask; never an HTTP status, an error class or the name of the software behind it.
ASK = "Ask whoever sent you this link"
GAVE_UP_WORDS = {
    "qr_limit": f"Too many codes went unscanned, so WhatsApp stopped making new ones. {ASK} to restart the "
                "connection and send you a new link.",
    "logout_instance": f"This WhatsApp connection was logged out. {ASK} for a new one.",
    "remove_instance": f"This WhatsApp connection was removed. {ASK} for a new one.",
    "instance_delete": f"This WhatsApp connection was deleted. {ASK} for a new one.",
}
GAVE_UP_OTHERWISE = f"WhatsApp stopped making codes for this connection. {ASK} for a new one."
# a failure that heals by itself: the page keeps the person waiting, with the code as soon as there is one
WAIT_WORDS = "Codes cannot be fetched at the moment. This page keeps trying and shows a code as soon as there " \
             "is one: keep it open."
# a failure someone must fix: what is wrong, in the person's words, then whom to ask
FAILED_WORDS = {
    "not_found": "The WhatsApp connection behind this link was not found.",
    "unauthorized": "The WhatsApp connection behind this link refused access.",
    "config": "The WhatsApp connection behind this link is not set up completely.",
}
FAILED_OTHERWISE = "The WhatsApp connection behind this link is not working."
FIX_WORDS = f"{ASK} to check it; this page updates by itself once it is fixed."


@dataclass(frozen=True)
class View:
    """One instance's page, as words and pictures; equal views are never pushed twice."""

    state: StateName
    title: str
    detail: str = ""
    name: str = ""
    qr: str | None = None
    pairing_code: str | None = None
    expires_at_ms: int | None = None

    @cached_property
    def encoded(self) -> bytes:
        """The event's JSON without its opening brace: each write prepends the database's clock (the countdown
        runs on it)."""
        doc = {"state": self.state, "title": self.title, "detail": self.detail, "name": self.name, "qr": self.qr,
               "pairing_code": self.pairing_code, "expires_at": self.expires_at_ms}
        return json.dumps(doc, separators=(",", ":")).encode()[1:]

    def frame(self, now_ms: int) -> bytes:
        return b'event: state\ndata: {"now":%d,' % now_ms + self.encoded + b"\n\n"


GONE = View("gone", "This connection no longer exists", f"{ASK} for a new one.")


def failed_view(error_class: str | None, name: str) -> View:
    """A failed poll, as the person holding the phone needs it: wait (it heals by itself) or ask (someone must
    fix something; `config` is retried, but only a changed row heals it)."""
    info = ERROR_CLASSES.get(error_class or "")
    if info is not None and info.transient and error_class != "config":
        return View("failed", "Could not get a code yet", WAIT_WORDS, name)
    return View("failed", "Could not get a code", f"{FAILED_WORDS.get(error_class or '', FAILED_OTHERWISE)} "
                                                  f"{FIX_WORDS}", name)


def view_of(s: db.PageState) -> View:
    """The words for one instance's state (the order matters: a connect or a give-up beats an old QR)."""
    if s.connected or (s.last_outcome == "connected" and not s.waiting):
        return View("connected", "Connected", "WhatsApp is linked. You can close this page.", s.name)
    if s.last_outcome == "gave_up":
        words = GAVE_UP_WORDS.get(s.last_error_class or "", GAVE_UP_OTHERWISE)
        return View("gave_up", "WhatsApp stopped offering codes", words, s.name)
    if not s.waiting:
        return View("idle", "Not waiting for a phone",
                    "This WhatsApp connection is not waiting to be linked. If you expected to link a phone, ask "
                    "whoever sent you this link.", s.name)
    if s.last_outcome == "failed":
        return failed_view(s.last_error_class, s.name)
    expires = int(s.qr_expires_at.timestamp() * 1000) if s.qr_expires_at else None
    if s.pairing_code and s.has_phone:
        return View("pairing", "Link with your phone number",
                    "On your phone: WhatsApp > Linked devices > Link a device > Link with phone number instead, "
                    "then type this code.", s.name, s.qr, s.pairing_code, expires)
    if s.qr:
        return View("qr", "Scan this code with WhatsApp",
                    "On your phone: WhatsApp > Linked devices > Link a device, then point the camera here.",
                    s.name, s.qr, None, expires)
    return View("waiting", "Getting a code\u2026", "This page updates by itself.", s.name)


class Viewer:
    """One open stream: holds only the latest view not yet written (a slow viewer skips states, never queues)."""

    __slots__ = ("_ready", "_view")

    def __init__(self) -> None:
        self._view: View | None = None
        self._ready = asyncio.Event()

    def push(self, view: View | None) -> None:
        if view is not None:
            self._view = view
        self._ready.set()

    async def next(self, timeout: float) -> View | None:
        """The next view, or None after `timeout` (or when woken to stop)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        self._ready.clear()
        view, self._view = self._view, None
        return view


Read = Callable[[list[str]], Awaitable[list[db.PageState]]]


class Hub:
    """Fans one LISTEN out to every open page. `notified` and `reconnected` are the listener's callbacks."""

    def __init__(self, read: Read, *, sweep_seconds: float = SWEEP_SECONDS) -> None:
        self._read = read
        self.sweep_seconds = sweep_seconds
        self._viewers: dict[str, set[Viewer]] = {}
        self._views: dict[str, View] = {}   # the last view pushed, per watched key: what a new viewer gets first
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self.closed = False
        self.reads = 0                      # statements run, for tests and the bench
        # the database's clock less this host's, as of the last read: a page counts the QR's life (the
        # database's estimate) down from the database's now, whatever this host's clock says
        self.clock_offset = 0.0

    def db_now_ms(self) -> int:
        return int((time.time() + self.clock_offset) * 1000)

    @property
    def viewers(self) -> int:
        return sum(len(v) for v in self._viewers.values())

    def notified(self, payload: str) -> None:
        """NOTIFY pgqr_qr_updated: a hint (anyone may NOTIFY); the state is read from the rows."""
        try:
            key = json.loads(payload).get("key")
        except (ValueError, AttributeError):
            return
        if isinstance(key, str) and key in self._viewers:
            self._mark([key])

    def reconnected(self) -> None:
        """The listener (re)connected: whatever happened meanwhile was not notified, so read every watched key."""
        self._mark(list(self._viewers))

    def _mark(self, keys: list[str]) -> None:
        self._dirty.update(keys)
        self._wake.set()

    @contextlib.contextmanager
    def watch(self, key: str) -> Iterator[Viewer]:
        viewer = Viewer()
        self._viewers.setdefault(key, set()).add(viewer)
        cached = self._views.get(key)
        if cached is not None:
            viewer.push(cached)
        else:
            self._mark([key])
        try:
            yield viewer
        finally:
            watching = self._viewers.get(key)
            if watching is not None:
                watching.discard(viewer)
                if not watching:
                    del self._viewers[key]
                    self._views.pop(key, None)

    async def run_forever(self) -> None:
        last_sweep = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, last_sweep + self.sweep_seconds - time.monotonic())):
                    await self._wake.wait()
            self._wake.clear()
            if time.monotonic() >= last_sweep + self.sweep_seconds:
                last_sweep = time.monotonic()
                self._dirty.update(self._viewers)
            keys = sorted(k for k in self._dirty if k in self._viewers)
            self._dirty.clear()
            for start in range(0, len(keys), READ_CHUNK):
                chunk = keys[start:start + READ_CHUNK]
                try:
                    self.reads += 1
                    states = {s.key: s for s in await self._read(chunk)}
                    if states:  # every row of one read carries the same now()
                        self.clock_offset = next(iter(states.values())).db_now.timestamp() - time.time()
                except Exception as exc:
                    # the database is away: keep what viewers have; the reconnect (or the next sweep) reads again
                    log.warning("live page read failed: %s", describe(exc), extra={"action": "page_read_error"})
                    self._dirty.update(keys[start:])
                    await asyncio.sleep(1.0)
                    break
                for key in chunk:
                    state = states.get(key)
                    self._publish(key, view_of(state) if state is not None else GONE)

    def _publish(self, key: str, view: View) -> None:
        viewers = self._viewers.get(key)
        if not viewers or self._views.get(key) == view:
            return
        self._views[key] = view
        for viewer in viewers:
            viewer.push(view)

    async def close(self, app: web.Application | None = None) -> None:
        """At shutdown: every stream ends now, so the server need not wait for them."""
        self.closed = True
        for viewers in self._viewers.values():
            for viewer in viewers:
                viewer.push(None)


@dataclass(frozen=True)
class PageContext:
    hub: Hub
    secrets: tuple[str, ...]  # the current link secret, then the previous one during a rotation


PAGE: web.AppKey[PageContext] = web.AppKey("page")


def _authorized(request: web.Request) -> int | None:
    """The link's expiry when its signature holds for this key, else None."""
    ctx = request.app[PAGE]
    exp, sig = request.query.get("exp"), request.query.get("sig")
    if links.verify(ctx.secrets, request.match_info["key"], exp, sig):
        return int(exp or 0)
    return None


def _forbidden() -> web.Response:
    return web.Response(status=403, text=f"This link does not work: it was changed, it expired or it was withdrawn. "
                                         f"{ASK} for a new one.\n", headers=PRIVATE)


async def page(request: web.Request) -> web.Response:
    if _authorized(request) is None:
        return _forbidden()
    return web.Response(text=HTML, content_type="text/html", charset="utf-8",
                        headers={**PRIVATE, "Content-Security-Policy": CSP})


async def events(request: web.Request) -> web.StreamResponse:
    expires = _authorized(request)
    if expires is None:
        return _forbidden()
    hub = request.app[PAGE].hub
    response = web.StreamResponse(headers={**PRIVATE, "Content-Type": "text/event-stream",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    try:
        await response.write(b"retry: %d\n\n" % RETRY_MS)
        with hub.watch(request.match_info["key"]) as viewer:
            while not hub.closed:
                left = expires - time.time()
                if left <= 0:
                    await response.write(b"event: expired\ndata: {}\n\n")
                    break
                view = await viewer.next(min(KEEPALIVE_SECONDS, left))
                if view is not None:
                    await response.write(view.frame(hub.db_now_ms()))
                elif not hub.closed:
                    await response.write(b": keepalive\n\n")
    except ConnectionResetError:  # the viewer left
        pass
    return response


async def read_events(lines: AsyncIterable[bytes]) -> AsyncIterator[tuple[str, bytes]]:
    """(event, data) pairs from a stream's lines, as EventSource parses what `events` sends (for the tests and
    the bench, which read streams the way a browser does)."""
    event, data = "message", b""
    async for raw in lines:
        line = raw.rstrip(b"\r\n")
        if line.startswith(b"event: "):
            event = line[7:].decode()
        elif line.startswith(b"data: "):
            data = line[6:]
        elif not line:
            if data:
                yield event, data
            event, data = "message", b""


def register(app: web.Application, hub: Hub, secrets: Sequence[str]) -> None:
    """Add the page's routes to the sidecar's app (only when a link secret is set)."""
    app[PAGE] = PageContext(hub, tuple(secrets))
    app.router.add_get("/instances/{key}", page)
    app.router.add_get("/instances/{key}/events", events)
    app.on_shutdown.append(hub.close)


# -- the page itself: no build step, no external asset; the CSP allows exactly the inline style and script ----

STYLE = """
:root{color-scheme:light dark;--fg:#1b1f23;--bg:#f4f6f5;--card:#fff;--muted:#5c6670;--accent:#198754;--bad:#b02a37}
@media (prefers-color-scheme:dark){:root{--fg:#e8ecef;--bg:#111416;--card:#1c2124;--muted:#a3adb5}}
*{box-sizing:border-box}
body{margin:0;font:17px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
background:var(--bg);display:flex;justify-content:center;min-height:100vh}
main{width:100%;max-width:26rem;margin:1rem;padding:1.25rem;background:var(--card);border-radius:16px;
text-align:center;box-shadow:0 2px 12px rgb(0 0 0/.08);align-self:flex-start}
#name{color:var(--muted);font-size:.9rem;margin:0}
h1{font-size:1.35rem;margin:.4rem 0 .8rem}
#qr{width:100%;max-width:320px;aspect-ratio:1;image-rendering:pixelated;background:#fff;border-radius:8px}
#pairing{font:700 2.3rem/1.2 ui-monospace,SFMono-Regular,Menlo,monospace;letter-spacing:.12em;margin:.4rem 0;
word-break:break-all}
#countdown{font-weight:600;color:var(--accent);min-height:1.5em;margin:.6rem 0}
#detail{color:var(--muted);margin:.4rem 0}
#live{font-size:.8rem;color:var(--muted);margin-top:1rem}
body[data-state=connected] h1{color:var(--accent);font-size:2rem}
body[data-state=gave_up] h1,body[data-state=failed] h1,body[data-state=gone] h1{color:var(--bad)}
"""

SCRIPT = """
const $ = (id) => document.getElementById(id);
let deadline = null, skew = 0;
function render(s) {
  skew = Date.now() - s.now;
  document.body.dataset.state = s.state;
  $("name").textContent = s.name;
  $("title").textContent = s.title;
  $("detail").textContent = s.detail;
  if (s.qr) { if ($("qr").getAttribute("src") !== s.qr) $("qr").src = s.qr; $("qr").hidden = false; }
  else { $("qr").hidden = true; $("qr").removeAttribute("src"); }
  const code = s.pairing_code || "";
  $("pairing").textContent = code.length === 8 ? code.slice(0, 4) + "-" + code.slice(4) : code;
  $("pairing").hidden = !code;
  deadline = s.expires_at;
  tick();
}
// a countdown while the code's life is known to run on; once it is over, or while its birth is not bounded (no
// expiry, or an expiry already past: first seen by a poll), the next code is what the person waits for
function tick() {
  const el = $("countdown");
  if ($("qr").hidden) { el.textContent = ""; return; }
  const left = deadline === null ? 0 : Math.ceil((deadline - (Date.now() - skew)) / 1000);
  el.textContent = left > 0 ? "Code expires in " + Math.floor(left / 60) + ":" + String(left % 60).padStart(2, "0")
                            : "A new code is on its way\\u2026";
}
function gone(words) {
  document.body.dataset.state = "gone";
  $("title").textContent = words; $("detail").textContent = "Ask whoever sent you this link for a new one.";
  $("qr").hidden = true; $("pairing").hidden = true; deadline = null; tick(); $("live").textContent = "";
}
const source = new EventSource(location.pathname.replace(/\\/$/, "") + "/events" + location.search);
source.addEventListener("state", (e) => { render(JSON.parse(e.data)); $("live").textContent = "Live"; });
source.addEventListener("expired", () => { source.close(); gone("This link has expired"); });
source.onerror = () => {
  if (source.readyState === EventSource.CLOSED) gone("This link is no longer valid");
  else $("live").textContent = "Reconnecting\\u2026";
};
setInterval(tick, 250);
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CSP = (f"default-src 'none'; img-src data:; style-src {_sha256(STYLE)}; script-src {_sha256(SCRIPT)}; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# the URL carries the signature: never cached, never sent on as a referrer
PRIVATE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}

HTML = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<meta name="robots" content="noindex">
<title>Link WhatsApp</title>
<style>{STYLE}</style></head>
<body data-state="loading"><main>
<p id="name"></p>
<h1 id="title">Loading\u2026</h1>
<div id="pairing" hidden></div>
<img id="qr" alt="WhatsApp login QR code" hidden>
<p id="countdown"></p>
<p id="detail"></p>
<p id="live"></p>
</main><script>{SCRIPT}</script></body></html>
"""
