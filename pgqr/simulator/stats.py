"""What one instance has been asked: counts, concurrency and the times of recent calls."""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from .config import Mode, State

__all__ = ["CallLog", "InstanceStats"]

RECENT_CALLS = 512  # enough for "never more than N calls in any 60 s" at any sane poll rate


@dataclass
class CallLog:
    connect_calls: int = 0
    state_calls: int = 0
    max_concurrent_connects: int = 0
    max_concurrent_calls: int = 0  # connect and connectionState together
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_CALLS))  # monotonic seconds
    _connects: int = 0
    _calls: int = 0

    @contextmanager
    def call(self, kind: Literal["connect", "state"], now: float) -> Iterator[None]:
        """Count one call for as long as it is being answered."""
        self.recent.append(now)
        self._calls += 1
        self.max_concurrent_calls = max(self.max_concurrent_calls, self._calls)
        if kind == "connect":
            self.connect_calls += 1
            self._connects += 1
            self.max_concurrent_connects = max(self.max_concurrent_connects, self._connects)
        else:
            self.state_calls += 1
        try:
            yield
        finally:
            self._calls -= 1
            if kind == "connect":
                self._connects -= 1


@dataclass(frozen=True)
class InstanceStats:
    connect_calls: int
    max_concurrent_connects: int
    sockets_started: int
    count: int
    state: State
    state_calls: int = 0
    max_concurrent_calls: int = 0
    recent_calls: tuple[float, ...] = ()  # monotonic seconds of the last calls (connect and connectionState)
    mode: Mode = "normal"

    def most_calls_within(self, seconds: float) -> int:
        """The most calls that fell into any window of `seconds` (among the recent ones kept)."""
        times = sorted(self.recent_calls)
        return max((bisect.bisect_right(times, t + seconds) - i for i, t in enumerate(times)), default=0)
