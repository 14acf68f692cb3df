"""The refresh engine: claim due instances for free call slots, call Evolution, stream results back.

Due times live in the database (pgqr.plan_next in sql/0004_refresh.sql follows each QR's life); this module
keeps every concurrency slot busy with due instances and writes results back in small batches as they
complete, never waiting for the slowest call of a batch. A result the database reports busy (its row held by
the app or another writer) is handed in again a little later; one bad row never fails the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from . import db
from .evolution import Connected, EvolutionClient, Failure, NoQrYet, QrCode, Reply
from .settings import Settings, describe, reveal

log = logging.getLogger("pgqr.engine")

BATCH = 64                # results per write-back at most
BUSY_RETRIES = 25         # a busy row is handed in again this many times (about 2.5 s), then left to its lease
BUSY_DELAY = 0.1


@dataclass(frozen=True)
class InstanceResult:
    """What happened to one instance, as `pgqr refresh --once --json` reports it."""

    key: str
    instance_name: str
    outcome: str            # qr_stored | qr_unchanged | no_qr | connected | closed | gave_up | failed | not_applied
    error_class: str | None
    http_status: int | None
    latency_ms: float | None
    detail: str | None

    @property
    def success(self) -> bool:
        return self.outcome not in ("failed", "not_applied")


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
            "failed": self.failed - counts["not_applied"],
            "failed_by_class": dict(sorted(by_class.items())),
            "results": [asdict(r) for r in self.results],
        }


def to_result(claimed: db.Claimed, reply: Reply, started_at: datetime) -> db.Result:
    """Map a client outcome to the write path's record."""
    common: dict[str, Any] = {"key": claimed.key, "source": "poll", "latency_ms": round(reply.latency_ms, 2),
                              "started_at": started_at}
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
    return db.Result(outcome="failed", http_status=outcome.http_status, error_class=outcome.error_class, **common)


def report(claimed: db.Claimed, reply: Reply, result: db.Result, recorded: db.Recorded | None) -> InstanceResult:
    outcome: str = result.outcome
    if recorded is None or not recorded.applied:
        outcome = "not_applied" if result.outcome != "failed" else "failed"
    elif result.outcome == "qr":
        outcome = "qr_stored" if recorded.qr_updated else "qr_unchanged"
    detail = reply.outcome.detail if isinstance(reply.outcome, Failure) else None
    if outcome == "not_applied":
        detail = "the write was dropped: the lease was lost or the app moved the row out of waiting"
    return InstanceResult(claimed.key, claimed.name, outcome, result.error_class, result.http_status,
                          result.latency_ms, detail)


@dataclass
class _Pending:
    claimed: db.Claimed
    reply: Reply
    result: db.Result
    done: asyncio.Future[db.Recorded | None]
    tries: int = 0


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
        self._buffer: list[_Pending] = []
        self._buffered = asyncio.Event()
        self._flushed = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._writing = False
        self._lease_seconds = 30.0

    # -- the producer: claim for free slots ---------------------------------------------------------------

    async def run_forever(self, wake: asyncio.Event, stopping: Callable[[], bool]) -> None:
        """Keep every slot busy with due instances; between due times sleep until the earliest one, a wake-up
        (NOTIFY, a freed slot with work waiting, a write-back that moved due times) or the fallback timer."""
        self._start_flusher()
        self._lease_seconds = await self._lease()
        while not stopping():
            wake.clear()
            free = self.settings.concurrency - len(self.in_flight)
            claimed = await db.claim(self.pool, self.owner, free, self._lease_seconds) if free > 0 else []
            for c in claimed:
                self._start(c)
            if free > 0 and len(claimed) == free:
                continue  # maybe more is due: claim again as soon as a slot frees
            if free <= 0:
                # cleared first: a slot freed long ago must not make this a busy loop while every slot is taken
                self._slot_freed.clear()
                await self._wait_any(wake, self._slot_freed, timeout=self.settings.fallback_seconds)
                continue
            due_in = await db.next_due_in(self.pool)
            sleep = self.settings.fallback_seconds if due_in is None else min(due_in, self.settings.fallback_seconds)
            if sleep > 0:
                self._flushed.clear()
                await self._wait_any(wake, self._flushed, timeout=sleep)

    async def run_once(self, stopping: Callable[[], bool] = lambda: False) -> Summary:
        """Refresh every instance due now, each once, and wait for every write-back."""
        self._start_flusher()
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
        """Let calls in flight finish within `grace`, cancel the rest, then write back what came in."""
        if self.in_flight:
            _, pending = await asyncio.wait(self.in_flight, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.close()

    async def close(self) -> None:
        if self._flusher is not None:
            self._buffered.set()
            # the flusher takes a batch out of the buffer before writing it: wait for that write too
            while (self._buffer or self._writing) and not self._flusher.done():
                await asyncio.sleep(0.01)
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None

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
        started_at = datetime.now(UTC)
        reply = await self._call(claimed)
        result = to_result(claimed, reply, started_at)
        done: asyncio.Future[db.Recorded | None] = asyncio.get_running_loop().create_future()
        pending = _Pending(claimed, reply, result, done)
        self._buffer.append(pending)
        self._buffered.set()
        # the write-back happens in the flusher: a slot is free as soon as the call is over
        done.add_done_callback(lambda f: self._finish(pending, outcome))

    def _finish(self, pending: _Pending, outcome: asyncio.Future[InstanceResult]) -> None:
        done, claimed = pending.done, pending.claimed
        recorded = None if done.cancelled() or done.exception() else done.result()
        item = report(claimed, pending.reply, pending.result, recorded)
        with contextlib.suppress(Exception):  # metrics and logs are a courtesy
            self.observe(item)
            log.info("refreshed %s: %s", claimed.name, item.detail or item.outcome,
                     extra={"action": "refresh", "instance": claimed.name, "outcome": item.outcome,
                            "error_class": item.error_class, "http_status": item.http_status,
                            "latency_ms": item.latency_ms})
        if not outcome.done():
            outcome.set_result(item)

    async def _call(self, claimed: db.Claimed) -> Reply:
        base = claimed.url or self.settings.default_evolution_url
        key = claimed.token or reveal(self.settings.evolution_api_key)
        # an instance we cannot even call: name the missing setting (never a value)
        if not base:
            return Reply(Failure("config", True, None, "no Evolution URL on the row and EVOLUTION_API_URL unset"), 0.0)
        if not key:
            return Reply(Failure("config", True, None, "no token on the row and EVOLUTION_API_KEY unset"), 0.0)
        try:
            return await self.client.connect(base, claimed.name, key, number=claimed.phone)
        except Exception:
            # the client returns every reply class as a value; anything else is a bug, and it must cost this
            # one instance a retry, not the others their write-back
            log.exception("refreshing %s crashed", claimed.name, extra={"action": "refresh_error"})
            return Reply(Failure("internal", True, None, "unexpected error (see the listener's log)"), 0.0)

    # -- the write-back: small batches, as results come in -------------------------------------------------

    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_forever(), name="flush")

    async def _flush_forever(self) -> None:
        while True:
            await self._buffered.wait()
            if len(self._buffer) < BATCH:
                await asyncio.sleep(self.settings.flush_ms / 1000)  # let a few more arrive
            batch, self._buffer = self._buffer[:BATCH], self._buffer[BATCH:]
            if not self._buffer:
                self._buffered.clear()
            if batch:
                self._writing = True
                try:
                    await self._flush(batch)
                finally:
                    self._writing = False
                self._flushed.set()

    async def _flush(self, batch: list[_Pending]) -> None:
        try:
            recorded = await db.record_results(self.pool, self.owner, [p.result for p in batch])
        except psycopg.DataError:
            # a row the database refuses (a value the client should have caught) must not cost the others:
            # write them one by one, and the one that still fails as its instance's bad_reply
            if len(batch) > 1:
                await asyncio.gather(*(self._flush([p]) for p in batch))
            elif batch[0].result.outcome != "failed":
                p = batch[0]
                p.result = db.Result(key=p.result.key, source=p.result.source, outcome="failed",
                                     error_class="bad_reply", http_status=p.result.http_status,
                                     latency_ms=p.result.latency_ms, started_at=p.result.started_at)
                await self._flush([p])
            else:
                self._give_up(batch)
            return
        except (psycopg.Error, OSError) as exc:
            log.warning("write-back of %d results failed: %s", len(batch), describe(exc),
                        extra={"action": "write_error"})
            self._retry(batch, delay=1.0)
            return
        by_key = {r.key: r for r in recorded}
        busy = []
        for p in batch:
            rec = by_key.get(p.result.key)
            if rec is not None and rec.busy:
                busy.append(p)
            elif not p.done.done():
                p.done.set_result(rec)
        self._retry(busy, delay=BUSY_DELAY)

    def _retry(self, batch: list[_Pending], delay: float) -> None:
        keep = []
        for p in batch:
            p.tries += 1
            if p.tries > BUSY_RETRIES:
                self._give_up([p])
                continue
            if p.tries == BUSY_RETRIES:
                # the last try: still busy, it is logged as not applied (the call did happen), not retried
                p.result = dataclasses.replace(p.result, final=True)
            keep.append(p)
        if keep:
            asyncio.get_running_loop().call_later(delay, self._requeue, keep)

    def _requeue(self, batch: list[_Pending]) -> None:
        self._buffer.extend(batch)
        self._buffered.set()

    def _give_up(self, batch: list[_Pending]) -> None:
        for p in batch:
            if not p.done.done():
                p.done.set_result(None)  # the lease runs out and the instance is claimed again

