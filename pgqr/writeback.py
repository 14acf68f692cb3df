"""The one write-back: results from polls and webhooks, written in batches through pgqr.record_results.

While one batch is in the database the next one gathers (a group commit), so under load many results share one
round trip and at rest each is written at once. What the database reports busy (a row another transaction holds:
pgqr's own write-back of the same instance, or the app) is handed in again a little later, until the writer's
patience runs out: a waiting result never holds up the rest of its batch. A batch the database refuses with a
DataError is split until the one row it refuses is found; that row alone answers for it. The buffer is bounded:
a full one makes `put` wait, which slows whoever produces results (the engine's claims) instead of growing memory.
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

log = logging.getLogger("pgqr.writeback")

BATCH = 64          # results per record_results call at most
RETRY_DELAY = 0.05  # a busy result is handed in again this much later (the holder's write takes milliseconds)
ERROR_DELAY = 0.5   # after the database failed a batch


class Refused(Exception):
    """The database refuses this one result (a value it cannot hold); the others were written."""


@dataclass
class _Item:
    result: db.Result
    done: asyncio.Future[db.Recorded | None]
    deadline: float  # event-loop time after which a busy result is handed in one last time


class ResultWriter:
    """Writes results for one owner. `linger`: how long a small batch waits for company; `patience`: how long a
    busy or failed result keeps being handed in; `on_bad_row`: what replaces a result the database refuses
    (None: the result's future raises Refused)."""

    def __init__(self, pool: db.Pool, owner: str, *, linger: float = 0.0, patience: float = 2.0,
                 capacity: int = 4 * BATCH,
                 on_bad_row: Callable[[db.Result], db.Result | None] = lambda r: None) -> None:
        self.pool, self.owner = pool, owner
        self.linger, self.patience, self.on_bad_row = linger, patience, on_bad_row
        self._space = asyncio.Semaphore(capacity)
        self._queue: list[_Item] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._outstanding = 0  # put and not answered yet: queued, being written, or waiting to be handed in again

    async def put(self, result: db.Result) -> asyncio.Future[db.Recorded | None]:
        """Queue one result (waiting while the buffer is full); the future resolves with what record_results
        reported for it (busy only when patience ran out), None when the database stayed away."""
        await self._space.acquire()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[db.Recorded | None] = loop.create_future()
        self._outstanding += 1
        done.add_done_callback(self._answered)
        self._enqueue([_Item(result, done, loop.time() + self.patience)])
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._write_forever(), name=f"write-back {self.owner}")
        return done

    async def record(self, result: db.Result) -> db.Recorded | None:
        return await (await self.put(result))

    def _answered(self, _: asyncio.Future[db.Recorded | None]) -> None:
        self._outstanding -= 1
        self._space.release()

    @property
    def idle(self) -> bool:
        return self._outstanding == 0

    async def close(self, wait: bool = True) -> None:
        """Answer everything put so far (unless wait is False: then what is left is cancelled), then stop."""
        if wait:
            while not self.idle and self._task is not None and not self._task.done():
                await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for item in self._queue:
            if not item.done.done():
                item.done.cancel()
        self._queue = []

    def _enqueue(self, items: list[_Item]) -> None:
        self._queue.extend(items)
        self._wake.set()

    async def _write_forever(self) -> None:
        while True:
            await self._wake.wait()
            if self.linger and len(self._queue) < BATCH:
                await asyncio.sleep(self.linger)  # let a few more arrive
            self._wake.clear()
            while self._queue:
                # a key at most once per batch: record_results keeps the last of a key, and each is answered
                batch: list[_Item] = []
                rest: list[_Item] = []
                keys: set[str] = set()
                for item in self._queue:
                    if len(batch) < BATCH and item.result.key not in keys:
                        batch.append(item)
                        keys.add(item.result.key)
                    else:
                        rest.append(item)
                self._queue = rest
                await self._write(batch)

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
        self._later(busy, RETRY_DELAY, give_up=lambda item: self._last_try(item, by_key[item.result.key]))

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
