"""The one write-back: results from polls and webhooks, written in batches through pgqr.record_results.

While one batch is in the database the next one gathers (a group commit), so under load many results share one
round trip and at rest each is written at once. Webhooks have a lane of their own in the writer: a webhook is
written in the next webhook batch, never queued behind a batch of polls, and while webhooks are being written
poll batches give way (each waits as long as the one before it took, so polls keep at most half the time and
never starve). What the database reports busy (a row another transaction holds: pgqr's own write-back of the
same instance, or the app) is handed in again a little later, until the writer's patience runs out: a waiting
result never holds up the rest of its batch. A batch the database refuses with a DataError is split until the
one row it refuses is found; that row alone answers for it. Each lane's buffer is bounded: a full one makes
`put` wait, which slows whoever produces results (the engine's claims) instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from . import db
from .settings import describe
from .tasks import cancel_and_wait

log = logging.getLogger("pgqr.writeback")

BATCH = 64          # results per record_results call at most
RETRY_DELAY = 0.05  # a busy result is handed in again this much later (the holder's write takes milliseconds)
HOOK_RETRY_DELAY = 0.005  # a busy webhook's first retry (then doubling up to RETRY_DELAY)
ERROR_DELAY = 0.5   # after the database failed a batch
HOOK_BATCHES = 2   # webhook batches in the database at once (two backends: a slow one does not hold the rest)
WEBHOOK_PATIENCE = 2.0  # a webhook waits for a busy row at most this long (well under Evolution's timeout)


class Refused(Exception):
    """The database refuses this one result (a value it cannot hold); the others were written."""


@dataclass
class _Item:
    result: db.Result
    done: asyncio.Future[db.Recorded | None]
    deadline: float  # event-loop time after which a busy result is handed in one last time
    busy_tries: int = 0  # times the database reported it busy

    @property
    def urgent(self) -> bool:
        """A webhook: someone waits for its answer (Evolution, with a timeout), so it goes first."""
        return self.result.source == "webhook"

    @property
    def busy_delay(self) -> float:
        """How long after the database reported it busy it is handed in again. A webhook sooner, its sender
        waits: what it met is mostly a claim, which takes a millisecond; each try after that waits twice as
        long, up to a poll's delay, so a row the app holds is not asked 400 times."""
        if not self.urgent:
            return RETRY_DELAY
        return min(HOOK_RETRY_DELAY * 2.0 ** (self.busy_tries - 1), RETRY_DELAY)


class _Lane:
    """One queue of the writer and the task that writes it, `width` batches at a time."""

    def __init__(self, capacity: int, width: int) -> None:
        self.space = asyncio.Semaphore(capacity)
        self.width = width
        self.queue: list[_Item] = []
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.batches: set[asyncio.Task[None]] = set()  # those written beside the lane's task (width > 1)
        self.writing = 0  # batches of this lane in the database


class ResultWriter:
    """Writes results for one owner. `linger`: how long a small batch of polls waits for company (a webhook's
    never waits); `patience`: how long a busy or failed result keeps being handed in (a webhook's at most
    WEBHOOK_PATIENCE); `capacity`: results each lane buffers; `on_bad_row`: what replaces a result the database
    refuses (None: the result's future raises Refused)."""

    def __init__(self, pool: db.Pool, owner: str, *, linger: float = 0.0, patience: float = 2.0,
                 capacity: int = 4 * BATCH,
                 on_bad_row: Callable[[db.Result], db.Result | None] = lambda r: None) -> None:
        self.pool, self.owner = pool, owner
        self.linger, self.patience, self.on_bad_row = linger, patience, on_bad_row
        self._polls, self._hooks = _Lane(capacity, 1), _Lane(capacity, HOOK_BATCHES)
        self._in_db: set[str] = set()  # keys of the batches in the database: a key is in one batch at a time
        self._hooks_idle = asyncio.Event()
        self._hooks_idle.set()
        self._last_poll_batch = 0.0  # how long the last batch of polls took in the database
        self._outstanding = 0  # put and not answered yet: queued, being written, or waiting to be handed in again

    def _lane(self, item: _Item) -> _Lane:
        return self._hooks if item.urgent else self._polls

    async def put(self, result: db.Result) -> asyncio.Future[db.Recorded | None]:
        """Queue one result (waiting while its lane's buffer is full); the future resolves with what
        record_results reported for it (busy only when patience ran out), None when the database stayed away."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[db.Recorded | None] = loop.create_future()
        patience = min(self.patience, WEBHOOK_PATIENCE) if result.source == "webhook" else self.patience
        item = _Item(result, done, loop.time() + patience)
        lane = self._lane(item)
        await lane.space.acquire()
        self._outstanding += 1
        done.add_done_callback(lambda _: self._answered(lane))
        self._enqueue([item])
        return done

    async def record(self, result: db.Result) -> db.Recorded | None:
        return await (await self.put(result))

    def _answered(self, lane: _Lane) -> None:
        self._outstanding -= 1
        lane.space.release()

    @property
    def idle(self) -> bool:
        return self._outstanding == 0

    async def close(self, wait: bool = True) -> None:
        """Answer everything put so far (unless wait is False: then what is left is cancelled), then stop."""
        lanes = (self._polls, self._hooks)
        if wait:
            while not self.idle and any(lane.task is not None and not lane.task.done() for lane in lanes):
                await asyncio.sleep(0.01)
        for lane in lanes:
            await cancel_and_wait([*lane.batches, *([lane.task] if lane.task is not None else [])])
            lane.task = None
            for item in lane.queue:
                if not item.done.done():
                    item.done.cancel()
            lane.queue = []

    def _enqueue(self, items: list[_Item]) -> None:
        for item in items:
            lane = self._lane(item)
            lane.queue.append(item)
            lane.wake.set()
            if lane.task is None or lane.task.done():
                lane.task = asyncio.create_task(self._write_forever(lane), name=f"write-back {self.owner}")
            if lane is self._hooks:
                self._hooks_idle.clear()

    async def _write_forever(self, lane: _Lane) -> None:
        urgent = lane is self._hooks
        while True:
            self._settle()
            await lane.wake.wait()
            if not urgent and self.linger and len(lane.queue) < BATCH:
                await asyncio.sleep(self.linger)  # let a few more arrive
            lane.wake.clear()
            while lane.queue:
                if lane.writing >= lane.width:
                    break  # woken when one of the lane's batches ends
                if not urgent:
                    await self.webhooks_first()
                batch = self._take(lane)
                if not batch:
                    break  # every key queued is in a batch in the database: woken when that one ends
                lane.writing += 1
                self._in_db.update(item.result.key for item in batch)
                if lane.width == 1:
                    await self._write_batch(lane, batch)
                else:
                    task = asyncio.create_task(self._write_batch(lane, batch), name=f"write-back {self.owner}")
                    lane.batches.add(task)
                    task.add_done_callback(lane.batches.discard)

    async def _write_batch(self, lane: _Lane, batch: list[_Item]) -> None:
        started = asyncio.get_running_loop().time()
        try:
            await self._write(batch)
        except Exception as exc:
            # a bug, not the database: whoever waits for these results is told, and the lane goes on
            log.exception("write-back of %d results crashed", len(batch), extra={"action": "write_error"})
            for item in batch:
                if not item.done.done():
                    item.done.set_exception(exc)
        finally:
            lane.writing -= 1
            self._in_db.difference_update(item.result.key for item in batch)
            if lane is self._polls:
                self._last_poll_batch = asyncio.get_running_loop().time() - started
            self._wake_blocked()
            self._settle()

    def _take(self, lane: _Lane) -> list[_Item]:
        """The next batch of a lane: a key at most once (record_results keeps the last of a key, and each is
        answered) and not while the other lane's batch holds it."""
        batch: list[_Item] = []
        rest: list[_Item] = []
        keys: set[str] = set()
        for item in lane.queue:
            key = item.result.key
            if len(batch) < BATCH and key not in keys and key not in self._in_db:
                batch.append(item)
                keys.add(key)
            else:
                rest.append(item)
        lane.queue = rest
        return batch

    def _wake_blocked(self) -> None:
        for lane in (self._polls, self._hooks):
            if lane.queue:
                lane.wake.set()

    def _settle(self) -> None:
        """Called whenever a lane goes back to waiting: webhooks idle once none is queued or in the database."""
        if not self._hooks.queue and not self._hooks.writing:
            self._hooks_idle.set()

    async def webhooks_first(self) -> None:
        """Before a batch of polls, and before the engine claims more: while webhooks are being written, wait
        for them, as long as the last poll batch took at most, so polls keep at most about half the database's
        time and never starve."""
        if self._hooks_idle.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(self._last_poll_batch, RETRY_DELAY)):
                await self._hooks_idle.wait()

    async def _write(self, batch: list[_Item]) -> None:
        try:
            rows = await db.record_results(self.pool, self.owner, [item.result for item in batch])
        except psycopg.DataError as exc:
            await self._bisect(batch, exc)
            return
        except (psycopg.Error, OSError) as exc:
            log.warning("write-back of %d results failed: %s", len(batch), describe(exc),
                        extra={"action": "write_error"})
            self._later(batch, ERROR_DELAY, give_up=lambda item: item.done.set_result(None))
            return
        by_key = {row.key: row for row in rows}
        busy = []
        for item in batch:
            row = by_key.get(item.result.key)
            if row is not None and row.busy:
                busy.append(item)
            elif not item.done.done():
                # no row: a webhook repeating the state pgqr already holds, dropped before anything was written
                item.done.set_result(row or db.Recorded(item.result.key, False, False, False, False,
                                                        item.result.outcome, "repeat"))
        retries: dict[float, list[_Item]] = {}
        for item in busy:
            item.busy_tries += 1
            retries.setdefault(item.busy_delay, []).append(item)
        for delay, items in retries.items():
            self._later(items, delay, give_up=lambda item: self._last_try(item, by_key[item.result.key]))

    async def _bisect(self, batch: list[_Item], exc: psycopg.DataError) -> None:
        """One row the database refuses must not cost the others: halve until it is found."""
        if len(batch) > 1:
            half = len(batch) // 2
            for part in (batch[:half], batch[half:]):
                await self._write(part)
            return
        item = batch[0]
        replacement = self.on_bad_row(item.result)
        if replacement is not None and replacement != item.result:
            item.result = replacement
            await self._write([item])
        elif not item.done.done():
            item.done.set_exception(Refused(describe(exc)))

    def _last_try(self, item: _Item, busy: db.Recorded) -> None:
        """Patience ran out on a busy result: a poll is handed in once more as final (logged as not written,
        the call did happen); anything else is answered busy."""
        if item.result.source == "poll" and not item.result.final:
            item.result = dataclasses.replace(item.result, final=True)
            self._enqueue([item])
        elif not item.done.done():
            item.done.set_result(busy)

    def _later(self, items: list[_Item], delay: float, give_up: Callable[[_Item], None]) -> None:
        if not items:
            return
        now = asyncio.get_running_loop().time()
        again = []
        for item in items:
            if item.done.done():
                continue
            if now + delay > item.deadline:
                with contextlib.suppress(asyncio.InvalidStateError):
                    give_up(item)
            else:
                again.append(item)
        if again:
            asyncio.get_running_loop().call_later(delay, self._enqueue, again)
