"""One instance's QR lifecycle (evolution-api.md sections 2, 5 and 9) as a pure state machine.

No I/O and no clock of its own: every step takes `now` (monotonic seconds) and returns the webhook events
Evolution would send, in Evolution's order. An instance's current QR is computed from time when asked (QR number
k of a socket appears at `anchor + (k - first) * ttl`), so 10,000 rotating instances cost nothing until
someone looks; only what must be pushed (webhooks) is scheduled, by the server.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .config import Mode, State
from .stats import CallLog

__all__ = ["Event", "Instance", "NotConnectedError", "Qr", "Session"]


class NotConnectedError(Exception):
    """Logout of an instance in `close` (Evolution answers 400)."""


@dataclass(frozen=True)
class Qr:
    serial: int  # the instance's n-th QR ever (never reset): picks its code and image, so consecutive ones differ
    count: int  # Evolution's `count` when it appeared
    pairing: bool  # a `number` was given: Evolution asks a new pairing code with every QR


@dataclass(frozen=True)
class Event:
    """A webhook event; a qrcode.updated with a `qr` gets its data (code, image) from the server."""

    name: str
    data: dict[str, Any] | None
    qr: Qr | None = None


@dataclass
class Session:
    """One Baileys socket's QRs: number `first` appears at `anchor`, then one every `ttl` seconds."""

    anchor: float
    first: int
    ttl: float
    number: str | None
    makes_qrs: bool = True  # False while flapping: no route to WhatsApp, so no QR ever comes

    def emitted(self, now: float) -> int:
        if not self.makes_qrs or now < self.anchor:
            return self.first - 1
        return self.first + math.floor((now - self.anchor) / self.ttl)

    def appears_at(self, k: int) -> float:
        return math.inf if not self.makes_qrs else self.anchor + (k - self.first) * self.ttl


@dataclass
class Instance:
    name: str
    token: str
    instance_id: str
    created_at: str
    mode: Mode = "normal"
    state: State = "close"
    count_base: int = 0  # `count` before the current session's QRs
    serial_base: int = 0  # QRs this instance made before the current session
    session: Session | None = None
    held: Qr | None = None  # the QR left in memory once its socket ended: a later connect may return it
    wuid: str | None = None
    profile_name: str | None = None
    webhook: dict[str, Any] | None = None  # the webhook/find row
    sockets_started: int = 0
    generation: int = 0  # bumped by every change that makes a scheduled push stale
    next_flap_at: float = math.inf
    calls: CallLog = field(default_factory=CallLog)
    # Evolution's database row (what fetchInstances lists): written on a QR, on open and on a final close or
    # logout, never by the silent closes of a reconnect loop, so it can lag the in-memory `state` (section 3)
    db_status: State = "close"
    disconnection_code: int | None = None
    disconnection_at: str | None = None

    # ---- reading (pure) ----

    def current_qr(self, now: float) -> Qr | None:
        """The QR Evolution holds in memory now (call settle() first so the limit has been applied)."""
        s = self.session
        if s is not None and (k := s.emitted(now)) > 0:
            return Qr(self.serial_base + k, self.count_base + k, s.number is not None)
        return self.held

    def count(self, now: float) -> int:
        return self.count_base + (self.session.emitted(now) if self.session is not None else 0)

    def next_qr_at(self, now: float) -> tuple[int, float] | None:
        """(k, when) of the next QR of this socket, or None when none will come."""
        s = self.session
        if s is None or not s.makes_qrs or self.state != "connecting":
            return None
        k = s.emitted(now) + 1
        return k, s.appears_at(k)

    def qr_number(self, k: int) -> Qr | None:
        """The k-th QR of the current socket (for a scheduled push)."""
        s = self.session
        return None if s is None else Qr(self.serial_base + k, self.count_base + k, s.number is not None)

    # ---- steps (each returns Evolution's webhook events, in order) ----

    def settle(self, now: float, limit: int) -> list[Event]:
        """Apply the QRCODE_LIMIT if the QR after the limit has come due: QRs 1..limit are shown, the next
        one trips it (qrcode.updated message, connection.update refused/428, then `close` with count 0)."""
        s = self.session
        if s is None or s.emitted(now) + self.count_base <= limit:
            return []
        self.serial_base += max(0, limit - self.count_base)
        self.count_base = 0
        self.session, self.held, self.state, self.db_status = None, None, "close", "close"
        self.generation += 1
        return [
            Event("qrcode.updated", {"message": "QR code limit reached, please login again", "statusCode": 500}),
            Event("connection.update", {
                "instance": self.name, "state": "refused", "statusReason": 428,
                "wuid": self.wuid, "profileName": self.profile_name, "profilePictureUrl": None,
            }),
        ]

    def start_socket(
        self, now: float, *, number: str | None, first_qr_delay: float, ttl: float, makes_qrs: bool = True
    ) -> list[Event]:
        """connectToWhatsapp: a new socket, `connecting`, its first QR after first_qr_delay."""
        self._end_session(now)
        self.sockets_started += 1
        self.state = "connecting"
        self.session = Session(now + first_qr_delay, 1, ttl, number, makes_qrs)
        if makes_qrs:
            self.db_status = "connecting"  # its first QR is written within first_qr_delay
        return [self._connecting()]

    def rotate(self, now: float, limit: int) -> list[Event]:
        """The next QR now (instead of at the end of the current one's life)."""
        events = self.settle(now, limit)
        s = self.session
        if s is None or not s.makes_qrs or self.state != "connecting":
            raise ValueError(f"instance {self.name!r} is {self.state}, not connecting")
        s.anchor, s.first = now, s.emitted(now) + 1
        self.generation += 1
        events += self.settle(now, limit)
        if self.session is None:
            return events
        qr = self.current_qr(now)
        return [*events, Event("qrcode.updated", None, qr)]

    def scan(self, now: float, wuid: str) -> list[Event]:
        """The user scans: pair-success, close 515, automatic reconnect: connecting, then open."""
        self._end_session(now)
        self.state, self.wuid, self.profile_name = "open", wuid, f"Sim {self.name}"
        self.db_status, self.disconnection_code, self.disconnection_at = "open", None, None
        opened = {
            "instance": self.name, "wuid": wuid, "profileName": self.profile_name,
            "profilePictureUrl": None, "state": "open", "statusReason": 200,
        }
        return [self._connecting(), Event("connection.update", opened)]

    def close(self, now: float, wall: str, reason: int = 401) -> list[Event]:
        """A final close (no reconnect). The old QR stays in memory (section 2 [INFERRED])."""
        self._end_session(now)
        self.state = "close"
        self._closed_in_db(wall, reason)
        return [self._status_closed(wall, reason), self._closed(reason)]

    def logout(self, now: float, wall: str) -> list[Event]:
        """DELETE /instance/logout: section 9's order: status.instance, logout.instance, connection.update."""
        if self.state == "close":
            raise NotConnectedError(self.name)
        self._end_session(now)
        self.state, self.wuid, self.profile_name = "close", None, None
        self._closed_in_db(wall, 401)
        return [self._status_closed(wall, 401), Event("logout.instance", None), self._closed(401)]

    def delete(self, now: float) -> list[Event]:
        """DELETE /instance/delete: instance.delete, then remove.instance (section 9)."""
        self._end_session(now)
        self.state = "close"
        return [
            Event("instance.delete", {"instanceName": self.name, "instanceId": self.instance_id}),
            Event("remove.instance", None),
        ]

    def flap(self, now: float, *, first_qr_delay: float, ttl: float) -> list[Event]:
        """One flip of the reconnect storm: `connecting` (with its webhook) <-> `close` (silent: a close that
        is followed by a reconnect sends no connection.update)."""
        if self.state == "connecting":
            self._end_session(now)
            self.state = "close"
            return []
        return self.start_socket(now, number=None, first_qr_delay=first_qr_delay, ttl=ttl, makes_qrs=False)

    # ---- helpers ----

    def _end_session(self, now: float) -> None:
        s = self.session
        if s is not None:
            k = s.emitted(now)
            if k > 0:
                self.held = Qr(self.serial_base + k, self.count_base + k, s.number is not None)
            self.serial_base += k
            self.count_base += k
            self.session = None
        self.generation += 1

    def _closed_in_db(self, wall: str, reason: int) -> None:
        self.db_status, self.disconnection_code, self.disconnection_at = "close", reason, wall

    def _connecting(self) -> Event:
        return Event("connection.update", {"instance": self.name, "state": "connecting", "statusReason": 200})

    def _closed(self, reason: int) -> Event:
        return Event("connection.update", {"instance": self.name, "state": "close", "statusReason": reason})

    def _status_closed(self, wall: str, reason: int) -> Event:
        return Event("status.instance", {
            "instance": self.name, "status": "closed", "disconnectionAt": wall,
            "disconnectionReasonCode": reason,
            "disconnectionObject": json.dumps({"error": {"output": {"statusCode": reason}}}),
        })
