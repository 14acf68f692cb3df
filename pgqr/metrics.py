"""Prometheus metrics for one listener process (its own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.refreshes = Counter("pgqr_refreshes", "Polls by outcome and error class.", ["outcome", "error_class"],
                                 registry=r)
        self.api_latency = Histogram("pgqr_evolution_latency_seconds", "Evolution API /instance/connect latency.",
                                     buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16), registry=r)
        self.wakeups = Counter("pgqr_wakeups", "Wake-ups by source.", ["source"], registry=r)
        self.reconnects = Counter("pgqr_listener_reconnects", "LISTEN connection losses.", registry=r)
        self.webhooks = Counter("pgqr_webhooks", "Evolution webhooks received by event.", ["event"], registry=r)
        self.webhook_repeats = Counter("pgqr_webhook_repeats",
                                       "Webhooks that repeated the Evolution state pgqr holds (nothing written).",
                                       registry=r)
        self.webhook_rejections = Counter("pgqr_webhook_rejections",
                                          "Webhooks refused by reason (unauthorized, malformed, too large, unknown "
                                          "instance); nothing was written.", ["reason"], registry=r)
        self.listening = Gauge("pgqr_listening", "1 while the LISTEN connection delivers notifications.", registry=r)
        self.listen_degraded = Gauge("pgqr_listen_degraded",
                                     "1 while the listen connection does not deliver notifications (a pooler).",
                                     registry=r)
        self.in_flight = Gauge("pgqr_calls_in_flight", "Evolution calls in flight.", registry=r)
        self.waiting = Gauge("pgqr_waiting_instances", "Instances waiting for a QR (all replicas).", registry=r)
        self.qr_valid = Gauge("pgqr_qr_valid_instances",
                              "Waiting instances whose QR is within its estimated life.", registry=r)
        self.oldest_expired = Gauge("pgqr_qr_oldest_expired_seconds",
                                    "How long ago the oldest expired QR of a waiting instance expired.", registry=r)

        self.sweep_calls = Counter("pgqr_sweep_calls", "Evolution calls made by the state sweep, by route.",
                                   ["call"], registry=r)
        self.dropped = Gauge("pgqr_dropped_instances", "Connected instances that dropped in the alert window and "
                             "have not connected again (all replicas).", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
