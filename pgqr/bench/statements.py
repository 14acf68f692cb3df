"""The database's own time per poll, from pg_stat_statements (loaded by the bench's server)."""

from __future__ import annotations

from typing import Any

from .context import Bench
from .database import Db


async def statements_reset(d: Db) -> bool:
    """Start pg_stat_statements afresh for this database, tracking nested statements too (`track = all`, for the
    breakdown: pgqr's work is mostly inside its SQL functions); False when the server has not loaded it."""
    async with await d.connect() as conn:
        loaded = await (await conn.execute(
            "SELECT 'pg_stat_statements' = ANY(string_to_array(current_setting('shared_preload_libraries'), ','))"
        )).fetchone()
        if not loaded or not loaded[0]:
            return False
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        track = await (await conn.execute("SELECT current_setting('pg_stat_statements.track')")).fetchone()
        if not track or track[0] != "all":  # set once: a catalog write would land in a WAL window
            await conn.execute(f'ALTER DATABASE "{d.name}" SET pg_stat_statements.track = \'all\''.encode())
        await conn.execute("SELECT pg_stat_statements_reset()")
    return True


async def statements_time(d: Db) -> dict[str, Any]:
    """Since the reset: the execution time of this database's top-level statements (a function's body is counted
    inside its call, not twice), their calls, and the statements (nested ones too) that took longest. The
    bench's own statements about pg_stat_statements are left out; nothing else runs in the bench's database."""
    mine = ("FROM pg_stat_statements s JOIN pg_database db ON db.oid = s.dbid "
            "WHERE db.datname = current_database() AND s.query NOT ILIKE '%pg_stat_statements%'")
    async with await d.connect() as conn:
        # the app table's own UPDATEs (pgqr's write of the image into the app's row) are told apart: what any
        # writer of a current 13 KB QR pays there is not pgqr's overhead
        row = await (await conn.execute(
            f"SELECT coalesce(sum(total_exec_time) FILTER (WHERE toplevel), 0), "
            f"coalesce(sum(calls) FILTER (WHERE toplevel), 0), "
            f"coalesce(sum(total_exec_time) FILTER (WHERE NOT toplevel AND s.query LIKE "
            f"'UPDATE public.evolution_instances %'), 0) {mine}".encode())).fetchone()
        top = await (await conn.execute(
            f"SELECT toplevel, calls, round(total_exec_time::numeric, 1)::float8, "
            f"left(regexp_replace(query, '\\s+', ' ', 'g'), 160) {mine} "
            "ORDER BY total_exec_time DESC LIMIT 12".encode())).fetchall()
    assert row is not None
    return {"total_ms": float(row[0]), "statements": int(row[1]), "app_update_ms": float(row[2]),
            "slowest": [{"toplevel": t, "calls": c, "total_ms": ms_, "query": q} for t, c, ms_, q in top]}


def add_db_time(bench: Bench, section: str, label: str, spent: dict[str, Any], polls: int, n: int,
                target: bool) -> None:
    """`target`: whether the 0.25 ms target applies. It is the unchanged poll's (the steady cost issue 19 set
    it for); a poll that brings a new QR also writes the 13 KB image into the app's row, shown apart."""
    per = spent["total_ms"] / polls if polls else float("nan")
    app = spent["app_update_ms"] / polls if polls else float("nan")
    bench.report.raw[f"{section} {label} pg_stat_statements"] = {**spent, "polls": polls}
    value = f"{per:.3f} ms" + (f" ({app:.3f} ms of it the app table's UPDATE of the image)" if app >= 0.0005 else "")
    wanted = target and n >= 10_000
    bench.report.add(section, f"{label}: database time per poll (pg_stat_statements, top-level statements' "
                     f"execution time / polls; {spent['statements']:,} statements)",
                     value, "<= 0.25 ms at 10,000" if wanted else "", per <= 0.25 if wanted else None)
