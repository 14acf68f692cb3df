"""Cancelling tasks for good.

On Python 3.11 a cancellation can be lost: asyncio.wait_for returns the result, and drops the cancellation, when
it arrives just as the awaited future completes (CPython gh-86296, fixed in 3.12). psycopg_pool waits for a free
connection that way, so a loop cancelled at the moment the pool hands it a connection carries on as if nothing
had happened. Seen: `pgqr run` told to stop right after it started, its gauges loop asleep again and the process
waiting for it for ever. A task still running after a cancellation is cancelled again; its next await ends it.
(pgqr's own code waits with asyncio.timeout(), which keeps the cancellation.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

AGAIN_AFTER = 0.2  # seconds a cancelled task gets before it is cancelled again


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel the tasks and return once every one has ended (whatever it raised), cancelling again any that
    carried on."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=AGAIN_AFTER)
    for task in tasks:  # what each raised is its own business: retrieved, so asyncio does not report it
        if not task.cancelled():
            task.exception()
