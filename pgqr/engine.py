"""The refresh engine: claim due instances for free call slots, call Evolution, stream results back.

Due times live in the database (pgqr.plan_next in sql/0009_fence.sql follows each QR's life); this module
keeps every concurrency slot busy with due instances and writes results back in small batches as they
complete, never waiting for the slowest call of a batch. A result the database reports busy (its row held by
the app or another writer) is handed in again a little later; one bad row never fails the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from . import db, writeback
from .evolution import Connected, EvolutionClient, Failure, NoQrYet, QrCode, Reply
from .settings import Settings
from .tasks import cancel_and_wait

log = logging.getLogger("pgqr.engine")


@dataclass(frozen=True)
class InstanceResult:
    """What happened to one instance, as `pgqr refresh --once --json` reports it."""

    key: str
    instance_name: str
    outcome: str  # qr_stored | qr_unchanged | no_qr | connected | closed | gave_up | failed | app_refused | not_applied
    error_class: str | None
    http_status: int | None
    latency_ms: float | None
    detail: str | None

    @property
    def success(self) -> bool:
        return self.outcome not in ("failed", "not_applied", "app_refused")


@dataclass
class Summary:
    results: list[InstanceResult] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(not r.success for r in self.results)

    def as_json(self) -> dict[str, Any]:
        counts = Counter(r.outcome for r in self.results)
        by_class = Counter(r.error_class or "unknown" for r in self.results if r.outcome == "failed")
        return {
            "success": self.failed == 0,
            "total_instances": len(self.results),
            # a QR stored or confirmed: what a person would scan is current
            "refreshed": counts["qr_stored"] + counts["qr_unchanged"],
            "qr_stored": counts["qr_stored"],
            "qr_unchanged": counts["qr_unchanged"],
            "no_qr": counts["no_qr"],
            "connected": counts["connected"],
            "closed": counts["closed"],
            "gave_up": counts["gave_up"],
            "not_applied": counts["not_applied"],
            "app_refused": counts["app_refused"],
            "failed": self.failed - counts["not_applied"] - counts["app_refused"],
            "failed_by_class": dict(sorted(by_class.items())),
            "results": [asdict(r) for r in self.results],
        }


@dataclass(frozen=True)
class Closed:
    """A guarded poll's connectionState said `close`: no connect was made (it would open a WhatsApp socket the
    app did not ask for)."""

    http_status: int
    latency_ms: float


def to_result(claimed: db.Claimed, reply: Reply | Closed) -> db.Result:
    """Map a client outcome to the write path's record: the claim's number, never a timestamp of this host's
    (the database dates the call by its claim)."""
    common: dict[str, Any] = {"key": claimed.key, "source": "poll", "latency_ms": round(reply.latency_ms, 2),
                              "claim_id": claimed.claim_id}
    if isinstance(reply, Closed):
        return db.Result(outcome="closed", http_status=reply.http_status, evolution_state="close", **common)
    outcome = reply.outcome
    if isinstance(outcome, QrCode):
        if not db.storable(outcome.base64, outcome.pairing_code):
            return db.Result(outcome="failed", http_status=outcome.http_status, error_class="bad_reply", **common)
        md5 = db.image_md5(outcome.base64)
        return db.Result(outcome="qr", md5=md5, qr=None if md5 == claimed.qr_md5 else outcome.base64,
                         pairing_code=outcome.pairing_code, qr_count=outcome.count,
                         http_status=outcome.http_status, **common)
    if isinstance(outcome, NoQrYet):
        return db.Result(outcome="no_qr", qr_count=outcome.count, http_status=outcome.http_status, **common)
    if isinstance(outcome, Connected):
        return db.Result(outcome="connected", http_status=outcome.http_status, evolution_state="open", **common)
    # a row without a status column waits on Evolution's word: an instance Evolution no longer has is its word too
    gone = claimed.guarded and outcome.error_class == "not_found"
    return db.Result(outcome="failed", http_status=outcome.http_status, error_class=outcome.error_class,
                     evolution_state="not_found" if gone else None, **common)


def bad_reply(result: db.Result) -> db.Result | None:
    """What a poll result the database refuses (a value the client should have caught) becomes: that
    instance's bad_reply, so it backs off like any other bad reply. A webhook's is refused (its sender is
    told, with a 4xx it does not retry)."""
    if result.source == "webhook":
        return None
    return db.Result(key=result.key, source=result.source, outcome="failed", error_class="bad_reply",
                     http_status=result.http_status, latency_ms=result.latency_ms, claim_id=result.claim_id)


NOT_WRITTEN = {
    "superseded": "not written: the row changed during the call (renamed, moved, stopped waiting) or was claimed "
                  "again",
    "not_waiting": "not written: the app moved the row out of waiting",
    "busy": "not written: the app kept the row locked",
}


def report(claimed: db.Claimed, reply: Reply | Closed, result: db.Result,
           recorded: db.Recorded | None) -> InstanceResult:
    outcome: str = result.outcome
    detail = reply.outcome.detail if isinstance(reply, Reply) and isinstance(reply.outcome, Failure) else None
    if recorded is not None and recorded.outcome == "app_refused":
        outcome, detail = "app_refused", f"the app's table refused the write ({recorded.reason})"
    elif recorded is None or not recorded.written:
        if result.outcome != "failed":
            outcome = "not_applied"
            reason = recorded.reason if recorded is not None else None
            detail = NOT_WRITTEN.get(reason or "", "not written: the database could not be reached")
    elif result.outcome == "qr":
        outcome = "qr_stored" if recorded.qr_updated else "qr_unchanged"
        if recorded.reason == "image_already_replaced":
            detail = "an image this instance already had: not written again"
    return InstanceResult(claimed.key, claimed.name, outcome, result.error_class, result.http_status,
                          result.latency_ms, detail)


class Engine:
    """Claims and refreshes instances for one owner (a listener process, or `pgqr refresh --once`)."""

    def __init__(self, settings: Settings, pool: db.Pool, client: EvolutionClient, owner: str,
                 observe: Callable[[InstanceResult], None] = lambda r: None) -> None:
        self.settings = settings
        self.pool = pool
        self.client = client
        self.owner = owner
        self.observe = observe
        self.in_flight: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._flushed = asyncio.Event()
        # a busy row is handed in again for about 2.5 s, then logged as not written and left to its lease
        self.writer = writeback.ResultWriter(pool, owner, linger=settings.flush_ms / 1000, patience=2.5,
                                             capacity=max(writeback.BATCH * 4, settings.concurrency),
                                             on_bad_row=bad_reply)
        self._lease_seconds = 30.0

    # -- the producer: claim for free slots ---------------------------------------------------------------

    async def run_forever(self, wake: asyncio.Event, stopping: Callable[[], bool]) -> None:
        """Keep every slot busy with due instances; between due times sleep until the earliest one, a wake-up
        (NOTIFY, a freed slot with work waiting, a write-back that moved due times) or the fallback timer."""
        self._lease_seconds = await self._lease()
        while not stopping():
            wake.clear()
            free = self.settings.concurrency - len(self.in_flight)
            claimed: list[db.Claimed] = []
            if free > 0:
                await self.writer.webhooks_first()  # a webhook's QR is the freshest: its write goes first
                claimed = await db.claim(self.pool, self.owner, free, self._lease_seconds)
            for c in claimed:
                self._start(c)
            if free > 0 and len(claimed) == free:
                continue  # maybe more is due: claim again as soon as a slot frees
            if free <= 0:
                # cleared first: a slot freed long ago must not make this a busy loop while every slot is taken
                self._slot_freed.clear()
                await self._wait_any(wake, self._slot_freed, timeout=self.settings.fallback_seconds)
                continue
            # cleared before the due time is read: a write-back that lands while it is read still wakes us
            self._flushed.clear()
            due_in = await db.next_due_in(self.pool)
            sleep = self.settings.fallback_seconds if due_in is None else min(due_in, self.settings.fallback_seconds)
            if sleep > 0:
                await self._wait_any(wake, self._flushed, timeout=sleep)

    async def run_once(self, stopping: Callable[[], bool] = lambda: False) -> Summary:
        """Refresh every instance due now, each once, and wait for every write-back."""
        summary = Summary()
        futures: list[asyncio.Future[InstanceResult]] = []
        due_by = await self.pool.value("SELECT now()")
        lease = await self._lease()
        while not stopping():
            free = self.settings.concurrency - len(self.in_flight)
            if free <= 0:
                self._slot_freed.clear()
                await self._wait_any(self._slot_freed, timeout=self.settings.http_timeout + 5)
                continue
            rows = await db.claim(self.pool, self.owner, free, lease, due_by)
            if not rows:
                break
            futures += [self._start(c) for c in rows]
        for fut in asyncio.as_completed(futures):
            summary.results.append(await fut)
        return summary

    async def _lease(self) -> float:
        """The lease_seconds setting, but always long enough for one call and its write-back."""
        return max(await db.lease_seconds(self.pool), self.settings.http_timeout * 2 + 5)

    async def drain(self, grace: float) -> None:
        """Let calls in flight finish within `grace` and cancel the rest; their results are written back by
        close(), which the service calls once webhooks stopped arriving too."""
        if self.in_flight:
            _, pending = await asyncio.wait(self.in_flight, timeout=grace)
            await cancel_and_wait(pending)

    async def close(self) -> None:
        await self.writer.close()

    @staticmethod
    async def _wait_any(*events: asyncio.Event, timeout: float) -> None:
        waits = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    # -- one call ------------------------------------------------------------------------------------------

    def _start(self, claimed: db.Claimed) -> asyncio.Future[InstanceResult]:
        outcome: asyncio.Future[InstanceResult] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._refresh(claimed, outcome), name=f"refresh {claimed.key}")
        self.in_flight.add(task)
        task.add_done_callback(self._done)
        return outcome

    def _done(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        self._slot_freed.set()

    async def _refresh(self, claimed: db.Claimed, outcome: asyncio.Future[InstanceResult]) -> None:
        reply = await self._call(claimed)
        result = to_result(claimed, reply)
        # the slot frees once the result is in the (bounded) write-back buffer: a full buffer holds the slot,
        # and so slows the claims, instead of growing
        done = await self.writer.put(result)
        done.add_done_callback(lambda f: self._finish(claimed, reply, result, f, outcome))

    def _finish(self, claimed: db.Claimed, reply: Reply | Closed, result: db.Result,
                done: asyncio.Future[db.Recorded | None], outcome: asyncio.Future[InstanceResult]) -> None:
        recorded = None if done.cancelled() or done.exception() else done.result()
        self._flushed.set()
        item = report(claimed, reply, result, recorded)
        with contextlib.suppress(Exception):  # metrics and logs are a courtesy
            self.observe(item)
            # news only at INFO, as in pgqr.refresh_log: a poll that found the image pgqr holds is DEBUG (at
            # 10,000 waiting instances those are hundreds of lines a second, and a tenth of this process's time)
            log.log(logging.DEBUG if item.outcome == "qr_unchanged" else logging.INFO,
                    "refreshed %s: %s", claimed.name, item.detail or item.outcome,
                    extra={"action": "refresh", "instance": claimed.name, "outcome": item.outcome,
                           "error_class": item.error_class, "http_status": item.http_status,
                           "latency_ms": item.latency_ms})
        if not outcome.done():
            outcome.set_result(item)

    async def _call(self, claimed: db.Claimed) -> Reply | Closed:
        base, key = self.settings.evolution_for(claimed.url, claimed.token)
        # an instance we cannot even call: name the missing setting (never a value)
        if not base:
            return Reply(Failure("config", True, None, "no Evolution URL on the row and EVOLUTION_API_URL unset"), 0.0)
        if not key:
            return Reply(Failure("config", True, None, "no token on the row and EVOLUTION_API_KEY unset"), 0.0)
        try:
            if claimed.guarded:
                started = time.monotonic()
                state = await self.client.connection_state(base, claimed.name, key)
                latency = (time.monotonic() - started) * 1000
                if isinstance(state, Failure):
                    return Reply(state, latency)
                if state.state is None:  # not loaded yet: unknown, so neither connect nor close
                    return Reply(Failure("not_loaded", True, state.http_status,
                                         "Evolution has not loaded the instance yet"), latency)
                if state.state == "open":
                    return Reply(Connected(state.http_status), latency)
                if state.state == "close":
                    return Closed(state.http_status, latency)
            return await self.client.connect(base, claimed.name, key, number=claimed.phone)
        except Exception:
            # the client returns every reply class as a value; anything else is a bug, and it must cost this
            # one instance a retry, not the others their write-back
            log.exception("refreshing %s crashed", claimed.name, extra={"action": "refresh_error"})
            return Reply(Failure("internal", True, None, "unexpected error (see the listener's log)"), 0.0)
