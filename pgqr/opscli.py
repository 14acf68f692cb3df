"""`pgqr status/doctor/schedule/pause/resume/uninstall`: parse, call pgqr.ops, print, exit status.

Exit status: 0 ok, 1 failure (doctor: a check failed), 2 bad input or configuration (raised as
config.ConfigError and printed by cli.main).
"""

from __future__ import annotations

import argparse
import json

from . import config, ops


def _db_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", help="libpq URL or DSN (default: $DATABASE_URL)")


def cmd_status(args: argparse.Namespace) -> int:
    doc = ops.status(config.load(args))
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(ops.format_status(doc))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    checks = ops.doctor(config.load(args))
    for check in checks:
        print(check.line())
    failed = sum(not c.ok for c in checks)
    print(f"{len(checks) - failed} passed, {failed} failed")
    return 0 if failed == 0 else 1


def cmd_schedule(args: argparse.Namespace) -> int:
    settings = config.load(args)
    expression = ops.schedule(settings, args.every)
    print(f"pgqr-tick now runs on schedule '{expression}'")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    changed = ops.set_active(config.load(args), False)
    print(f"paused pgqr's pg_cron jobs ({changed} changed); `pgqr resume` starts them again")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    changed = ops.set_active(config.load(args), True)
    print(f"resumed pgqr's pg_cron jobs ({changed} changed)")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    for line in ops.uninstall(config.load(args), drop_data=args.drop_data):
        print(line)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the operations subcommands to `pgqr`'s parser."""
    p = sub.add_parser("status", help="each instance's refresh health, listeners, jobs and firing alerts")
    _db_flag(p)
    p.add_argument("--json", action="store_true", help="one JSON document (pgqr.status()) for machines")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("doctor", help="check the installation, each problem with its fix; 0 when all pass")
    _db_flag(p)
    p.add_argument("--evolution-api-url", help="default: $EVOLUTION_API_URL")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("schedule", help="change the tick period (sub-minute needs pg_cron 1.5+)")
    _db_flag(p)
    p.add_argument("--every", required=True, metavar="INTERVAL",
                   help="like '1 minute', '5m', '30s', '1 hour'")
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("pause", help="make pgqr's pg_cron jobs inactive")
    _db_flag(p)
    p.set_defaults(func=cmd_pause)

    p = sub.add_parser("resume", help="make pgqr's pg_cron jobs active again")
    _db_flag(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("uninstall", help="unschedule pgqr's jobs; --drop-data also drops schema pgqr")
    _db_flag(p)
    p.add_argument("--drop-data", action="store_true",
                   help="also drop schema pgqr (history, settings) and its trigger; instance rows stay")
    p.set_defaults(func=cmd_uninstall)
