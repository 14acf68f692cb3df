"""An in-memory Evolution API simulator, faithful to evolution-api.md.

Used by the tests, by `pgqr demo`, by benchmarks and by users via `pgqr simulate`. It serves the routes pgqr
touches with Evolution's bodies and guard order, rotates QR codes as Baileys does under Evolution's settings
(computed from time, so 10,000 instances cost nothing until asked), posts v2 webhook envelopes, and can misbehave
per instance on request. A small unauthenticated control API under /_sim drives it; bind it to loopback only.

    config.py     SimConfig, the State and Mode names
    lifecycle.py  one instance's QR lifecycle: a pure state machine over time
    images.py     Baileys-like QR strings and the pool of PNG data URLs, rendered once
    stats.py      per-instance call counts, concurrency and recent call times
    scheduler.py  the one timer (a heap) for what must be pushed
    webhooks.py   webhook rows and delivery (a worker pool, in order per instance)
    replies.py    Evolution's reply bodies
    faults.py     replies a healthy Evolution never sends (hang, 502 page, 50 MB, reset ...)
    surface.py    what the routes need of the simulator (Protocols), so they never import server.py
    routes.py     Evolution's HTTP routes
    control.py    the /_sim control API
    server.py     Simulator: wires the parts; the surface tests drive
    cli.py        `pgqr simulate`

The package needs the `sim` extra (segno) only when a Simulator is built.
"""

from .config import FAULT_MODES, MODES, STATES, Mode, SimConfig, State
from .server import Simulator
from .stats import InstanceStats
from .webhooks import WebhookDelivery

__all__ = [
    "FAULT_MODES",
    "MODES",
    "STATES",
    "InstanceStats",
    "Mode",
    "SimConfig",
    "Simulator",
    "State",
    "WebhookDelivery",
]
