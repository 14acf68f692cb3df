"""One reconcile pass over N due instances in a child process, then an unchanged second pass: wall, efficiency,
peak RSS, WAL and database time, against the old one-at-a-time way."""

from __future__ import annotations

from ..baseline import sequential
from ..context import Bench
from ..database import Db
from ..harness import SimProcess, reconcile_in_child
from ..report import ms
from ..statements import add_db_time, statements_reset, statements_time

SEQUENTIAL_SAMPLE = 50  # instances refreshed the old way (one call, one UPDATE and commit, one after another)


async def reconcile(bench: Bench, sim: SimProcess, n: int) -> None:
    r, c, lat = bench.report, bench.o.concurrency, bench.o.latency
    d = Db.create(bench.server, f"bench_reconcile_{n}")
    tokens = await sim.bulk(n, f"r{n}")
    await d.load(tokens)
    statements = await statements_reset(d)
    first = await reconcile_in_child(d.dsn, sim.base_url, c)
    spent = await statements_time(d) if statements else None
    ideal = n * lat / c
    eff = ideal / first["wall"]
    section = f"reconcile N={n:,}"
    r.raw[section] = first
    r.add(section, "outcome", f"{first['qr_stored']:,} QR stored, {first['failed']} failed, "
                              f"{first['not_applied']} not applied")
    r.add(section, "wall / ideal (N x 200 ms / 100)", f"{first['wall']:.1f} s / {ideal:.1f} s")
    r.add(section, "efficiency (ideal / wall)", f"{eff:.2f}", ">= 0.9 at 10,000",
          eff >= 0.9 if n >= 10000 else None)
    r.add(section, "peak RSS of the pgqr process", f"{first['peak_rss_mb']:.0f} MiB", "<= 200 MB",
          first["peak_rss_mb"] * 1.048576 <= 200)
    if spent is not None:
        add_db_time(bench, section, "first pass, a new QR each", spent, first["total_instances"], n,
                    target=False)
    # the same instances again, nothing changed at Evolution: what does a pass cost the database?
    await d.execute("UPDATE pgqr.schedule SET due_at = now(), recent_polls = '{}' WHERE due_at IS NOT NULL")
    await d.quiesce()
    statements = statements and await statements_reset(d)
    before = await d.wal_lsn()
    second = await reconcile_in_child(d.dsn, sim.base_url, c)
    spent = await statements_time(d) if statements else None
    wal = await d.wal_lsn() - before
    r.raw[section + " unchanged"] = {**second, "wal_bytes": wal}
    r.add(section, "second pass, no QR changed: wall", f"{second['wall']:.1f} s "
                                                         f"({second['qr_unchanged']:,} unchanged)")
    r.add(section, "WAL per instance, no QR changed", f"{wal / n:,.0f} B")
    if spent is not None:
        add_db_time(bench, section, "second pass, no QR changed", spent, second["total_instances"],
                    n, target=True)
    sample = dict(list(tokens.items())[:SEQUENTIAL_SAMPLE])
    per = await sequential(d, sim.base_url, sample)
    r.add(section, f"sequential (old way), {SEQUENTIAL_SAMPLE} sampled, extrapolated",
          f"{per * n:,.0f} s ({ms(per)} each)")
    r.add(section, "speed-up over sequential", f"{per * n / first['wall']:.0f}x")
    d.drop()  # its autovacuum must not write into a later phase's WAL window
