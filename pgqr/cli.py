"""The `pgqr` command: parse, call, print, exit status (EXIT_STATUSES, the one table).

Every command's flags come from pgqr.settings (declared once); every command with a database takes
--database-url. Commands import what they need when they run, so `pgqr run` never loads the simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import signal
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from . import __version__, admin, logs, migrations
from .errors import ConfigurationError, MigrationError
from .preflight import DatabaseUnreachable, preflight
from .settings import (
    ConfigError,
    Parser,
    add_flags,
    database_refusal,
    first_line,
    load,
    rejected_dsn,
)

Command = Callable[[argparse.Namespace], int]

log = logging.getLogger("pgqr.cli")

# The one table of exit statuses: every command, `--help` and the README.
EXIT_STATUSES: tuple[tuple[int, str], ...] = (
    (0, "ok"),
    (1, "a check, verify or refresh found a problem (doctor's failed checks, `migrate --verify` with anything "
        "pending, a failed refresh or webhook registration), or the database stayed unreachable"),
    (2, "usage or configuration: a bad flag or setting, credentials the database refused, a role or database that "
        "does not exist, a binding the app's table refuses, or pgqr not installed in this database (doctor "
        "reports that as a failed check)"),
)
STATUS_ROWS = 200  # `pgqr status` shows at most this many instances by default


def exit_status_table() -> str:
    """EXIT_STATUSES as the README's markdown table."""
    return "\n".join(["| status | meaning |", "|---|---|", *(f"| {code} | {text} |" for code, text in EXIT_STATUSES)])


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = load(args)
    if args.verify:
        problems = migrations.verify(settings.dsn)
        for problem in problems:
            print(problem)
        if problems:
            return 1
        print("pgqr schema is up to date")
        return 0
    done = migrations.migrate(settings.dsn, dry_run=args.dry_run, binding=settings)
    for line in done:
        print(line)
    if not done:
        print("nothing to migrate")
    return 0


def cmd_bind(args: argparse.Namespace) -> int:
    settings = load(args)
    with admin.connect(settings) as conn:
        admin.require_installed(conn)
        for line in migrations.bind(conn, settings):
            print(line)
    return 0


def _log_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=["auto", "json", "text"], default="auto",
                   help="log lines as JSON objects or as text; auto: text on a terminal, JSON otherwise "
                        "(default: auto)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default="INFO",
                   help="the least severe level logged (default: INFO)")


def cmd_run(args: argparse.Namespace) -> int:
    from .service import Service

    settings = load(args)
    logs.setup(args.log_format, args.log_level)

    async def main() -> int:
        service = Service(settings)
        await service.serve_http()  # a port in use is said at once, not after waiting for the database
        try:
            await preflight(settings, settings.database_wait_seconds,
                             lambda line: log.info(line, extra={"action": "database_wait"}))
        except BaseException:
            await service.stop_http()
            raise
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await service.run(stop)
        return 1 if service.crashed else 0

    return asyncio.run(main())


def cmd_refresh(args: argparse.Namespace) -> int:
    from . import db
    from .engine import Engine
    from .evolution import EvolutionClient
    from .service import owner_id

    settings = load(args)
    logs.setup(args.log_format, "WARNING" if args.json else args.log_level)

    async def main() -> int:
        await preflight(settings)
        pool = db.Pool(settings.dsn, size=3)
        await pool.open()
        client = EvolutionClient(timeout=settings.http_timeout, concurrency=settings.concurrency,
                                 max_reply_bytes=settings.max_reply_bytes)
        engine = Engine(settings, pool, client, owner_id())
        try:
            summary = await engine.run_once()
        finally:
            await engine.close()
            await client.close()
            await pool.close()
        doc = summary.as_json()
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            for r in summary.results:
                what = r.outcome if r.success else f"{r.error_class or r.outcome}: {r.detail}"
                print(f"{r.instance_name}\t{'ok' if r.success else 'FAILED'}\t{what}")
            print(f"{doc['total_instances']} instances: {doc['qr_stored']} new QR, {doc['qr_unchanged']} QR "
                  f"unchanged, {doc['no_qr']} no QR yet, {doc['connected']} connected, {doc['failed']} failed")
        return 1 if summary.failed else 0

    return asyncio.run(main())


def cmd_status(args: argparse.Namespace) -> int:
    from . import status

    # a table of 100,000 rows helps nobody: the database picks the instances needing attention first
    doc = status.status(load(args), None if args.json or args.limit <= 0 else args.limit)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    print(status.format_status(doc))
    if doc["instances_total"] > len(doc["instances"]):
        print(f"showing {len(doc['instances']):,} of {doc['instances_total']:,} instances "
              f"({doc['instances_waiting']:,} waiting), failing and expired first; --limit 0 shows every one, "
              "--json the whole document")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    checks = doctor.doctor(load(args))
    for check in checks:
        print(check.line())
    failed = sum(not c.ok for c in checks)
    print(f"{len(checks) - failed} passed, {failed} failed")
    return 0 if failed == 0 else 1


def cmd_webhooks_register(args: argparse.Namespace) -> int:
    from . import hooks

    settings = load(args)
    admin.ensure_installed(settings)
    results, url = hooks.register(settings, None if args.all else args.instance, args.dry_run)
    if not results:
        print(f"pgqr: no instance named {args.instance!r} in the app's table" if args.instance
              else "no instances in the app's table")
        return 1 if args.instance else 0
    for result in results:
        print(result.line())
    failed = sum(not r.ok for r in results)
    verb = "would point" if args.dry_run else "point"
    print(f"{len(results)} instance(s): {len(results) - failed} {verb} at {url}, {failed} failed")
    return 1 if failed else 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from . import control

    expression = control.schedule(load(args), args.every)
    print(f"pgqr-tick now runs on schedule '{expression}'")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    from . import control

    changed = control.set_active(load(args), False)
    print(f"paused pgqr's pg_cron jobs ({changed} changed); `pgqr resume` starts them again")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from . import control

    changed = control.set_active(load(args), True)
    print(f"resumed pgqr's pg_cron jobs ({changed} changed)")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from . import control

    for line in control.uninstall(load(args), drop_data=args.drop_data):
        print(line)
    return 0


def _require_sim_extra(command: str) -> None:
    """The simulator renders its QR images with segno, the `sim` extra: say so in one line when it is missing."""
    try:
        importlib.import_module("segno")
    except ImportError:
        raise ConfigError(f"pgqr {command} needs the simulator's extra: pip install 'pgqr[sim]'") from None


def cmd_simulate(args: argparse.Namespace) -> int:
    _require_sim_extra("simulate")
    # Imported here, never at module level: `pgqr run` and the other commands must not load the simulator
    # (an optional extra). It parses its own flags.
    from .simulator import cli as simulator_cli

    result: int = simulator_cli.main(args.simulate_args)
    return result


def _instance_counts(raw: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(v) for v in raw.split(",") if v.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) <= 0:
        raise argparse.ArgumentTypeError(f"a comma-separated list of instance counts, like 2000,10000; got {raw!r}")
    return counts


def _bench_phases(raw: str) -> tuple[str, ...]:
    from .bench import PHASES as known  # a light module: the bench itself loads only when it runs

    phases = tuple(v.strip() for v in raw.split(",") if v.strip())
    if not phases or set(phases) - set(known):
        raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(known)}; got {raw!r}")
    return phases


def cmd_bench(args: argparse.Namespace) -> int:
    _require_sim_extra("bench")
    from . import bench

    options = bench.Options(
        instances=(100,) if args.quick and args.instances is None else (args.instances or (2000, 10000)),
        quick=args.quick,
        freshness_seconds=args.freshness_seconds or (30.0 if args.quick else 180.0),
        freshness_instances=100 if args.quick else 1000,
        phases=args.phases,
    )
    return bench.main(options, args.json)


def cmd_demo(args: argparse.Namespace) -> int:
    _require_sim_extra("demo")
    from . import demo

    return demo.main(args)


def cmd_link(args: argparse.Namespace) -> int:
    from . import links

    settings = load(args)
    ttl = links.parse_ttl(args.ttl)
    if not settings.public_url or not settings.link_secret:
        raise ConfigError("pgqr link needs PGQR_PUBLIC_URL (where people reach the sidecar) and PGQR_LINK_SECRET "
                          "(the sidecar's, so it accepts the link)")
    with admin.connect(settings) as conn:
        admin.require_installed(conn)
        rows = conn.execute("SELECT key, url, waiting FROM pgqr.find_instances(%s) ORDER BY key",
                            (args.name,)).fetchall()
    if args.key is not None:
        rows = [r for r in rows if r[0] == args.key]
    if not rows:
        print(f"pgqr: no instance named {args.name!r}" + (f" with key {args.key!r}" if args.key else ""),
              file=sys.stderr)
        return 1
    if len(rows) > 1:
        print(f"pgqr: {len(rows)} rows are named {args.name!r}; pick one with --key:", file=sys.stderr)
        for key, url, waiting in rows:
            print(f"  --key {key}\t{url or '(default Evolution URL)'}\t{'waiting' if waiting else 'not waiting'}",
                  file=sys.stderr)
        return 2
    print(links.make_link(settings.public_url, settings.link_secret.reveal(), rows[0][0], ttl))
    return 0


def _usage(args: argparse.Namespace) -> int:
    raise ConfigError("name a subcommand (see --help)")


def _command(sub: Any, name: str, func: Command, help: str, *, settings: str | None = None,
             **kwargs: Any) -> Parser:
    p: Parser = sub.add_parser(name, help=help, description=help, **kwargs)
    if settings is not None:
        add_flags(p, settings)
    p.set_defaults(func=func, parser=p)
    return p


def build_parser() -> Parser:
    statuses = "\n".join(textwrap.fill(text, 78, initial_indent=f"  {code}  ", subsequent_indent="     ")
                         for code, text in EXIT_STATUSES)
    parser = Parser(
        prog="pgqr",
        description="Keeps Evolution API (WhatsApp) QR codes fresh from PostgreSQL.",
        epilog=f"exit status (every command):\n{statuses}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pgqr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "migrate", cmd_migrate, "apply pending SQL migrations, bind the app's table, schedule "
                 "pgqr's pg_cron jobs", settings="migrate")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the SQL that would run; change nothing")
    mode.add_argument("--verify", action="store_true", help="exit 1 unless the database matches the code")
    _command(sub, "bind", cmd_bind, "bind pgqr to the app's instances table (or re-bind it)", settings="bind")
    p = _command(sub, "run", cmd_run, "the long-lived listener: keep every waiting instance's QR fresh",
                 settings="run")
    _log_flags(p)
    p = _command(sub, "refresh", cmd_refresh, "refresh every due instance once, then exit (status 1 when any "
                 "failed)", settings="refresh")
    _log_flags(p)
    p.add_argument("--once", action="store_true", required=True,
                   help="run one pass and exit (the long-lived listener is `pgqr run`)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p = _command(sub, "status", cmd_status, "each instance's refresh health, listeners, jobs and firing alerts",
                 settings="status")
    p.add_argument("--json", action="store_true", help="one JSON document (pgqr.status()) for machines")
    p.add_argument("--limit", type=int, default=STATUS_ROWS, metavar="N",
                   help="the table shows at most N instances, failing and expired first (default: %(default)s; "
                        "0: every one)")
    _command(sub, "doctor", cmd_doctor, "check the installation, each problem with its fix; 0 when all pass",
             settings="doctor")
    p = _command(sub, "webhooks", _usage, "Evolution's per-instance webhooks pointed at pgqr")
    hooks_sub = p.add_subparsers(dest="webhooks_command", required=True, metavar="SUBCOMMAND")
    p = _command(hooks_sub, "register", cmd_webhooks_register,
                 "point instances' webhooks at PGQR_PUBLIC_URL/webhooks/evolution with their X-Pgqr-Token "
                 "(QRCODE_UPDATED, CONNECTION_UPDATE); status 1 when any failed", settings="webhooks")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--instance", metavar="NAME", help="this instance only")
    which.add_argument("--all", action="store_true", help="every instance in the app's table")
    p.add_argument("--dry-run", action="store_true", help="read each webhook and say what would change; set nothing")
    p = _command(sub, "schedule", cmd_schedule, "change the tick period (sub-minute needs pg_cron 1.5+)",
                 settings="schedule")
    p.add_argument("--every", required=True, metavar="INTERVAL", help="like '1 minute', '5m', '30s', '1 hour'")
    _command(sub, "pause", cmd_pause, "make pgqr's pg_cron jobs inactive", settings="pause")
    _command(sub, "resume", cmd_resume, "make pgqr's pg_cron jobs active again", settings="resume")
    p = _command(sub, "uninstall", cmd_uninstall, "unschedule pgqr's jobs and remove its trigger; --drop-data "
                 "also drops schema pgqr", settings="uninstall")
    p.add_argument("--drop-data", action="store_true",
                   help="also drop schema pgqr (state, history, settings); the app's table and rows stay")
    # Every argument after `simulate` belongs to the simulator's own parser (pgqr.simulator.cli), so the
    # simulator is imported only when it runs. No option prefix here: REMAINDER alone would leave a leading
    # --flag to this parser, which rejects it.
    p = _command(sub, "simulate", cmd_simulate, "an Evolution API simulator on loopback (`pgqr simulate --help`)",
                 add_help=False, prefix_chars="\0")
    p.add_argument("simulate_args", nargs=argparse.REMAINDER)
    p = _command(sub, "link", cmd_link, "print a signed, expiring link to one instance's live QR page (served by "
                 "`pgqr run` with PGQR_HTTP_PORT and PGQR_LINK_SECRET)", settings="link")
    p.add_argument("name", help="the instance name")
    p.add_argument("--ttl", default="15m", help="how long the link works, like 15m, 2h, 1d (default: 15m)")
    p.add_argument("--key", default=None, help="the row's key, when several rows share the name")
    p = _command(sub, "bench", cmd_bench, "measure the refresh engine end to end (own PostgreSQL, simulator "
                 "and pgqr processes) and print one table")
    p.add_argument("--json", metavar="PATH", help="also write every figure (and the raw samples) to PATH")
    p.add_argument("--instances", type=_instance_counts, default=None, metavar="N[,N...]",
                   help="reconcile sizes (default: 2000,10000; 100 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes and a 30 s freshness window; skips the skewed-clock freshness, 100,000-row, "
                        "replica and immediate-stop phases (about 4 minutes; the full bench takes about 25)")
    p.add_argument("--phases", type=_bench_phases, default=(), metavar="NAME[,NAME...]",
                   help="run only these phases: reconcile, service, page, freshness, skew, scale, replicas, crash "
                        "(default: all, or all but the full-only ones with --quick)")
    p.add_argument("--freshness-seconds", type=float, default=None, metavar="S",
                   help="how long freshness is sampled, once a second (default 180; 30 with --quick)")
    p = _command(sub, "demo", cmd_demo, "throwaway PostgreSQL + pg_cron + simulator + listener, live")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    p.add_argument("--scan-after", type=float, default=20.0, help="seconds before one instance gets scanned")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse(argv)
    func: Command = args.func
    try:
        return func(args)
    except (ConfigError, ConfigurationError) as exc:
        print(f"pgqr: {exc}", file=sys.stderr)
        return 2
    except (MigrationError, DatabaseUnreachable) as exc:
        print(f"pgqr: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        if rejected := rejected_dsn(exc) or _refusal(exc, args):
            print(f"pgqr: {rejected}", file=sys.stderr)
            return 2
        if isinstance(exc, psycopg.OperationalError):
            # connection failures: libpq's first line names host and port, never the password
            print(f"pgqr: cannot reach the database: {first_line(exc)}", file=sys.stderr)
        else:
            # e.g. permission denied: the server's message, one line
            print(f"pgqr: database error: {first_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _refusal(exc: psycopg.Error, args: argparse.Namespace) -> ConfigError | None:
    """A refused role, password or database is a configuration error (exit 2) for every command."""
    try:
        dsn = load(args).dsn
    except ConfigError:
        return None
    return database_refusal(exc, dsn)


if __name__ == "__main__":
    sys.exit(main())
