"""One timer for every instance: a heap of (due time, instance) entries served by a single task.

Entries are never removed: each carries the instance's `generation` when it was pushed, and the owner ignores
one whose generation has moved on (the instance rotated, closed, was deleted ...). That keeps pushes O(log n)
and a stale entry costs one pop.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Due", "Scheduler"]

IDLE_WAKE = 1.0  # seconds: how often `on_idle` runs at the latest


@dataclass(order=True, frozen=True)
class Due:
    when: float
    seq: int
    name: str = field(compare=False)
    generation: int = field(compare=False)
    k: int = field(compare=False)  # what is due: a QR number, or 0 for a flip


class Scheduler:
    def __init__(self, on_due: Callable[[Due, float], None], on_idle: Callable[[], None]) -> None:
        self._on_due = on_due
        self._on_idle = on_idle
        self._heap: list[Due] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def at(self, when: float, name: str, generation: int, k: int = 0) -> None:
        entry = Due(when, next(self._seq), name, generation, k)
        heapq.heappush(self._heap, entry)
        if self._heap[0] is entry:
            self._wake.set()  # earlier than what the loop sleeps for

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._heap.clear()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            while self._heap and self._heap[0].when <= now:
                self._on_due(heapq.heappop(self._heap), now)
            self._on_idle()
            delay = min(self._heap[0].when - now, IDLE_WAKE) if self._heap else IDLE_WAKE
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(delay, 0.0))
