"""The Simulator: instances, the clock that moves them, and the surface tests and the demo drive.

It wires the parts: lifecycle (pure state machine), images (the QR pool), webhooks (delivery), scheduler (the
one timer), and the HTTP routes (routes.py for Evolution's API, control.py for /_sim).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from . import control, routes
from .config import FAULT_MODES, MODES, STATES, Mode, SimConfig, State
from .images import PoolImage, baileys_code, image_pool, pairing_code
from .lifecycle import Event, Instance, Qr
from .scheduler import Due, Scheduler
from .stats import InstanceStats
from .webhooks import WebhookDelivery, Webhooks, now_iso

__all__ = ["Simulator"]


class Simulator:
    """One in-memory Evolution API server."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.base_url = ""
        self.instances: dict[str, Instance] = {}
        self.stopping = asyncio.Event()  # releases hanging fault-injected calls
        self._rng = random.Random(config.seed)
        self._images: tuple[PoolImage, ...] = image_pool(config.image_pool)  # rendered once per process
        self._hooks = Webhooks(config, lambda: self.base_url)
        self._scheduler = Scheduler(self._on_due, self._on_idle)
        self._scheduled: dict[str, tuple[int, int]] = {}  # name -> (generation, k) of its live heap entry
        self._seen_global_url = config.global_webhook_url
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[routes.not_found_middleware])
        routes.add_routes(self.app, self)
        control.add_routes(self.app, self)

    # ---- recorded webhooks ----

    @property
    def webhooks(self) -> deque[WebhookDelivery]:
        """Recent delivery attempts, oldest first (at most config.webhook_record_limit)."""
        return self._hooks.deliveries

    @property
    def webhook_failures(self) -> int:
        return self._hooks.failures

    async def wait_for_webhooks(
        self, predicate: Callable[[WebhookDelivery], bool], n: int = 1, timeout: float = 5.0
    ) -> list[WebhookDelivery]:
        """Wait until at least n recorded deliveries match; for tests and the demo."""
        deadline = time.monotonic() + timeout
        while True:
            found = [d for d in self.webhooks if predicate(d)]
            if len(found) >= n:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(found)} of {n} matching webhooks arrived")
            await asyncio.sleep(0.01)

    # ---- control surface (tests, demo, /_sim) ----

    def add_instance(
        self, name: str, token: str | None = None, *, state: State = "close", mode: Mode = "normal",
        phase: float = 0.0,
    ) -> str:
        """Create an instance as if it were in Evolution's DB and memory; returns its token. A `connecting`
        instance's socket started `phase` seconds ago (so many instances rotate each on its own phase)."""
        if name in self.instances:
            raise ValueError(f"instance {name!r} already exists")
        if state not in STATES or mode not in MODES:
            raise ValueError(f"state must be one of {STATES}, mode one of {MODES}")
        inst = Instance(name, token or self._uuid().upper(), self._uuid(), now_iso(), mode)
        self.instances[name] = inst
        if state == "connecting":
            self.start_socket(inst, None, started=time.monotonic() - phase)
        elif state == "open":
            inst.state, inst.wuid, inst.profile_name = "open", self._wuid(), f"Sim {name}"
            inst.db_status = "open"
        if mode == "flapping":
            self._start_flapping(inst)
        return inst.token

    def add_instances(
        self, count: int, *, prefix: str = "sim", start: int = 1, state: State = "close", mode: Mode = "normal",
        phase: float | None = None,
    ) -> dict[str, str]:
        """`count` instances named PREFIX-00001 ...; connecting ones on random phases, or all on `phase`.
        Returns name -> token."""
        return {
            name: self.add_instance(name, state=state, mode=mode,
                                    phase=self._rng.uniform(0, self.config.qr_ttl) if phase is None else phase)
            for name in (f"{prefix}-{i:05d}" for i in range(start, start + count))
        }

    def scan(self, name: str) -> None:
        """The user scans the QR: Baileys restarts (515), reconnects and opens."""
        inst = self.get(name)
        if inst.state != "open":
            self._apply(inst, inst.scan(time.monotonic(), self._wuid()))

    def rotate(self, name: str) -> None:
        """Emit the next QR now and restart the rotation timer (instead of waiting qr_ttl)."""
        inst = self.get(name)
        self._apply(inst, inst.rotate(time.monotonic(), self.config.qrcode_limit))

    def close_instance(self, name: str, status_reason: int = 401) -> None:
        """A final close (no reconnect), e.g. the phone unlinked the device."""
        inst = self.get(name)
        self._apply(inst, inst.close(time.monotonic(), now_iso(), status_reason))

    def set_mode(self, name: str, mode: Mode) -> None:
        """Change how one instance answers (a fault, flapping, not_in_memory ...), from its next call on."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        inst = self.get(name)
        was, inst.mode = inst.mode, mode
        if mode == "flapping" and was != "flapping":
            self._start_flapping(inst)

    def reload(self, name: str) -> None:
        """Evolution (re)loaded the instance after a restart: it answers normally again and, like 2.3.6 at boot,
        reconnects it (section 9)."""
        inst = self.get(name)
        inst.mode = "normal"
        if inst.state != "open":
            self.start_socket(inst, None)

    def stats(self, name: str) -> InstanceStats:
        inst = self.get(name)
        self.settle(inst)
        c = inst.calls
        return InstanceStats(
            c.connect_calls, c.max_concurrent_connects, inst.sockets_started, inst.count(time.monotonic()),
            inst.state, c.state_calls, c.max_concurrent_calls, tuple(c.recent), inst.mode,
        )

    def token(self, name: str) -> str:
        return self.get(name).token

    def current(self) -> dict[str, dict[str, Any]]:
        """For every instance: its state and the md5 of the `base64` Evolution would return now (or None)."""
        now = time.monotonic()
        out: dict[str, dict[str, Any]] = {}
        for inst in self.instances.values():
            self.settle(inst, now)
            qr = inst.current_qr(now) if inst.state == "connecting" else None
            md5 = self._image(inst, qr).md5 if qr is not None else None
            out[inst.name] = {"state": inst.state, "md5": md5, "count": inst.count(now)}
        return out

    @property
    def pending_pushes(self) -> int:
        """Instances with a step in the scheduler (a QR to post, a flip): none without webhooks or flapping."""
        return len(self._scheduled)

    def get(self, name: str) -> Instance:
        try:
            return self.instances[name]
        except KeyError:
            raise KeyError(f"no instance {name!r}") from None

    # ---- serving ----

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 picks a free port); returns the base URL."""
        self.stopping.clear()
        self._hooks.start()
        self._scheduler.start()
        for inst in self.instances.values():  # instances added before start
            self._schedule(inst)
        self._runner = web.AppRunner(self.app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in str(bound_host) else str(bound_host)
        self.base_url = f"http://{shown}:{bound_port}"
        return self.base_url

    async def stop(self) -> None:
        self.stopping.set()
        await self._scheduler.stop()
        self._scheduled.clear()
        await self._hooks.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- Evolution's operations (used by routes.py) ----

    def settle(self, inst: Instance, now: float | None = None) -> None:
        """Bring an instance up to date (the QRCODE_LIMIT may have tripped since it was last looked at)."""
        self._send(inst, inst.settle(time.monotonic() if now is None else now, self.config.qrcode_limit))

    def start_socket(self, inst: Instance, number: str | None, *, started: float | None = None) -> None:
        now = time.monotonic() if started is None else started
        # A flapping instance has no route to WhatsApp: its sockets never make a QR.
        self._apply(inst, inst.start_socket(now, number=number, first_qr_delay=self.config.first_qr_delay,
                                            ttl=self.config.qr_ttl, makes_qrs=inst.mode != "flapping"))

    def roll(self) -> float:
        """A draw for the whole-simulator fault rates (config.error_rate, config.timeout_rate)."""
        return self._rng.random()

    def connect_sleep(self) -> float:
        low, high = self.config.connect_sleep, self.config.connect_sleep_max
        return low if high is None or high <= low else self._rng.uniform(low, high)

    def qr_body(self, inst: Instance) -> dict[str, Any]:
        """The connect reply's QR getter: {pairingCode, code, base64, count}, or just {count} before a QR."""
        now = time.monotonic()
        self.settle(inst, now)
        qr = inst.current_qr(now)
        count = inst.count(now)
        if qr is None:
            return {"count": count}
        return {**self._qr_fields(inst, qr), "count": count}

    def logout(self, inst: Instance) -> None:
        self._apply(inst, inst.logout(time.monotonic(), now_iso()))

    def delete(self, inst: Instance) -> None:
        self._send(inst, inst.delete(time.monotonic()))
        del self.instances[inst.name]
        self._scheduled.pop(inst.name, None)

    def webhook_changed(self, inst: Instance) -> None:
        """A webhook was set: rotations of this instance may now have somewhere to go."""
        self._schedule(inst)

    def is_global_key(self, key: str) -> bool:
        return routes.same_secret(key, self.config.api_key)

    def new_uuid(self) -> str:
        return self._uuid()

    def fault(self, inst: Instance) -> Mode | None:
        return inst.mode if inst.mode in FAULT_MODES else None

    # ---- pushes: the scheduler ----

    def _schedule(self, inst: Instance) -> None:
        """Push the instance's next due step, if anything will have to be posted or flipped at that time."""
        if inst.mode == "flapping":
            self._push(inst, inst.next_flap_at, 0)
            return
        nxt = inst.next_qr_at(time.monotonic())
        if nxt is not None and self._hooks.wanted(inst):
            k, when = nxt
            self._push(inst, when, k)

    def _push(self, inst: Instance, when: float, k: int) -> None:
        key = (inst.generation, k)
        if self._scheduled.get(inst.name) != key:
            self._scheduled[inst.name] = key
            self._scheduler.at(when, inst.name, inst.generation, k)

    def _on_due(self, due: Due, now: float) -> None:
        inst = self.instances.get(due.name)
        if inst is None or self._scheduled.get(due.name) != (due.generation, due.k):
            return  # stale: the instance changed after this was pushed
        del self._scheduled[due.name]
        if due.k == 0:
            self._flip(inst, now)
        else:
            tripped = inst.settle(now, self.config.qrcode_limit)
            qr = inst.qr_number(due.k)
            self._send(inst, tripped or ([Event("qrcode.updated", None, qr)] if qr is not None else []))
        self._schedule(inst)

    def _on_idle(self) -> None:
        # The global webhook may be set after instances started rotating (tests and the demo do): from then on
        # their rotations must be pushed too.
        url = self.config.global_webhook_url
        if url != self._seen_global_url:
            self._seen_global_url = url
            for inst in self.instances.values():
                self._schedule(inst)

    def _start_flapping(self, inst: Instance) -> None:
        inst.next_flap_at = time.monotonic()
        self._schedule(inst)

    def _flip(self, inst: Instance, now: float) -> None:
        if inst.mode != "flapping":
            return
        low, high = self.config.flaps_per_minute
        # one flip to `connecting` (with its webhook) and one back per cycle
        inst.next_flap_at = now + 30.0 / self._rng.uniform(low, high)
        self._send(inst, inst.flap(now, first_qr_delay=self.config.first_qr_delay, ttl=self.config.qr_ttl))

    # ---- helpers ----

    def _apply(self, inst: Instance, events: Iterable[Event]) -> None:
        """Post what a step of the instance sent, and push its next due step."""
        self._send(inst, events)
        self._schedule(inst)

    def _send(self, inst: Instance, events: Iterable[Event]) -> None:
        for event in events:
            data = event.data
            if event.qr is not None:
                data = {"qrcode": {"instance": inst.name, **self._qr_fields(inst, event.qr)}}
            self._hooks.emit(inst, event.name, data)

    def _qr_fields(self, inst: Instance, qr: Qr) -> dict[str, Any]:
        seed = f"{inst.instance_id}/{qr.serial}".encode()
        return {
            # With a number Evolution asks for a fresh pairing code on every rotation.
            "pairingCode": pairing_code(seed) if qr.pairing else None,
            "code": baileys_code(seed),
            "base64": self._image(inst, qr).data_url,
        }

    def _image(self, inst: Instance, qr: Qr) -> PoolImage:
        # Consecutive serials pick consecutive pool images, so an instance's next QR always looks different.
        offset = int(inst.instance_id[:8], 16)
        return self._images[(offset + qr.serial) % len(self._images)]

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def _wuid(self) -> str:
        return f"5511{self._rng.randrange(10**8, 10**9)}@s.whatsapp.net"
