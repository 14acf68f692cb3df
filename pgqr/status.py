"""`pgqr status`: the pgqr.status() document, and the same as a table for humans."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from . import tables
from .admin import connect, require_installed
from .settings import Settings


def status(settings: Settings, limit: int | None = None) -> dict[str, Any]:
    """pgqr.status(): instances (the health view; at most `limit`, those needing attention first), listeners,
    jobs, last tick, firing alerts."""
    with connect(settings) as conn:
        require_installed(conn)
        row = conn.execute("SELECT pgqr.status(%s) || jsonb_build_object('now', now())", (limit,)).fetchone()
    assert row is not None
    doc: dict[str, Any] = row[0]
    return doc


def _when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(abs(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h" if s < 172800 else f"{s // 86400}d"


def _relative(now: datetime, value: str | None) -> str:
    moment = _when(value)
    if moment is None:
        return "-"
    delta = (moment - now).total_seconds()
    return f"in {_age(delta)}" if delta > 0 else f"{_age(delta)} ago"


def describe_binding(binding: dict[str, Any] | None) -> str:
    """One line: the bound table, its key, name and status columns with their values, and the optional columns
    that are bound."""
    if not binding:
        return "nothing bound (run `pgqr bind`)"
    b = binding
    dropped = f"; disconnected {b['disconnected_value']}" if b.get("disconnected_value") else ""
    status = (f"status {b['status_column']} (waiting {','.join(b['waiting_values'])}; connected "
              f"{b['connected_value']}; gave up {b['gave_up_value'] or '-'}{dropped})" if b["status_column"]
              else "no status column (waiting while Evolution says connecting)")
    parts = [f"key {b['key_column']}", f"name {b['name_column']}", status]
    parts += [f"{label} {b[attr]}" for label, attr in (
        ("token", "token_column"), ("url", "url_column"), ("qr", "qr_column"), ("qr at", "qr_at_column"),
        ("qr expires", "qr_expires_column"), ("pairing", "pairing_column"), ("phone", "phone_column"))
        if b.get(attr)]
    return f"{b['table_name']}: " + ", ".join(parts)


def format_status(doc: dict[str, Any]) -> str:
    """The status document as a table for humans, with a summary line of listeners, ticks, jobs, alerts."""
    now = datetime.fromisoformat(doc["now"])
    header = ("INSTANCE", "STATUS", "QR AGE", "QR EXPIRES", "LAST ATTEMPT", "OUTCOME", "FAILURES", "NEXT ATTEMPT",
              "LEASE")
    rows = [header]
    for i in doc["instances"]:
        outcome = i["last_outcome"] or "-"
        if i["last_error_class"]:
            outcome += f" ({i['last_error_class']})"
        rows.append((
            # a table without a status column: Evolution's word stands in for it
            i["instance_name"], i["status"] if i["status"] is not None else
            f"evolution: {i.get('evolution_state') or 'unknown'}", _age(i["qr_age_seconds"]),
            _relative(now, i["qr_expires_at"]) if i["waiting"] else "-", _relative(now, i["last_attempt_at"]),
            outcome, str(i["consecutive_failures"]), _relative(now, i["next_attempt_at"]),
            i["lease_owner"] or "-",
        ))
    lines = tables.render(rows)
    if not doc["instances"]:
        lines.append("(no instances)")
    live = [x for x in doc["listeners"] if x["live"]]
    active = [j for j in doc["jobs"] if j["active"]]
    alerts = ", ".join(f"{a['rule']} ({a['count']})" for a in doc["alerts_firing"]) or "none"
    lines.append("")
    lines.append(
        f"listeners: {len(live)} live · last tick: {_relative(now, doc['last_tick_at'])} · "
        f"jobs: {len(active)}/{len(doc['jobs'])} active · alerts firing: {alerts}"
    )
    fresh = doc.get("freshness") or {}
    if fresh.get("waiting"):
        expired = f"; the oldest expired {_age(fresh['oldest_expired_seconds'])} ago" \
            if fresh["oldest_expired_seconds"] else ""
        lines.append(f"freshness: {fresh['qr_valid']} of {fresh['waiting']} waiting instance(s) hold a QR within its "
                     f"estimated life{expired}")
    lines.append(f"binding: {describe_binding(doc.get('binding'))}")
    return "\n".join(lines)


