"""Prometheus metrics for one listener process (its own registry, so tests can run several)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from .reconcile import Summary


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.refreshes = Counter(
            "pgqr_refreshes", "Refresh attempts by outcome and error class.", ["outcome", "error_class"],
            registry=self.registry,
        )
        self.api_latency = Histogram(
            "pgqr_evolution_latency_seconds", "Evolution API /instance/connect latency.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16), registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "pgqr_reconcile_seconds", "Duration of one reconcile (claim, calls, write-back).",
            registry=self.registry,
        )
        self.wakeups = Counter("pgqr_wakeups", "Reconcile wake-ups by source.", ["source"], registry=self.registry)
        self.reconnects = Counter("pgqr_listener_reconnects", "LISTEN connection losses.", registry=self.registry)
        self.webhooks = Counter("pgqr_webhooks", "Evolution webhooks received by event.", ["event"],
                                registry=self.registry)
        self.listening = Gauge("pgqr_listening", "1 while the LISTEN connection is healthy.", registry=self.registry)

    def observe(self, summary: Summary, seconds: float) -> None:
        self.reconcile_seconds.observe(seconds)
        for r in summary.results:
            self.refreshes.labels(r.outcome, r.error_class or "").inc()
            if r.latency_ms:
                self.api_latency.observe(r.latency_ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
