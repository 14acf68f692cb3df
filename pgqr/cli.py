"""The `pgqr` command: parse, call, print, exit status. 0 ok, 1 failure, 2 usage or configuration."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import psycopg

from . import config, migrations

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgqr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("migrate", help="apply pending SQL migrations and schedule pgqr's pg_cron jobs")
    _db_flag(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the SQL that would run; change nothing")
    mode.add_argument("--verify", action="store_true", help="exit 1 unless the database matches the code")
    p.set_defaults(func=cmd_migrate)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except config.ConfigError as exc:
        print(f"pgqr: {exc}", file=sys.stderr)
        return 2
    except migrations.ConfigurationError as exc:
        print(f"pgqr: {exc}", file=sys.stderr)
        return 2
    except migrations.MigrationError as exc:
        print(f"pgqr: {exc}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        # connection failures: libpq's first line names host and port, never the password
        print(f"pgqr: cannot reach the database: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
