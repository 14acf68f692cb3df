"""The bench's child processes: the Evolution simulator (`pgqr simulate`, driven through its /_sim control API),
`pgqr run` (optionally with its wall clock skewed by faketime) and one reconcile pass in a process of its own, so
that each peak RSS is pgqr's alone."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import glob
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from .. import devdb
from .options import LATENCY
from .report import vm_hwm_mb

# -- the simulator, as its own process ------------------------------------------------------------------------


class SimProcess:
    """`pgqr simulate` as a child; driven through its /_sim control API."""

    def __init__(self, proc: asyncio.subprocess.Process, base_url: str) -> None:
        self.proc = proc
        self.base_url = base_url
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))

    @classmethod
    async def start(cls, *, qr_ttl: float, latency: float = LATENCY, port: int = 0,
                    webhook_url: str | None = None) -> SimProcess:
        args = ["--port", str(port), "--instances", "0", "--qr-ttl", str(qr_ttl), "--latency", str(latency),
                "--connect-sleep", "2", "--seed", "14"]
        if webhook_url:
            args += ["--webhook-url", webhook_url]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pgqr", "simulate", *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        if "base_url=" not in line:
            proc.kill()
            raise RuntimeError(f"the simulator did not start: {line!r}")
        return cls(proc, line.split("base_url=", 1)[1].split()[0])

    async def bulk(self, count: int, prefix: str, state: str = "connecting",
                   phase: float | None = None) -> dict[str, str]:
        """`phase`: every socket started that many seconds ago (default: each on a random phase)."""
        body = {"count": count, "prefix": prefix, "state": state, **({} if phase is None else {"phase": phase})}
        async with self.http.post(f"{self.base_url}/_sim/instances/bulk", json=body) as resp:
            resp.raise_for_status()
            tokens: dict[str, str] = (await resp.json())["tokens"]
            return tokens

    async def current(self) -> dict[str, dict[str, Any]]:
        async with self.http.get(f"{self.base_url}/_sim/current") as resp:
            doc: dict[str, dict[str, Any]] = (await resp.json())["instances"]
            return doc

    async def stats(self) -> dict[str, dict[str, Any]]:
        async with self.http.get(f"{self.base_url}/_sim/stats") as resp:
            doc: dict[str, dict[str, Any]] = (await resp.json())["instances"]
            return doc

    async def stop(self) -> None:
        await self.http.close()
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


# -- pgqr run, as its own process -----------------------------------------------------------------------------


def faketime_env(skew: str) -> dict[str, str]:
    """The environment that runs one child with its wall clock `skew` off ("+20s", "-20s"): Debian's libfaketime
    preloaded directly. Not the `faketime` wrapper, which keeps a semaphore and a shared-memory segment named after
    its pid: a killed wrapper leaves them behind, and a later wrapper with the same pid then fails to start
    ("sem_open: File exists"). Only the wall clock moves: the monotonic clock, which asyncio's timers and pgqr's
    timeouts use, stays true, as on a host whose clock is merely set wrong. (With libfaketime 0.9.10 this makes a
    blocking time.sleep() fail with EINVAL; pgqr run never calls it, and the clock probe below checks asyncio's
    sleep.)"""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        raise RuntimeError("libfaketime is not installed (Debian's faketime package; make test installs it)")
    return {"LD_PRELOAD": found[0], "FAKETIME": skew, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def skewed_env(skew: int) -> dict[str, str]:
    """The environment that runs one child with its wall clock `skew` seconds off (0: none)."""
    return faketime_env(f"{skew:+d}s") if skew else {}


async def clock_probe(skew: int) -> dict[str, float]:
    """Under the same libfaketime setting as a skewed child: its wall clock's offset from ours, and what a 0.5 s
    asyncio.sleep lasts by its (shifted) wall clock and by its event loop's clock; both must say 0.5 s."""
    script = ("import asyncio, json, time\n"
              "async def main():\n"
              "    loop = asyncio.get_running_loop()\n"
              "    wall, mono = time.time(), loop.time()\n"
              "    print(wall, flush=True)\n"
              "    await asyncio.sleep(0.5)\n"
              "    print(json.dumps([time.time() - wall, loop.time() - mono]))\n"
              "asyncio.run(main())\n")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, env={**os.environ, **skewed_env(skew)},
                                                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    theirs = float(await proc.stdout.readline())
    offset = theirs - time.time()  # a pipe's delay late: a millisecond or so
    wall, mono = json.loads(await proc.stdout.readline())
    await proc.wait()
    return {"offset": offset, "sleep_by_wall": wall, "sleep_by_loop": mono}


class PgqrProcess:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, secret: str, log: Path) -> None:
        self.proc, self.port, self.secret, self.log = proc, port, secret, log

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/evolution/{self.secret}"

    @classmethod
    async def start(cls, dsn: str, evolution_url: str, workdir: Path, *, port: int | None = None,
                    secret: str | None = None, concurrency: int = 100, clock_skew: int = 0,
                    **extra: str) -> PgqrProcess:
        """`pgqr run` as a child; clock_skew: its wall clock that many seconds off (faketime), PostgreSQL's
        and the simulator's untouched."""
        port = port or devdb.free_port()
        secret = secret or secrets.token_urlsafe(16)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PGQR_", "EVOLUTION_", "DATABASE_URL"))}
        env.update(DATABASE_URL=dsn, EVOLUTION_API_URL=evolution_url, PGQR_HTTP_PORT=str(port),
                   PGQR_WEBHOOK_SECRET=secret, PGQR_CONCURRENCY=str(concurrency), **skewed_env(clock_skew), **extra)
        log = workdir / f"pgqr-run-{port}.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pgqr", "run", "--log-format", "json", env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT)
        child = cls(proc, port, secret, log)
        await child.wait_ready()
        return child

    async def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"pgqr run exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{self.port}/readyz") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise RuntimeError("pgqr run did not become ready")

    async def refreshes(self) -> int:
        """Polls this process has finished (its /metrics counter): no query that would load the database."""
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{self.port}/metrics") as resp:
            text = await resp.text()
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("pgqr_refreshes_total{")))

    async def clock_offset(self) -> float:
        """The child's wall clock minus ours, from its replies' Date headers (whole seconds, truncated: the
        largest of a few readings is the closest)."""
        readings = []
        async with aiohttp.ClientSession() as http:
            for _ in range(6):
                async with http.get(f"http://127.0.0.1:{self.port}/healthz") as resp:
                    ours = time.time()
                    readings.append(email.utils.parsedate_to_datetime(resp.headers["Date"]).timestamp() - ours)
                await asyncio.sleep(0.17)
        return max(readings)

    @property
    def pid(self) -> int:
        """pgqr's own process (with a skewed clock too: libfaketime is preloaded, there is no wrapper process)."""
        return self.proc.pid

    def peak_rss_mb(self) -> float:
        return vm_hwm_mb(self.pid)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            pid = self.pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                await self.proc.wait()


# -- one reconcile pass, in a child process of its own ----------------------------------------------------------


async def _reconcile(dsn: str, evolution_url: str, concurrency: int) -> dict[str, Any]:
    # only this child runs the engine: the bench's own process never loads it
    from .. import db
    from ..engine import Engine
    from ..evolution import EvolutionClient
    from ..service import owner_id
    from ..settings import Secret, Settings

    settings = Settings(database_url=Secret(dsn), evolution_api_url=Secret(evolution_url), concurrency=concurrency)
    pool = db.Pool(settings.dsn, size=3)  # what `pgqr refresh --once` opens
    await pool.open()
    client = EvolutionClient(timeout=settings.http_timeout, concurrency=settings.concurrency,
                             max_reply_bytes=settings.max_reply_bytes)
    engine = Engine(settings, pool, client, owner_id())
    try:
        started = time.perf_counter()
        summary = await engine.run_once()
        wall = time.perf_counter() - started
    finally:
        await engine.close()
        await client.close()
        await pool.close()
    doc = summary.as_json()
    del doc["results"]
    return {"wall": wall, **doc}


def reconcile_child(argv: Sequence[str]) -> int:
    """`python -m pgqr.bench reconcile DSN URL CONCURRENCY`: one pass; prints JSON with the peak RSS."""
    dsn, url, concurrency = argv[0], argv[1], int(argv[2])
    doc = asyncio.run(_reconcile(dsn, url, concurrency))
    doc["peak_rss_mb"] = vm_hwm_mb()
    print(json.dumps(doc))
    return 0


async def reconcile_in_child(dsn: str, evolution_url: str, concurrency: int) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgqr.bench", "reconcile", dsn, evolution_url, str(concurrency),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the reconcile child failed: {err.decode()[-2000:]}")
    doc: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return doc
