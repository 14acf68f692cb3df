"""The sweep: Evolution's state of every bound row that is not waiting, read without side effects, and the
confirming read of each pending drop.

Once per period (pgqr.settings `sweep_seconds`, 300 by default; one replica at a time, by a lease):
- a server the global key (EVOLUTION_API_KEY) lists is read with one fetchInstances. Its `connectionStatus` is
  Evolution's database column and can lag its memory, so a row whose listed status differs from what pgqr holds,
  or that is not listed at all, is read again with connectionState before anything is recorded;
- the rows of other servers (only instance tokens known) are read with connectionState one by one, spread evenly
  over the period rather than in a burst.
Every few seconds, pending drops whose state has held long enough are read once more with connectionState
(pgqr.drops_to_confirm), which settles them. Never /instance/connect: on a closed instance that opens a WhatsApp
socket nobody asked for. A reply without a state (an instance not loaded yet) is unknown and records nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import cast, get_args

from . import db
from .evolution import EvolutionClient, EvolutionState, Failure, InstanceList, display_url
from .metrics import Metrics
from .settings import Settings, describe, reveal

log = logging.getLogger("pgqr.sweep")

CONFIRM_SECONDS = 2.0      # how often pending drops are looked for
DEFAULT_PERIOD = 300.0     # sweep_seconds' default, while the database cannot say
RETRY_CONFIRM_SECONDS = 30.0  # a confirming read that failed is not repeated sooner
FLUSH_EVERY = 200          # observations per pgqr.observe call
FLUSH_SECONDS = 1.0        # and at least this often while reads come in
CONCURRENCY = 10           # reads in flight
LISTED_ROW_BYTES = 8192    # fetchInstances' reply per instance (a row with its settings is about 2 KB)
STATES = frozenset(get_args(db.StateName))


def _state_of(reply: EvolutionState | Failure) -> db.StateName | None:
    """What a connectionState reply says: a state, `not_found` for a 404, None when it says nothing."""
    if isinstance(reply, Failure):
        return "not_found" if reply.error_class == "not_found" else None
    return reply.state


class Sweep:
    """Reads Evolution's state for the rows pgqr does not poll, and confirms pending drops."""

    def __init__(self, settings: Settings, pool: db.Pool, client: EvolutionClient, owner: str,
                 metrics: Metrics) -> None:
        self.settings = settings
        self.pool = pool
        self.client = client
        self.owner = owner
        self.metrics = metrics
        self._pending: list[db.Observation] = []
        self._flushed_at = time.monotonic()
        self._confirmed_at: dict[str, float] = {}

    # -- the periodic sweep -------------------------------------------------------------------------------

    async def run_forever(self) -> None:
        period = DEFAULT_PERIOD
        while True:
            started = time.monotonic()
            try:
                period = await db.sweep_seconds(self.pool)
                if await self.pool.value("SELECT pgqr.take_sweep(%s, make_interval(secs => %s))",
                                         (self.owner, period * 1.5)):
                    await self.sweep_once(spread=period)
            except Exception as exc:  # the database or Evolution away: the next period reads everything again
                log.warning("sweep failed: %s", describe(exc), extra={"action": "sweep_error"})
            await asyncio.sleep(max(1.0, started + period - time.monotonic()))

    async def sweep_once(self, spread: float = 0.0) -> None:
        """Read every row that is not waiting; the one-by-one reads spread over `spread` seconds."""
        rows = await db.sweep_rows(self.pool)
        home = (self.settings.default_evolution_url or "").rstrip("/")
        global_key = reveal(self.settings.evolution_api_key)
        listed_rows: list[db.Target] = []
        one_by_one: list[db.Target] = []
        for row in rows:
            base, key = self.settings.evolution_for(row.url, row.token)
            if not base or not key:
                continue
            # the global key goes only to EVOLUTION_API_URL's server, never to a URL a row names (the app's users
            # may write those): elsewhere each row is read with the key the engine would send it
            (listed_rows if global_key and base.rstrip("/") == home else one_by_one).append(row)
        if listed_rows:
            assert global_key is not None
            listed = await self._listing(home, global_key, len(listed_rows))
            if isinstance(listed, Failure):
                # the server is down or failing: reading each row would fail as many times; next sweep
                log.warning("sweep: fetchInstances at %s failed (%s); its rows are read next sweep",
                            display_url(home), listed.error_class,
                            extra={"action": "sweep_error", "error_class": listed.error_class})
            elif listed is None:
                one_by_one += listed_rows
            else:
                one_by_one += self._compare(listed_rows, listed)
        await self._flush()
        await self._read_spread(one_by_one, spread)
        await self._flush()

    async def _listing(self, base: str, key: str, rows: int) -> InstanceList | Failure | None:
        """fetchInstances with the global key, with a reply limit sized to the rows on that server; None when
        it does not list every instance there (an instance's token, a refusal, a reply too large to read or not
        understood): each row is read with its own key then; the Failure when the server itself failed."""
        limit = max(self.settings.max_reply_bytes, LISTED_ROW_BYTES * rows)
        async with EvolutionClient(timeout=self.settings.http_timeout, max_reply_bytes=limit,
                                   concurrency=1) as client:
            self.metrics.sweep_calls.labels("fetchInstances").inc()
            listed = await client.fetch_instances(base, key)
        if isinstance(listed, Failure):
            return None if listed.error_class in ("unauthorized", "too_large", "bad_reply") else listed
        return None if listed.key_scope == "instance" else listed

    def _compare(self, targets: list[db.Target], listed: InstanceList) -> list[db.Target]:
        """A row listed as pgqr holds it is seen; one pgqr has never heard of takes the listed status (nothing acts
        on it unread: a drop and a poll without a status column both read connectionState first). Returns the
        rows whose listed status differs from what pgqr holds: they are read from Evolution's memory."""
        status = {row.name: row.connection_status for row in listed.rows}
        changed: list[db.Target] = []
        for t in targets:
            said = status.get(t.name, "not_found")
            if said in STATES and (t.evolution_state is None or said == t.evolution_state):
                self._observed(db.Observation(t.key, cast(db.StateName, said), expect=True,
                                              expected=t.evolution_state))
            else:
                changed.append(t)
        return changed

    async def _read_spread(self, targets: list[db.Target], spread: float) -> None:
        gap = spread / len(targets) if targets else 0.0
        start = time.monotonic()
        running: set[asyncio.Task[None]] = set()
        limit = asyncio.Semaphore(CONCURRENCY)
        for i, t in enumerate(targets):
            # each row in the middle of its share of the period: evenly spread, and a process that just started
            # does not begin with a read
            await asyncio.sleep(max(0.0, start + (i + 0.5) * gap - time.monotonic()))
            await limit.acquire()
            task = asyncio.create_task(self._read(t))
            task.add_done_callback(lambda _t: limit.release())
            running.add(task)
            task.add_done_callback(running.discard)
        await asyncio.gather(*running)

    async def _read(self, t: db.Target) -> None:
        base, key = self.settings.evolution_for(t.url, t.token)
        if not base or not key:
            return
        self.metrics.sweep_calls.labels("connectionState").inc()
        try:
            state = _state_of(await self.client.connection_state(base, t.name, key))
        except Exception:
            log.exception("reading the state of %s crashed", t.name, extra={"action": "sweep_error"})
            return
        if state is not None:
            self._observed(db.Observation(t.key, state, checked=True, expect=True, expected=t.evolution_state))
        if len(self._pending) >= FLUSH_EVERY or time.monotonic() - self._flushed_at >= FLUSH_SECONDS:
            await self._flush()  # saved soon after it was read: a later word from Evolution must not be older

    def calls(self) -> dict[str, float]:
        """The Evolution calls this sweep made, by route (its pgqr_sweep_calls counter): what the bench prints."""
        return {call: self.metrics.registry.get_sample_value("pgqr_sweep_calls_total", {"call": call}) or 0.0
                for call in ("fetchInstances", "connectionState")}

    def _observed(self, o: db.Observation) -> None:
        self._pending.append(o)

    async def _flush(self) -> None:
        self._flushed_at = time.monotonic()
        while self._pending:
            batch, self._pending = self._pending[:FLUSH_EVERY], self._pending[FLUSH_EVERY:]
            held = set(await db.observe(self.pool, self.owner, batch))
            if held:  # another writer had those rows: once more, after it
                await asyncio.sleep(0.05)
                await db.observe(self.pool, self.owner, [o for o in batch if o.key in held])

    # -- confirming pending drops -------------------------------------------------------------------------

    async def confirm_forever(self, now: Callable[[], float] = time.monotonic) -> None:
        while True:
            try:
                await self.confirm_once(now())
            except Exception as exc:  # tried again in a moment
                log.warning("confirming drops failed: %s", describe(exc), extra={"action": "sweep_error"})
                await asyncio.sleep(RETRY_CONFIRM_SECONDS)
            await asyncio.sleep(CONFIRM_SECONDS)

    async def confirm_once(self, at: float) -> None:
        due = [t for t in await db.drops_to_confirm(self.pool)
               if at - self._confirmed_at.get(t.key, -RETRY_CONFIRM_SECONDS) >= RETRY_CONFIRM_SECONDS]
        for t in due:
            self._confirmed_at[t.key] = at
        await self._read_spread(due, 0.0)
        await self._flush()
        for key in [k for k, when in self._confirmed_at.items() if at - when > RETRY_CONFIRM_SECONDS]:
            del self._confirmed_at[key]
