"""`pgqr bench`: the figures of the refresh engine, measured end to end with real processes.

Everything runs on this machine: a throwaway PostgreSQL with pg_cron (pgqr.devdb), the Evolution simulator as
its own process (`pgqr simulate`, pre-rendered ~13 KB images, 200 ms per call), and pgqr as child processes:
one reconcile pass (`refresh --once`'s engine) in a child of its own so its peak RSS is pgqr's alone, and
`pgqr run` for wake-ups, webhooks and freshness (also with that child's clock set 20 s ahead and 20 s behind, by
faketime: pgqr takes every time it compares from the database). Figures, not assertions: the tests assert
behaviour. Each figure carries the machine's 1-minute load average when it was taken: a shared machine's other
work lengthens tails. pgqr.bench_scale adds the database's own time per poll (pg_stat_statements), 100,000 rows,
replicas and an immediate stop of PostgreSQL; --quick skips the phases in FULL_ONLY.

    pgqr bench [--json PATH] [--instances 2000,10000] [--quick] [--freshness-seconds 180] [--phases a,b]
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import json
import os
import platform
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import psycopg

from . import bench_page, bench_scale, devdb, migrations, tables
from .db import image_md5

LATENCY = 0.2           # seconds per simulated Evolution call
SEQUENTIAL_SAMPLE = 50  # instances refreshed the old way (one call, one UPDATE and commit, one after another)
WAKE_INSERTS = 20
STORM_INSTANCES = 100
STORM_REPEATS = 30
HOOK_INSTANCES = 1000   # webhook targets: 500 a second spread over these
WEBHOOK_RATE = 500.0
IMAGE_BYTES = 13_600    # a real Evolution QR data URL (design.md)
IMAGES_ALONE, IMAGES_DURING, IMAGES_COLLIDING = 0, 10**8, 2 * 10**8  # each webhook phase's first image number
COLLISION_LEAD = 1.0    # seconds between making the polls due and the first of them falling due


@dataclass
class Figure:
    """One line of the table."""

    section: str
    measure: str
    value: str
    target: str = ""
    met: bool | None = None
    load: float = 0.0  # the machine's 1-minute load average when the figure was taken (the end of its phase)


@dataclass
class Report:
    machine: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(self, section: str, measure: str, value: str, target: str = "", met: bool | None = None) -> None:
        self.figures.append(Figure(section, measure, value, target, met, os.getloadavg()[0]))
        print(f"  {section}: {measure}: {value}" + (f" (target {target})" if target else ""), file=sys.stderr,
              flush=True)

    def table(self) -> str:
        head = ("section", "measure", "value", "target", "", "load")
        rows = [head] + [(f.section, f.measure, f.value, f.target,
                          "" if f.met is None else ("ok" if f.met else "MISSED"), f"{f.load:.2f}")
                         for f in self.figures]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        return "\n".join(tables.render([rows[0], tuple("-" * w for w in widths), *rows[1:]]))


# -- the machine -------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": model or platform.processor(), "load_at_start": os.getloadavg(),
            "python": platform.python_version()}


def vm_hwm_mb(pid: int | str = "self") -> float:
    """Peak resident set size of a live process (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def vm_rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"


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

    async def bulk(self, count: int, prefix: str, state: str = "connecting") -> dict[str, str]:
        async with self.http.post(f"{self.base_url}/_sim/instances/bulk",
                                  json={"count": count, "prefix": prefix, "state": state}) as resp:
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


def faketime_prefix(skew: int) -> tuple[list[str], dict[str, str]]:
    """The command prefix and environment that run one child with its wall clock `skew` seconds off (0: none).
    Only the wall clock moves: the monotonic clock, which asyncio's timers and pgqr's timeouts use, stays
    true, as on a host whose clock is merely set wrong. (With libfaketime 0.9.10 this setting makes a blocking
    time.sleep() fail with EINVAL; pgqr run never calls it, and the clock probe below checks asyncio's sleep.)"""
    if not skew:
        return [], {}
    return ["faketime", "-f", f"{skew:+d}s"], {"FAKETIME_DONT_FAKE_MONOTONIC": "1"}


async def clock_probe(skew: int) -> dict[str, float]:
    """Under the same faketime prefix as a skewed child: its wall clock's offset from ours, and what a 0.5 s
    asyncio.sleep lasts by its (shifted) wall clock and by its event loop's clock; both must say 0.5 s."""
    prefix, env = faketime_prefix(skew)
    script = ("import asyncio, json, time\n"
              "async def main():\n"
              "    loop = asyncio.get_running_loop()\n"
              "    wall, mono = time.time(), loop.time()\n"
              "    print(wall, flush=True)\n"
              "    await asyncio.sleep(0.5)\n"
              "    print(json.dumps([time.time() - wall, loop.time() - mono]))\n"
              "asyncio.run(main())\n")
    proc = await asyncio.create_subprocess_exec(*prefix, sys.executable, "-c", script, env={**os.environ, **env},
                                                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    theirs = float(await proc.stdout.readline())
    offset = theirs - time.time()  # a pipe's delay late: a millisecond or so
    wall, mono = json.loads(await proc.stdout.readline())
    await proc.wait()
    return {"offset": offset, "sleep_by_wall": wall, "sleep_by_loop": mono}


class PgqrProcess:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, secret: str, log: Path,
                 wrapped: bool = False) -> None:
        self.proc, self.port, self.secret, self.log, self.wrapped = proc, port, secret, log, wrapped

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
        prefix, faked = faketime_prefix(clock_skew)
        secret = secret or secrets.token_urlsafe(16)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PGQR_", "EVOLUTION_", "DATABASE_URL"))}
        env.update(DATABASE_URL=dsn, EVOLUTION_API_URL=evolution_url, PGQR_HTTP_PORT=str(port),
                   PGQR_WEBHOOK_SECRET=secret, PGQR_CONCURRENCY=str(concurrency), **faked, **extra)
        log = workdir / f"pgqr-run-{port}.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *prefix, sys.executable, "-m", "pgqr", "run", "--log-format", "json", env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT)
        child = cls(proc, port, secret, log, wrapped=bool(prefix))
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
        """pgqr's own process. faketime forks it and waits (then removes its shared memory) but does not pass
        signals on: a wrapped child is signalled itself, and the wrapper exits when it does."""
        if not self.wrapped:
            return self.proc.pid
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return int(children[0]) if children else self.proc.pid

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


# -- the database -------------------------------------------------------------------------------------------


class Db:
    """One bench database on the throwaway server."""

    def __init__(self, server: devdb.DevServer, name: str) -> None:
        self.server, self.name = server, name
        self.dsn = server.dsn(name)

    @classmethod
    def create(cls, server: devdb.DevServer, name: str, *, cron: bool = False) -> Db:
        with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        migrations.migrate(server.dsn(name))
        d = cls(server, name)
        d.set_cron(cron)
        return d

    def set_cron(self, active: bool) -> None:
        """pg_cron's jobs for this database on or off (off: no tick, no housekeeping in the figures)."""
        with psycopg.connect(self.server.dsn("postgres"), autocommit=True) as conn:
            conn.execute("UPDATE cron.job SET active = %s WHERE database = %s OR jobname LIKE %s",
                         (active, self.name, f"%@{self.name}"))

    async def connect(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)

    async def value(self, sql: str, params: Sequence[Any] = ()) -> Any:
        async with await self.connect() as conn:
            row = await (await conn.execute(sql.encode(), params)).fetchone()
            return row[0] if row else None

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        async with await self.connect() as conn:
            await conn.execute(sql.encode(), params)

    async def load(self, tokens: dict[str, str]) -> None:
        """The app's rows for these instances, as a bulk load does it (no trigger, no NOTIFY), then the sync a
        tick would run: they are due now, but nobody has been woken."""
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            await conn.execute("SET session_replication_role = replica")
            async with conn.cursor().copy("COPY public.evolution_instances (instance_name, instance_token, "
                                          "instance_status) FROM STDIN") as copy:
                for name, token in tokens.items():
                    await copy.write_row((name, token, "connecting"))
            await conn.execute("SET session_replication_role = origin")
            await conn.execute("SELECT pgqr.sync_instances()")
            await conn.commit()

    async def quiesce(self) -> None:
        """Before a WAL window: vacuum this database now, and wait until no autovacuum worker runs anywhere, so
        the window holds what the phase writes, not a cleanup that happens to fall into it."""
        async with await self.connect() as conn:
            await conn.execute("VACUUM (ANALYZE)")
            for _ in range(600):
                cur = await conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                                         "'autovacuum worker'")
                row = await cur.fetchone()
                if row and row[0] == 0:
                    return
                await asyncio.sleep(0.1)

    def drop(self) -> None:
        self.set_cron(False)
        with psycopg.connect(self.server.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'.encode())

    async def wal_lsn(self) -> int:
        return int(await self.value("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn"))

    async def wal_lsn_text(self) -> str:
        return str(await self.value("SELECT pg_current_wal_insert_lsn()::text"))

    def wal_by_kind(self, start: str, end: str, by: str = "rmgr") -> dict[str, int]:
        """Bytes of WAL between two LSNs by resource manager (pg_waldump --stats; by="record": by record type,
        Heap2/PRUNE, Heap/INSERT, ...): Heap, Btree, ... are writes to tables and indexes; Standby and
        Transaction records come from the server and other sessions."""
        if start == end:
            return {}
        out = subprocess.run([str(self.server.bindir / "pg_waldump"), f"--stats={by}", "-p",
                              str(self.server.datadir / "pg_wal"), "-s", start, "-e", end],
                             capture_output=True, text=True, check=False).stdout
        pct = r"\(\s*[\d.]+\)"
        row = re.compile(rf"^(\S+)\s+\d+\s+{pct}\s+\d+\s+{pct}\s+\d+\s+{pct}\s+(\d+)\s+{pct}")
        return {m[1]: int(m[2]) for line in out.splitlines() if (m := row.match(line)) and m[1] != "Total"}

    async def wait(self, sql: str, what: str, timeout: float, params: Sequence[Any] = ()) -> float:
        """Poll until `sql` returns true; the seconds it took."""
        started = time.monotonic()
        while not await self.value(sql, params):
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
            await asyncio.sleep(0.05)
        return time.monotonic() - started


# -- one reconcile pass, in a child process of its own ----------------------------------------------------------


async def _reconcile(dsn: str, evolution_url: str, concurrency: int) -> dict[str, Any]:
    from . import db
    from .engine import Engine
    from .evolution import EvolutionClient
    from .service import owner_id
    from .settings import Secret, Settings

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


# -- the old way ---------------------------------------------------------------------------------------------


async def sequential(d: Db, evolution_url: str, sample: dict[str, str]) -> float:
    """Seconds per instance the old Edge Function's way: one call, one UPDATE and commit, one after another."""
    async with aiohttp.ClientSession() as http, await psycopg.AsyncConnection.connect(d.dsn) as conn:
        started = time.perf_counter()
        for name, token in sample.items():
            async with http.get(f"{evolution_url}/instance/connect/{quote(name, safe='')}",
                                headers={"apikey": token}) as resp:
                body = await resp.json()
            await conn.execute("UPDATE public.evolution_instances SET qr_code = %s, last_qr_update = now() "
                               "WHERE instance_name = %s", (body.get("base64"), name))
            await conn.commit()
        return (time.perf_counter() - started) / len(sample)


# -- webhooks at a steady rate ---------------------------------------------------------------------------------


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


# -- the phases ----------------------------------------------------------------------------------------------


@dataclass
class Options:
    instances: tuple[int, ...] = (2000, 10000)
    quick: bool = False
    freshness_seconds: float = 180.0
    concurrency: int = 100
    latency: float = LATENCY
    freshness_instances: int = 1000
    phases: tuple[str, ...] = ()  # only these (PHASES' names); empty: every phase the run's size includes


# Each phase by name, in the order they run. --quick leaves out the full-only ones (each takes minutes) and
# samples freshness for 30 s: under 5 minutes.
PHASES = ("reconcile", "service", "page", "freshness", "skew", "scale", "replicas", "crash")
FULL_ONLY = ("skew", "scale", "replicas", "crash")


class Bench:
    def __init__(self, options: Options, server: devdb.DevServer, workdir: Path) -> None:
        self.o = options
        self.server = server
        self.workdir = workdir
        self.report = Report(machine())
        self.fresh_share: dict[str, float] = {}  # freshness by mode, without skew: what the skewed rows compare to

    def wants(self, phase: str) -> bool:
        if self.o.phases:
            return phase in self.o.phases
        return not (self.o.quick and phase in FULL_ONLY)

    async def run(self) -> Report:
        if self.o.quick and not self.o.phases:
            self.report.machine["skipped"] = list(FULL_ONLY)
            print(f"pgqr bench --quick: skipping the phases {', '.join(FULL_ONLY)} (the skewed-clock freshness, "
                  "100,000 rows, replicas and the immediate stop: the full bench runs them); freshness sampled "
                  f"{self.o.freshness_seconds:.0f} s", file=sys.stderr, flush=True)
        if self.wants("reconcile") or self.wants("service"):
            sim = await SimProcess.start(qr_ttl=3600, latency=self.o.latency)
            try:
                for n in self.o.instances if self.wants("reconcile") else ():
                    await self.reconcile(sim, n)
                if self.wants("service"):
                    await self.service_phases(sim)
            finally:
                await sim.stop()
        if self.wants("page"):
            await self.live_page()
        if self.wants("freshness"):
            await self.freshness("polling only")
        for skew in (20, -20) if self.wants("skew") else ():  # the same phase with the clock ahead, then behind
            await self.freshness("polling only", skew)
        if self.wants("freshness"):
            await self.freshness("with webhooks")
        for phase in ("scale", "replicas", "crash"):
            if self.wants(phase):
                try:
                    await getattr(bench_scale, phase)(self)
                except Exception as exc:  # one phase's failure must not cost the run's other figures
                    self.report.add(phase, "the phase failed", f"{type(exc).__name__}: {exc}"[:300], "", False)
        self.report.machine["load_at_end"] = os.getloadavg()
        return self.report

    async def reconcile(self, sim: SimProcess, n: int) -> None:
        r, c, lat = self.report, self.o.concurrency, self.o.latency
        d = Db.create(self.server, f"bench_reconcile_{n}")
        tokens = await sim.bulk(n, f"r{n}")
        await d.load(tokens)
        statements = await bench_scale.statements_reset(d)
        first = await reconcile_in_child(d.dsn, sim.base_url, c)
        spent = await bench_scale.statements_time(d) if statements else None
        ideal = n * lat / c
        eff = ideal / first["wall"]
        section = f"reconcile N={n:,}"
        r.raw[section] = first
        r.add(section, "outcome", f"{first['qr_stored']:,} QR stored, {first['failed']} failed, "
                                  f"{first['not_applied']} not applied")
        r.add(section, "wall / ideal (N x 200 ms / 100)", f"{first['wall']:.1f} s / {ideal:.1f} s")
        r.add(section, "efficiency (ideal / wall)", f"{eff:.2f}", ">= 0.9 at 10,000",
              eff >= 0.9 if n >= 10000 else None)
        r.add(section, "peak RSS of the pgqr process", f"{first['peak_rss_mb']:.0f} MiB", "<= 200 MB",
              first["peak_rss_mb"] * 1.048576 <= 200)
        if spent is not None:
            bench_scale.add_db_time(self, section, "first pass, a new QR each", spent, first["total_instances"], n,
                                    target=False)
        # the same instances again, nothing changed at Evolution: what does a pass cost the database?
        await d.execute("UPDATE pgqr.schedule SET due_at = now(), recent_polls = '{}' WHERE due_at IS NOT NULL")
        await d.quiesce()
        statements = statements and await bench_scale.statements_reset(d)
        before = await d.wal_lsn()
        second = await reconcile_in_child(d.dsn, sim.base_url, c)
        spent = await bench_scale.statements_time(d) if statements else None
        wal = await d.wal_lsn() - before
        r.raw[section + " unchanged"] = {**second, "wal_bytes": wal}
        r.add(section, "second pass, no QR changed: wall", f"{second['wall']:.1f} s "
                                                             f"({second['qr_unchanged']:,} unchanged)")
        r.add(section, "WAL per instance, no QR changed", f"{wal / n:,.0f} B")
        if spent is not None:
            bench_scale.add_db_time(self, section, "second pass, no QR changed", spent, second["total_instances"],
                                    n, target=True)
        sample = dict(list(tokens.items())[:SEQUENTIAL_SAMPLE])
        per = await sequential(d, sim.base_url, sample)
        r.add(section, f"sequential (old way), {SEQUENTIAL_SAMPLE} sampled, extrapolated",
              f"{per * n:,.0f} s ({ms(per)} each)")
        r.add(section, "speed-up over sequential", f"{per * n / first['wall']:.0f}x")
        d.drop()  # its autovacuum must not write into a later phase's WAL window

    async def live_page(self) -> None:
        """A webhook's QR on an open live page, and what 1,000 more open pages cost the sidecar."""
        d = Db.create(self.server, "bench_page")
        try:
            got = await bench_page.bench(d.dsn, 20, 100 if self.o.quick else 400, 200 if self.o.quick else 1000)
        finally:
            d.drop()
        r = self.report
        r.raw["live page"] = got
        r.add("live page", f"webhook QR -> new image in the page's stream, p50 / p99 ({got['rotations']} rotations)",
              f"{got['latency_ms_p50']} ms / {got['latency_ms_p99']} ms", "p99 <= 250 ms",
              got["latency_ms_p99"] <= 250)
        r.add("live page", f"sidecar memory per open stream ({got['streams']:,} more streams)",
              f"{got['kib_per_stream']} KiB")
        r.add("live page", "sidecar database connections before / after those streams",
              f"{got['db_connections_before']} / {got['db_connections_after']}", "unchanged",
              got["db_connections_before"] == got["db_connections_after"])

    async def service_phases(self, sim: SimProcess) -> None:
        """Wake-up, a connection.update storm, webhooks alone and during a large reconcile: `pgqr run`."""
        r = self.report
        d = Db.create(self.server, "bench_service")
        hooks = await sim.bulk(HOOK_INSTANCES, "hook")
        wake = await sim.bulk(WAKE_INSERTS, "wake")
        await d.load(hooks)
        # a heartbeat an hour apart: the storm's WAL figure is then the storm's alone
        pgqr = await PgqrProcess.start(d.dsn, sim.base_url, self.workdir, concurrency=self.o.concurrency,
                                       PGQR_HEARTBEAT_SECONDS="3600")
        try:
            await d.execute("SELECT pgqr.tick()")
            await d.wait("SELECT count(*) = 0 FROM pgqr.schedule WHERE last_poll_at IS NULL OR "
                         "lease_owner IS NOT NULL", "the first poll of every webhook target", 120)
            # quiet from here: nothing due for an hour, so only what a phase does explains what it measures
            await d.execute("UPDATE pgqr.schedule SET due_at = now() + interval '1 hour' WHERE due_at IS NOT NULL")
            await self.wake_up(d, sim, wake)
            # the new instances too: their polls must not write into the storm's WAL window
            await d.wait("SELECT count(*) = 0 FROM pgqr.schedule WHERE lease_owner IS NOT NULL",
                         "the wake-up instances' polls in flight", 60)
            await d.execute("UPDATE pgqr.schedule SET due_at = now() + interval '1 hour' WHERE due_at IS NOT NULL")
            await self.storm(d, pgqr, list(hooks)[:STORM_INSTANCES])
            # first of the webhook phases: each instance has then had the images a real one would have (its
            # polls' and one webhook's), not the dozens of made-up ones the later phases send, more than the 16 its
            # QR history keeps, after which the simulator's old image would no longer be known as replaced
            await self.webhooks_colliding(d, pgqr, list(hooks), sim.base_url)
            await self.webhooks_alone(d, pgqr, sim, list(hooks))
            await self.webhooks_during_reconcile(d, pgqr, sim, list(hooks))
            r.add("pgqr run", "peak RSS of `pgqr run` (all of the above)", f"{pgqr.peak_rss_mb():.0f} MiB",
                  "<= 200 MB", pgqr.peak_rss_mb() * 1.048576 <= 200)
        finally:
            await pgqr.stop()
            d.drop()

    async def wake_up(self, d: Db, sim: SimProcess, tokens: dict[str, str]) -> None:
        to_call: dict[str, float] = {}
        to_qr: list[float] = []
        inserted: dict[str, float] = {}
        arrived: dict[str, float] = {}

        async def receive(listen: psycopg.AsyncConnection[Any]) -> None:
            async for note in listen.notifies():
                arrived.setdefault(json.loads(note.payload).get("key"), time.monotonic())

        async with await d.connect() as listen, await d.connect() as conn:
            await listen.execute("LISTEN pgqr_qr_updated")
            receiver = asyncio.create_task(receive(listen))
            for name, token in tokens.items():
                cur = await conn.execute(
                    "INSERT INTO public.evolution_instances (instance_name, instance_token, instance_status) "
                    "VALUES (%s, %s, 'connecting') RETURNING id::text", (name, token))
                row = await cur.fetchone()
                inserted[name] = time.monotonic()  # autocommit: committed when execute returned
                assert row is not None
                deadline = time.monotonic() + 30
                while row[0] not in arrived and time.monotonic() < deadline:
                    await asyncio.sleep(0.002)
                if row[0] in arrived:
                    to_qr.append(arrived[row[0]] - inserted[name])
                await asyncio.sleep(0.2)
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
        stats = await sim.stats()
        for name in tokens:
            calls = stats[name]["recent_calls"]
            if calls:
                to_call[name] = min(calls) - inserted[name]
        calls_s = list(to_call.values())
        self.report.raw["wake_up"] = {"to_first_call": calls_s, "to_qr": to_qr}
        self.report.add("wake-up", f"INSERT -> first Evolution request, p50 / p99 ({len(calls_s)} inserts)",
                        f"{ms(pct(calls_s, 0.5))} / {ms(pct(calls_s, 0.99))}")
        self.report.add("wake-up", "INSERT -> QR committed (NOTIFY received), p50 / p99",
                        f"{ms(pct(to_qr, 0.5))} / {ms(pct(to_qr, 0.99))}")

    async def storm(self, d: Db, pgqr: PgqrProcess, names: list[str]) -> None:
        first = await blast(pgqr.webhook_url, state_bodies(names, 1), WEBHOOK_RATE, lambda i, t: i >= len(names))
        await asyncio.sleep(0.5)
        await d.quiesce()
        before, start = await d.wal_lsn(), await d.wal_lsn_text()
        repeats = len(names) * STORM_REPEATS
        shots = await blast(pgqr.webhook_url, state_bodies(names, STORM_REPEATS), WEBHOOK_RATE,
                            lambda i, t: i >= repeats)
        await asyncio.sleep(0.5)
        wal, kinds = await d.wal_lsn() - before, d.wal_by_kind(start, await d.wal_lsn_text(), by="record")
        # what the storm wrote; not the cleanup a read does on a page earlier phases left dead rows on (a
        # prune, a visibility-map bit: PostgreSQL's, whoever reads the page)
        data = sum(v for k, v in kinds.items() if k.split("/")[0] in ("Heap", "Heap2", "Btree", "Hash", "Sequence")
                   and k not in CLEANUP_RECORDS)
        ok = sum(s.status == 200 for s in shots)
        self.report.raw["storm"] = {"first": [s.status for s in first], "wal_bytes": wal, "ok": ok, "kinds": kinds}
        others = ", ".join(f"{k} {v} B" for k, v in sorted(kinds.items()) if v) or "none"
        self.report.add("webhooks", f"connection.update storm ({len(names)} x {STORM_REPEATS} repeats, {ok} "
                        "answered 200): WAL to tables and indexes per repeated event",
                        f"{data / repeats:.1f} B (all WAL in the window: {others})", "0", data == 0)

    async def _hook_rows(self, d: Db) -> int:
        return int(await d.value("SELECT count(*) FROM pgqr.refresh_log WHERE source = 'webhook'"))

    def _hook_figures(self, label: str, shots: list[Shot], logged: int) -> None:
        lat = [s.latency for s in shots]
        ok = sum(s.status == 200 for s in shots)
        p99 = pct(lat, 0.99)
        self.report.raw[f"webhooks {label}"] = {"sent": len(shots), "ok": ok, "logged": logged,
                                                "p50": pct(lat, 0.5), "p99": p99, "max": max(lat, default=0)}
        self.report.add("webhooks", f"{label}: received -> committed, p50 / p99 ({len(shots):,} at "
                        f"{WEBHOOK_RATE:.0f}/s)", f"{ms(pct(lat, 0.5))} / {ms(p99)}", "p99 <= 50 ms", p99 <= 0.05)
        self.report.add("webhooks", f"{label}: lost (sent - answered 200 - logged)",
                        f"{len(shots) - ok} not 200, {ok - logged} answered but not logged", "0",
                        len(shots) - ok == 0 and ok == logged)

    async def webhooks_alone(self, d: Db, pgqr: PgqrProcess, sim: SimProcess, names: list[str]) -> None:
        seconds = 5.0 if self.o.quick else 10.0
        before = await self._hook_rows(d)
        shots = await blast(pgqr.webhook_url, qr_bodies(names, sim.base_url, IMAGES_ALONE), WEBHOOK_RATE,
                            lambda i, t: t >= seconds)
        await asyncio.sleep(0.5)
        self._hook_figures("alone", shots, await self._hook_rows(d) - before)

    async def webhooks_during_reconcile(self, d: Db, pgqr: PgqrProcess, sim: SimProcess, names: list[str]) -> None:
        n = max(self.o.instances)
        tokens = await sim.bulk(n, "big")
        await d.load(tokens)
        polls_before = await pgqr.refreshes()
        hooks_before = await self._hook_rows(d)
        window: dict[str, float] = {}

        async def reconcile() -> None:
            await asyncio.sleep(1.0)
            window["start"] = time.perf_counter()
            await d.execute("SELECT pgqr.tick()")
            deadline = time.monotonic() + 600
            while await pgqr.refreshes() < polls_before + n and time.monotonic() < deadline:
                # a scrape is work for the process under measurement: four a second, not twenty (Prometheus
                # scrapes every 15 s); the wall is then known within a quarter of a second
                await asyncio.sleep(0.25)
            window["end"] = time.perf_counter()

        def stop(i: int, t: float) -> bool:
            return "end" in window

        shots, _ = await asyncio.gather(blast(pgqr.webhook_url, qr_bodies(names, sim.base_url, IMAGES_DURING),
                                              WEBHOOK_RATE, stop),
                                        reconcile())
        await asyncio.sleep(0.5)
        during = [s for s in shots if window["start"] <= s.sent_at <= window["end"]]
        self._hook_figures(f"during a {n:,}-instance reconcile", during, await self._hook_rows(d) - hooks_before
                           - (len(shots) - len(during)))
        wall = window["end"] - window["start"]
        self.report.add("webhooks", f"that reconcile's wall under webhooks (pgqr run; ideal "
                        f"{n * self.o.latency / self.o.concurrency:.0f} s)", f"{wall:.1f} s")

    async def webhooks_colliding(self, d: Db, pgqr: PgqrProcess, names: list[str], sim_url: str) -> None:
        """Each instance's qrcode.updated webhook sent at the moment its poll falls due (500 a second, in the
        order they fall due), so the engine claims, calls and writes back the very rows the webhooks write.
        Evolution does not retry a refused webhook for ever: none may be refused, and every one must be applied.
        Each webhook brings an image new to pgqr; each poll one the instance already had (the simulator's, from
        the first poll), so the webhook's image must be the one stored at the end."""
        r, label = self.report, "colliding with due polls"
        # quiet first: the reconcile's instances fall due again 45 s after their QR (pgqr's lifetime setting)
        await d.wait("SELECT count(*) = 0 FROM pgqr.schedule WHERE lease_owner IS NOT NULL",
                     "the polls in flight", 120)
        await d.execute("UPDATE pgqr.schedule SET due_at = now() + interval '1 hour' WHERE due_at IS NOT NULL")
        log_from = int(await d.value("SELECT coalesce(max(id), 0) FROM pgqr.refresh_log"))
        polls_from = await polls_counted(d)
        # names[i] falls due when the blast sends its webhook: first_due + i / rate. PostgreSQL runs on this
        # machine, so its clock and ours are the same clock.
        first_due = time.time() + COLLISION_LEAD
        await d.execute("UPDATE pgqr.schedule q SET due_at = to_timestamp(%s + (u.n - 1) / %s) "
                        "FROM pgqr.instance_state s, unnest(%s::text[]) WITH ORDINALITY AS u(name, n) "
                        "WHERE s.name = u.name AND q.key = s.key",
                        (first_due, WEBHOOK_RATE, names))
        await d.execute("SELECT pgqr.tick()")  # the wake-up: the engine then sleeps until the first due time
        await asyncio.sleep(max(0.0, first_due - time.time()))
        shots = await blast(pgqr.webhook_url, qr_bodies(names, sim_url, IMAGES_COLLIDING), WEBHOOK_RATE,
                            lambda i, t: i >= len(names))
        await d.wait("SELECT count(*) = 0 FROM pgqr.schedule WHERE lease_owner IS NOT NULL",
                     "the colliding polls", 60)
        await asyncio.sleep(0.5)

        refused = [s for s in shots if not 200 <= s.status < 300]
        recorded = sum(s.status == 200 and '"recorded": true' in s.reply for s in shots)
        async with await d.connect() as conn:
            cur = await conn.execute(
                "SELECT count(*) FILTER (WHERE source = 'webhook' AND written AND qr_updated), "
                "       count(*) FILTER (WHERE source = 'poll' AND qr_updated) "
                "FROM pgqr.refresh_log WHERE id > %s", (log_from,))
            row = await cur.fetchone()
            assert row is not None
            new_qr, polls_new_qr = row
            # the log keeps news only: the polls are counted in refresh_counts
            polls = await polls_counted(d) - polls_from
            # a collision proper: the webhook written after its instance's poll was claimed
            cur = await conn.execute(
                "SELECT count(*) FROM pgqr.refresh_log w JOIN pgqr.schedule q ON q.key = w.instance_key "
                "WHERE w.id > %s AND w.source = 'webhook' AND w.at >= q.last_poll_at", (log_from,))
            row = await cur.fetchone()
            in_flight = row[0] if row else 0
            cur = await conn.execute("SELECT name, qr_md5 FROM pgqr.instance_state WHERE name = ANY(%s)", (names,))
            stored = dict(await cur.fetchall())
        kept = sum(stored.get(name) == image_md5(qr_image(IMAGES_COLLIDING + i)) for i, name in enumerate(names))
        lat = [s.latency for s in shots]
        why = sorted({f"{s.status} {s.reply}" for s in refused})
        r.raw[f"webhooks {label}"] = {"sent": len(shots), "refused": len(refused), "refusals": why,
                                      "recorded": recorded, "new_qr_logged": new_qr, "stored_webhook_image": kept,
                                      "polls": polls, "polls_new_qr": polls_new_qr, "in_flight": in_flight,
                                      "p50": pct(lat, 0.5), "p99": pct(lat, 0.99)}
        r.add("webhooks", f"{label}: received -> committed, p50 / p99 ({len(shots):,} at {WEBHOOK_RATE:.0f}/s, "
              "each as its instance's poll fell due)", f"{ms(pct(lat, 0.5))} / {ms(pct(lat, 0.99))}",
              "p99 <= 50 ms", pct(lat, 0.99) <= 0.05)
        # a webhook written before the engine claims its instance moves that poll out to the safety cadence
        r.add("webhooks", f"{label}: polls made / webhooks written after their instance's poll was claimed",
              f"{polls:,} / {in_flight:,} of {len(shots):,}")
        r.add("webhooks", f"{label}: refused (answered other than 2xx)",
              f"{len(refused)}" + (f" ({'; '.join(why[:3])})" if why else ""), "0", not refused)
        r.add("webhooks", f"{label}: applied (answered recorded / new QR logged / its image stored at the end)",
              f"{recorded:,} / {new_qr:,} / {kept:,} of {len(shots):,}", "all",
              recorded == new_qr == kept == len(shots) == len(names))

    async def check_skew(self, section: str, pgqr: PgqrProcess, skew: int) -> None:
        """That the skewed child's clock is off by `skew` (its replies' Date headers), and that asyncio's timers
        keep true time under faketime (a probe under the same prefix): else the row would measure nothing."""
        offset = await pgqr.clock_offset()
        probe = await clock_probe(skew)
        self.report.raw[section + " clock"] = {"date_header_offset": offset, **probe}
        self.report.add(section, "sidecar clock - PostgreSQL's (its HTTP Date / a probe under faketime); "
                        "asyncio.sleep(0.5) there", f"{offset:+.0f} s / {probe['offset']:+.1f} s; "
                        f"{probe['sleep_by_loop']:.2f} s", f"{skew:+d} s; 0.50 s",
                        abs(offset - skew) <= 1.5 and abs(probe["offset"] - skew) <= 0.5
                        and abs(probe["sleep_by_loop"] - 0.5) <= 0.1)

    async def freshness(self, mode: str, skew: int = 0) -> None:
        """The share of time the stored QR is the one Evolution would accept. skew: `pgqr run`'s wall clock
        that many seconds off (PostgreSQL's and the simulator's stay true): pgqr dates every poll by its claim's
        database time, so the figure must not move."""
        r, o = self.report, self.o
        hooked = mode == "with webhooks"
        section = f"freshness, {mode}" + (f", sidecar clock {skew:+d} s" if skew else "")
        dbname = "bench_fresh_" + ("hooks" if hooked else "poll") + {0: "", 1: "_ahead", -1: "_behind"}[
            (skew > 0) - (skew < 0)]
        d = Db.create(self.server, dbname, cron=True)
        port = devdb.free_port()
        # the simulator needs the service's webhook URL and the service the simulator's: fix both ports first
        sim_port = devdb.free_port()
        pgqr_secret = secrets.token_urlsafe(16)
        hook_url = f"http://127.0.0.1:{port}/webhooks/evolution/{pgqr_secret}" if hooked else None
        sim = await SimProcess.start(qr_ttl=45, latency=o.latency, port=sim_port, webhook_url=hook_url)
        pgqr: PgqrProcess | None = None
        try:
            n = o.freshness_instances
            tokens = await sim.bulk(n, "fresh")
            await d.load(tokens)
            pgqr = await PgqrProcess.start(d.dsn, sim.base_url, self.workdir, port=port,
                                           secret=pgqr_secret,
                                           concurrency=o.concurrency, clock_skew=skew)
            if skew:
                await self.check_skew(section, pgqr, skew)
            await d.wait("SELECT count(*) = 0 FROM pgqr.instance_state WHERE waiting AND qr_md5 IS NULL",
                         "every instance's first QR", 120)
            await asyncio.sleep(45)  # one QR lifetime: the schedule has seen every instance rotate once
            calls_before = sum(s["connect_calls"] for s in (await sim.stats()).values())
            cost_from = await cost_point(d)
            started = time.monotonic()
            fresh = total = 0
            async with await d.connect() as conn:
                while time.monotonic() - started < o.freshness_seconds:
                    tick = time.monotonic()
                    current = await sim.current()
                    cur = await conn.execute("SELECT name, qr_md5 FROM pgqr.instance_state WHERE waiting")
                    stored = dict(await cur.fetchall())
                    for name, now in current.items():
                        if now["state"] == "connecting" and now["md5"]:
                            total += 1
                            fresh += stored.get(name) == now["md5"]
                    await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
            minutes = (time.monotonic() - started) / 60
            cost_to = await cost_point(d)
            calls = sum(s["connect_calls"] for s in (await sim.stats()).values()) - calls_before
            share = fresh / total if total else float("nan")
            target = 0.99 if hooked else 0.95
            r.raw[section] = {"fresh": fresh, "samples": total, "calls": calls, "minutes": minutes, "instances": n,
                              "clock_skew": skew}
            measure = (f"stored QR = Evolution's current ({n:,} instances, 45 s rotation, {o.freshness_seconds:.0f} s "
                       "sampled each second)")
            if not skew:
                self.fresh_share[mode] = share
                r.add(section, measure, f"{share:.1%}", f">= {target:.0%}", share >= target)
            else:  # within one point of the same phase without skew (a point below it at most), and the target
                floor = self.fresh_share.get(mode, target) - 0.01
                r.add(section, measure, f"{share:.1%}", f">= {target:.0%} and >= {floor:.1%}",
                      share >= target and share >= floor)
            r.add(section, "Evolution calls per instance per minute", f"{calls / n / minutes:.2f}")
            if not skew:
                day = 1000 / n * 1440 / minutes  # this window, scaled to 1,000 waiting instances and a day
                cost = {k: (cost_to[k] - cost_from[k]) * day for k in cost_to}
                r.raw[section + " cost"] = {"window": {k: cost_to[k] - cost_from[k] for k in cost_to},
                                            "per_1000_day": cost}
                r.add(section, "database cost per 1,000 waiting instances a day: WAL / refresh_log rows / "
                      "refresh_counts rows / disk growth",
                      f"{cost['wal'] / 1e9:.2f} GB / {cost['log_rows']:,.0f} / {cost['count_rows']:,.0f} / "
                      f"{cost['bytes'] / 1e6:,.0f} MB")
                if not hooked:
                    await pgqr.stop()
                    pgqr = None
                    wal = await edge_function_minute(d, list(tokens))
                    r.raw[section + " edge function"] = {"wal_per_instance_minute": wal}
                    r.add(section, "the once-a-minute Edge Function, measured the same way: WAL per 1,000 "
                          "waiting instances a day (it rewrites each row's 13 KB QR every minute, no log)",
                          f"{wal * 1000 * 1440 / 1e9:.2f} GB")
        finally:
            if pgqr is not None:
                await pgqr.stop()
            await sim.stop()
            d.drop()


async def cost_point(d: Db) -> dict[str, float]:
    """What pgqr has cost the database so far: WAL position, log and count rows, bytes on disk of pgqr's tables
    and the app's (with indexes and TOAST)."""
    async with await d.connect() as conn:
        cur = await conn.execute(
            "SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn, (SELECT count(*) FROM pgqr.refresh_log), "
            "(SELECT count(*) FROM pgqr.refresh_counts), "
            "(SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            " WHERE c.relkind = 'r' AND (n.nspname = 'pgqr' OR c.oid = 'public.evolution_instances'::regclass))")
        row = await cur.fetchone()
    assert row is not None
    return dict(zip(("wal", "log_rows", "count_rows", "bytes"), (float(v) for v in row), strict=True))


CLEANUP_RECORDS = ("Heap2/PRUNE", "Heap2/VACUUM", "Heap2/VISIBLE", "Heap2/FREEZE_PAGE", "Btree/DELETE",
                   "Btree/VACUUM", "Heap/INPLACE")


async def polls_counted(d: Db) -> int:
    """Every poll made so far (pgqr.refresh_counts counts each; the log keeps news only)."""
    return int(await d.value("SELECT coalesce(sum(results), 0) FROM pgqr.refresh_counts WHERE source = 'poll'"))


async def edge_function_minute(d: Db, names: list[str]) -> float:
    """WAL per instance of one run of the Edge Function pgqr replaces: one UPDATE per instance, in a sequential
    loop, writing a new 13 KB QR (random, as a PNG's base64 is to PostgreSQL's compression) whether or not it
    changed. pgqr's trigger does not fire for the QR column."""
    start = await d.wal_lsn()
    async with await psycopg.AsyncConnection.connect(d.dsn, autocommit=True) as conn:
        for name in names:
            image = "data:image/png;base64," + base64.b64encode(os.urandom(IMAGE_BYTES * 3 // 4)).decode()
            await conn.execute("UPDATE public.evolution_instances SET qr_code = %s WHERE instance_name = %s",
                               (image, name))
    return float(await d.wal_lsn() - start) / len(names)


def main(options: Options, json_path: str | None = None) -> int:
    with devdb.running(cron_database="postgres") as server, tempfile.TemporaryDirectory(prefix="pgqr-bench-") as w:
        started = time.monotonic()
        print(f"pgqr bench: PostgreSQL in {server.base}, {options}", file=sys.stderr, flush=True)
        report = asyncio.run(Bench(options, server, Path(w)).run())
        report.machine["minutes"] = round((time.monotonic() - started) / 60, 1)
    m = report.machine
    print(f"pgqr bench on {m['nproc']} x {m['cpu']}; load average at start {m['load_at_start'][0]:.2f}, at end "
          f"{m['load_at_end'][0]:.2f} (a shared machine: figures taken under load are pessimistic); "
          f"{m['minutes']} minutes" + (f"; skipped: {', '.join(m['skipped'])} (--quick)" if m.get("skipped") else ""))
    print(report.table())
    if json_path:
        doc = {"machine": m, "options": asdict(options), "figures": [asdict(f) for f in report.figures],
               "raw": report.raw}
        Path(json_path).write_text(json.dumps(doc, indent=2, default=str))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["reconcile"]:
        sys.exit(reconcile_child(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} reconcile DSN URL CONCURRENCY (pgqr bench runs this itself)")
