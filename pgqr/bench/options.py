"""What `pgqr bench` may be asked to run: its options and its phases by name.

The CLI parses --phases against PHASES before any bench code loads (the bench imports the simulator, an optional
extra), so this module imports nothing from pgqr and nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass

LATENCY = 0.2           # seconds per simulated Evolution call


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
PHASES = ("reconcile", "service", "page", "sweep", "freshness", "skew", "scale", "replicas", "crash")
FULL_ONLY = ("skew", "scale", "replicas", "crash")
