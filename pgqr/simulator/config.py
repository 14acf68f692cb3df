"""The simulator's settings and the names of its states and modes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["FAULT_MODES", "MODES", "STATES", "Mode", "SimConfig", "State"]

State = Literal["close", "connecting", "open"]
# How one instance answers. "normal" is Evolution at rest; "not_in_memory" is a DB row Evolution has not
# (re)loaded yet (it ends with a reload, section 9); "empty_reply" is v1.8's controller error; "license" is
# 2.4.0-rc's 503; "flapping" is the close <-> connecting storm with no route to WhatsApp (section 9).
# The rest are faults, for the client's tests: each answers every call to the instance's routes after the guards.
Mode = Literal[
    "normal", "not_in_memory", "empty_reply", "license", "flapping",
    "hang", "http_500", "html_502", "garbage_json", "huge_body", "slow_drip", "reset",
]
STATES: tuple[State, ...] = get_args(State)
MODES: tuple[Mode, ...] = get_args(Mode)
FAULT_MODES: frozenset[Mode] = frozenset(MODES[MODES.index("hang") :])


@dataclass
class SimConfig:
    """Read live: a test may change a field while the simulator runs (it takes effect at the next use)."""

    api_key: str = "pgqr-simulator-key"
    qr_ttl: float = 45.0  # every QR lives 45 s under Evolution's qrTimeout (section 5)
    # The controller's sleep after starting a socket in `close`. Evolution 2.3.6 measured 2 to 8 s (section 9):
    # set connect_sleep_max to draw each sleep from [connect_sleep, connect_sleep_max].
    connect_sleep: float = 2.0
    connect_sleep_max: float | None = None
    first_qr_delay: float = 0.5  # socket start -> first QR
    qrcode_limit: int = 30
    latency: float = 0.0  # added to every Evolution reply (not to /_sim)
    error_rate: float = 0.0  # fraction of connect calls answered 500, any instance
    timeout_rate: float = 0.0  # fraction of connect calls that hang for hang_seconds, any instance
    hang_seconds: float = 30.0  # also how long the "hang" mode holds a call
    flaps_per_minute: tuple[float, float] = (20.0, 30.0)  # "flapping": connecting webhooks a minute, drawn once
    huge_body_bytes: int = 50 * 1024 * 1024  # "huge_body": streamed in chunks, never held in memory
    drip_interval: float = 0.5  # "slow_drip": seconds between bytes
    expose_token_in_webhook: bool = True
    global_webhook_url: str | None = None
    global_webhook_by_events: bool = False
    webhook_timeout: float = 5.0
    webhook_workers: int = 32  # concurrent webhook POSTs; one instance's events still go out in order
    webhook_record_limit: int = 20_000  # deliveries kept in Simulator.webhooks (oldest dropped)
    image_pool: int = 64  # QR images rendered once per process and reused in turn
    seed: int | None = None
