"""Stopping for good: a task that carried on after its cancellation (Python 3.11 loses one that meets the result
of asyncio.wait_for, which psycopg_pool waits for a connection with) is cancelled again until it ends."""

from __future__ import annotations

import asyncio
import contextlib

from pgqr.tasks import cancel_and_wait


async def _carries_on(ended: list[str]) -> None:
    with contextlib.suppress(asyncio.CancelledError):  # what a lost cancellation looks like: the task goes on
        await asyncio.sleep(3600)
    try:
        await asyncio.sleep(3600)
    finally:
        ended.append("ended")


async def _fails() -> None:
    raise RuntimeError("a loop's own error")


async def test_a_task_that_carried_on_after_its_cancellation_is_cancelled_again() -> None:
    ended: list[str] = []
    stubborn = asyncio.create_task(_carries_on(ended))
    await asyncio.sleep(0)
    # positive control: one cancellation does not end it
    stubborn.cancel()
    _, pending = await asyncio.wait([stubborn], timeout=0.5)
    assert pending == {stubborn}
    failing, done = asyncio.create_task(_fails()), asyncio.create_task(asyncio.sleep(0))
    await asyncio.wait_for(cancel_and_wait([stubborn, failing, done]), 10)
    assert stubborn.cancelled() and ended == ["ended"]
    assert isinstance(failing.exception(), RuntimeError) and done.done()
