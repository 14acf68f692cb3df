"""Webhooks posted at a steady rate, open loop, and the bodies they carry (a new made-up 13 KB QR each time, or a
connection.update)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import aiohttp

WEBHOOK_RATE = 500.0   # webhooks a second, in every webhook phase
IMAGE_BYTES = 13_600    # a real Evolution QR data URL (design.md)


@dataclass
class Shot:
    sent_at: float
    latency: float
    status: int
    reply: str = ""  # the reply's body (its first 300 characters): what a refusal said


async def blast(url: str, bodies: Iterator[bytes], rate: float, stop: Callable[[int, float], bool]) -> list[Shot]:
    """POST bodies at `rate` a second, open loop (each on schedule, whatever the previous one does), until
    stop(sent, elapsed); each reply's latency is the time from its send to its answer (after the commit)."""
    shots: list[Shot] = []
    tasks: set[asyncio.Task[None]] = set()
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512)) as http:

        async def one(body: bytes) -> None:
            sent = time.perf_counter()
            status, reply = 0, ""
            try:
                async with http.post(url, data=body, headers=headers) as resp:
                    reply = (await resp.read())[:300].decode(errors="replace")
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                reply = f"{type(exc).__name__}: {exc}"[:300]
            shots.append(Shot(sent, time.perf_counter() - sent, status, reply))

        started = time.perf_counter()
        for i, body in enumerate(bodies):
            due = started + i / rate
            if stop(i, due - started):
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    return shots


def qr_image(number: int) -> str:
    """The number-th made-up 13 KB QR image: different numbers, different images."""
    return f"data:image/png;base64,{number:012d}" + "A" * (IMAGE_BYTES - 40)


def qr_bodies(names: Sequence[str], sim_url: str, first: int = 0) -> Iterator[bytes]:
    """qrcode.updated envelopes, a new 13 KB image each time (numbered from `first`: each phase its own, so no
    phase sends an image an earlier one sent, which pgqr would rightly drop as stale), round-robin over `names`."""
    i = 0
    while True:
        name = names[i % len(names)]
        yield json.dumps({"event": "qrcode.updated", "instance": name, "server_url": sim_url,
                          "data": {"qrcode": {"instance": name, "code": f"2@{first + i}",
                                              "base64": qr_image(first + i)}}}).encode()
        i += 1


def state_bodies(names: Sequence[str], repeats: int, state: str = "connecting") -> Iterator[bytes]:
    for _ in range(repeats):
        for name in names:
            yield json.dumps({"event": "connection.update", "instance": name,
                              "data": {"instance": name, "state": state, "statusReason": 200}}).encode()
