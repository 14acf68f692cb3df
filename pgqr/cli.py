"""The `pgqr` command: parse, call, print, exit status. 0 ok, 1 failure, 2 usage or configuration."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable, Sequence

import psycopg

from . import config, logs, migrations, opscli

Command = Callable[[argparse.Namespace], int]


def _db_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", help="libpq URL or DSN (default: $DATABASE_URL)")


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = config.load(args)
    if args.verify:
        problems = migrations.verify(settings.database_url)
        for problem in problems:
            print(problem)
        if problems:
            return 1
        print("pgqr schema is up to date")
        return 0
    done = migrations.migrate(settings.database_url, dry_run=args.dry_run)
    for line in done:
        print(line)
    if not done:
        print("nothing to migrate")
    return 0


def _service_flags(p: argparse.ArgumentParser) -> None:
    _db_flag(p)
    p.add_argument("--evolution-api-url", help="Evolution API base URL (default: $EVOLUTION_API_URL)")
    p.add_argument("--concurrency", help="most Evolution calls in flight (default: $PGQR_CONCURRENCY or 16)")
    p.add_argument("--http-timeout", help="seconds per Evolution call (default: $PGQR_HTTP_TIMEOUT or 8)")
    p.add_argument("--log-format", choices=["auto", "json", "text"], default="auto")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default="INFO")


async def _preflight(settings: config.Settings) -> None:
    """Fail fast, with one line, on what no retry can fix: a database without pgqr, or instances that have
    no Evolution URL to call. An unreachable database is retried by the service itself."""
    try:
        async with await psycopg.AsyncConnection.connect(settings.database_url, connect_timeout=10) as conn:
            cur = await conn.execute("SELECT to_regclass('pgqr.migrations') IS NOT NULL")
            row = await cur.fetchone()
            if not row or not row[0]:
                raise config.ConfigError("pgqr is not installed in this database: run `pgqr migrate` first")
            if settings.evolution_api_url:
                return
            cur = await conn.execute(
                "SELECT count(*) FROM public.evolution_instances WHERE coalesce(evolution_url, '') = ''")
            row = await cur.fetchone()
    except psycopg.Error as exc:
        if rejected := config.rejected_dsn(exc):
            raise rejected from None
        if isinstance(exc, psycopg.OperationalError):
            return
        raise
    if row and row[0]:
        raise config.ConfigError(
            f"EVOLUTION_API_URL is not set and {row[0]} instance(s) have no evolution_url of their own")


def cmd_run(args: argparse.Namespace) -> int:
    from .listener import Service

    settings = config.load(args)
    logs.setup(args.log_format, args.log_level)

    async def main() -> int:
        await _preflight(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        service = Service(settings)
        await service.run(stop)
        return 1 if service.crashed else 0

    return asyncio.run(main())


def cmd_refresh(args: argparse.Namespace) -> int:
    from .evolution import EvolutionClient
    from .reconcile import Reconciler, owner_id

    if not args.once:
        raise config.ConfigError("pgqr refresh needs --once (the long-lived listener is `pgqr run`)")
    settings = config.load(args)
    logs.setup(args.log_format, "WARNING" if args.json else args.log_level)

    async def main() -> int:
        await _preflight(settings)
        client = EvolutionClient(timeout=settings.http_timeout, concurrency=settings.concurrency,
                                 max_reply_bytes=settings.max_reply_bytes)
        async with client, await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True) as conn:
            summary = await Reconciler(settings, client, owner_id()).run(conn)
        if args.json:
            print(json.dumps(summary.as_json(), indent=2))
        else:
            for r in summary.results:
                what = r.outcome if r.success else f"{r.error_class}: {r.detail}"
                print(f"{r.instance_name}\t{'ok' if r.success else 'FAILED'}\t{what}")
            print(f"{len(summary.results)} instances, {len(summary.results) - summary.failed} refreshed, "
                  f"{summary.failed} failed")
        return 1 if summary.failed else 0

    return asyncio.run(main())


def cmd_simulate(args: argparse.Namespace) -> int:
    # Imported here, never at module level: `pgqr run` and the other commands must not load the simulator
    # (an optional extra). It parses its own flags.
    from .simulator import cli as simulator_cli

    return simulator_cli.main(args.simulate_args)


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgqr",
        description="Keeps Evolution API (WhatsApp) QR codes fresh from PostgreSQL. "
                    "Exit status: 0 ok, 1 failure, 2 usage or configuration error.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("migrate", help="apply pending SQL migrations and schedule pgqr's pg_cron jobs")
    _db_flag(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the SQL that would run; change nothing")
    mode.add_argument("--verify", action="store_true", help="exit 1 unless the database matches the code")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("run", help="the long-lived listener: refresh QR codes on every tick and webhook")
    _service_flags(p)
    p.add_argument("--grace-seconds", help="shutdown grace for in-flight calls (default: $PGQR_GRACE_SECONDS or 10)")
    p.add_argument("--http-host", help="address for health, metrics and webhooks (default: 127.0.0.1)")
    p.add_argument("--http-port", help="port for health, metrics and webhooks (default: $PGQR_HTTP_PORT; off)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("refresh", help="one reconcile, then exit (status 1 when any instance failed)")
    _service_flags(p)
    p.add_argument("--once", action="store_true", help="required: run one reconcile")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_refresh)

    # Every argument after `simulate` belongs to the simulator's own parser (pgqr.simulator.cli), so the
    # simulator is imported only when it runs. No option prefix here: REMAINDER alone would leave a leading
    # --flag to this parser, which rejects it.
    p = sub.add_parser("simulate", add_help=False, prefix_chars="\0",
                       help="an Evolution API simulator on loopback (pgqr simulate --help)")
    p.add_argument("simulate_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", help="throwaway PostgreSQL + pg_cron + simulator + listener, with a live table")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    p.add_argument("--scan-after", type=float, default=20.0, help="seconds before one instance gets scanned")
    p.set_defaults(func=cmd_demo)

    opscli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except (config.ConfigError, migrations.ConfigurationError) as exc:
        print(f"pgqr: {exc}", file=sys.stderr)
        return 2
    except migrations.MigrationError as exc:
        print(f"pgqr: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        if rejected := config.rejected_dsn(exc):
            print(f"pgqr: {rejected}", file=sys.stderr)
            return 2
        if isinstance(exc, psycopg.OperationalError):
            # connection failures: libpq's first line names host and port, never the password
            print(f"pgqr: cannot reach the database: {_first_line(exc)}", file=sys.stderr)
        else:
            # e.g. permission denied: the server's message, one line
            print(f"pgqr: database error: {_first_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
