"""One reconcile: claim due instances -> call Evolution concurrently -> one batched write-back -> summary.

Idempotent and safe to run from several replicas at once: the rows are re-read every time and every
instance is leased before any HTTP call (see pgqr.claim in sql/0003_refresh.sql).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from . import db
from .config import Settings
from .evolution import Connected, EvolutionClient, Failure, NoQrYet, QrCode, Reply

log = logging.getLogger("pgqr.reconcile")


@dataclass(frozen=True)
class InstanceResult:
    """What happened to one instance, as `pgqr refresh --once --json` reports it."""

    instance_name: str
    success: bool
    qr_updated: bool
    outcome: str
    status: str | None
    error_class: str | None
    http_status: int | None
    latency_ms: float | None
    detail: str | None


@dataclass
class Summary:
    results: list[InstanceResult]

    @property
    def failed(self) -> int:
        return sum(not r.success for r in self.results)

    def as_json(self) -> dict[str, Any]:
        refreshed = len(self.results) - self.failed
        return {
            "success": self.failed == 0,
            "total_instances": len(self.results),
            "refreshed": refreshed,
            "failed": self.failed,
            "results": [asdict(r) for r in self.results],
        }


def to_result(claimed: db.Claimed, reply: Reply) -> db.Result:
    """Map a client outcome to the write path's record."""
    common: dict[str, Any] = {
        "instance_name": claimed.instance_name,
        "source": "poll",
        "latency_ms": round(reply.latency_ms, 2),
        "claimed_at": claimed.claimed_at,
    }
    outcome = reply.outcome
    if isinstance(outcome, QrCode) and not db.storable(outcome.base64, outcome.pairing_code):
        return db.Result(outcome="failed", http_status=outcome.http_status, error_class="bad_reply",
                         transient=False, **common)
    if isinstance(outcome, QrCode):
        unchanged = hashlib.md5(outcome.base64.encode()).hexdigest() == claimed.qr_md5
        return db.Result(
            outcome="qr", qr=None if unchanged else outcome.base64, pairing_code=outcome.pairing_code,
            qr_count=outcome.count, http_status=outcome.http_status, **common,
        )
    if isinstance(outcome, NoQrYet):
        return db.Result(outcome="no_qr", qr_count=outcome.count, http_status=outcome.http_status, **common)
    if isinstance(outcome, Connected):
        return db.Result(outcome="connected", http_status=outcome.http_status, **common)
    return db.Result(
        outcome="failed", http_status=outcome.http_status, error_class=outcome.error_class,
        transient=outcome.transient, **common,
    )


class Reconciler:
    """Claims and refreshes instances for one owner (a listener process, or `pgqr refresh --once`)."""

    def __init__(self, settings: Settings, client: EvolutionClient, owner: str) -> None:
        self.settings = settings
        self.client = client
        self.owner = owner

    async def run(self, conn: db.AsyncConn, should_stop: Callable[[], bool] = lambda: False) -> Summary:
        """Refresh every due instance once; loops over claim batches until none is left, or until
        should_stop() says the process is shutting down (the batch in flight still completes)."""
        summary = Summary([])
        plan = await db.claim_plan(conn)
        batch = self.batch_size(plan.claim_batch, plan.lease_seconds)
        while not should_stop():
            claimed = await db.claim(conn, self.owner, batch, plan.horizon)
            if not claimed:
                break
            summary.results += await self._refresh(conn, claimed)
            if len(claimed) < batch:
                break
        return summary

    def batch_size(self, claim_batch: int, lease_seconds: float) -> int:
        """No more than the calls that surely finish within the lease: a claimed instance waits for a
        free connection slot, and a lease that runs out before its call lets another replica call too."""
        waves = max(1, int(lease_seconds // (self.settings.http_timeout * 1.5)))
        return max(1, min(claim_batch, self.settings.concurrency * waves))

    async def _refresh(self, conn: db.AsyncConn, claimed: list[db.Claimed]) -> list[InstanceResult]:
        replies = await asyncio.gather(*(self._call(c) for c in claimed))
        results = [to_result(c, r) for c, r in zip(claimed, replies, strict=True)]
        recorded = await db.record_results(conn, self.owner, results)
        by_name = {r.instance_name: r for r in recorded}
        out = []
        for claim_, reply, result in zip(claimed, replies, results, strict=True):
            rec = by_name.get(claim_.instance_name)
            detail = reply.outcome.detail if isinstance(reply.outcome, Failure) else None
            out.append(InstanceResult(
                instance_name=claim_.instance_name,
                success=result.outcome != "failed",
                qr_updated=bool(rec and rec.qr_updated),
                outcome=result.outcome,
                status=rec.status if rec else None,
                error_class=result.error_class,
                http_status=result.http_status,
                latency_ms=result.latency_ms,
                detail=detail,
            ))
            log.info(
                "refreshed %s: %s", claim_.instance_name, detail or result.outcome,
                extra={"action": "refresh", "instance": claim_.instance_name, "outcome": result.outcome,
                       "error_class": result.error_class, "http_status": result.http_status,
                       "latency_ms": result.latency_ms, "qr_updated": bool(rec and rec.qr_updated)},
            )
        return out

    async def _call(self, claimed: db.Claimed) -> Reply:
        base = claimed.evolution_url or self.settings.evolution_api_url
        key = claimed.instance_token or self.settings.evolution_api_key
        # an instance we cannot even call: name the missing setting (never a value). Transient: the usual
        # short backoff, so fixing the setting and restarting takes effect within minutes, not half an hour.
        if not base:
            missing = "no evolution_url on the row and EVOLUTION_API_URL unset"
            return Reply(Failure("config", True, None, missing), 0.0)
        if not key:
            missing = "no instance_token on the row and EVOLUTION_API_KEY unset"
            return Reply(Failure("config", True, None, missing), 0.0)
        try:
            return await self.client.connect(base, claimed.instance_name, key)
        except Exception:
            # the client returns every reply class as a value; anything else is a bug, and it must cost
            # this one instance a retry, not the whole batch its write-back
            log.exception("refreshing %s crashed", claimed.instance_name, extra={"action": "refresh_error"})
            return Reply(Failure("internal", True, None, "unexpected error (see the listener's log)"), 0.0)


def owner_id() -> str:
    """host:pid:random, unique per process start; doubles as the lease owner."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"

