"""`pgqr simulate`: an Evolution API simulator on loopback until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from ..settings import Parser
from .config import STATES, SimConfig
from .server import Simulator

__all__ = ["DEFAULT_PORT", "build_parser", "main"]

LISTED_TOKENS = 100  # more instances than this: their tokens come from GET /_sim/instances
LISTED_NAMES = 10  # more instances than this: the start-up lines give the first and the last name
# Not 8080: that is the port the README gives the sidecar (PGQR_HTTP_PORT), and Evolution's own default.
DEFAULT_PORT = 8081


def build_parser() -> Parser:
    d = SimConfig()
    p = Parser(
        prog="pgqr simulate",
        description="An in-memory Evolution API (routes, QR rotation, webhooks) with a /_sim control API. At start "
                    "it prints the EVOLUTION_API_URL, EVOLUTION_API_KEY and instance names to give pgqr.",
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address; the /_sim control API has no auth (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port (default: %(default)s)")
    p.add_argument("--api-key", default=d.api_key,
                   help="the global AUTHENTICATION_API_KEY, pgqr's EVOLUTION_API_KEY (default: %(default)s)")
    p.add_argument("--instances", type=int, default=1, metavar="N",
                   help="instances to create: PREFIX-00001 ... (default: %(default)s)")
    p.add_argument("--instance-prefix", default="sim", metavar="PREFIX",
                   help="the instances' names start with it (default: %(default)s)")
    p.add_argument("--state", choices=STATES, default="close",
                   help="the instances' state at start; connecting ones rotate each on a random phase "
                        "(default: %(default)s)")
    p.add_argument("--qr-ttl", type=float, default=d.qr_ttl, help="seconds between QR rotations (default: "
                   "%(default)s)")
    p.add_argument("--connect-sleep", type=float, default=d.connect_sleep,
                   help="seconds a connect in `close` takes (default: %(default)s)")
    p.add_argument("--connect-sleep-max", type=float, default=None,
                   help="draw each such connect from [connect-sleep, this]; Evolution 2.3.6: 2 to 8 "
                        "(default: every connect takes --connect-sleep)")
    p.add_argument("--first-qr-delay", type=float, default=d.first_qr_delay,
                   help="seconds from a socket's start to its first QR (default: %(default)s)")
    p.add_argument("--qrcode-limit", type=int, default=d.qrcode_limit,
                   help="QR codes an instance shows before it gives up, as Evolution's QRCODE_LIMIT "
                        "(default: %(default)s)")
    p.add_argument("--latency", type=float, default=d.latency,
                   help="seconds added to every API reply (default: %(default)s)")
    p.add_argument("--error-rate", type=float, default=d.error_rate,
                   help="fraction of connects answered 500 (default: %(default)s)")
    p.add_argument("--timeout-rate", type=float, default=d.timeout_rate,
                   help="fraction of connects that hang (default: %(default)s)")
    p.add_argument("--hang-seconds", type=float, default=d.hang_seconds,
                   help="how long a hanging connect hangs (default: %(default)s)")
    p.add_argument("--webhook-url", default=None, help="global webhook URL, as WEBHOOK_GLOBAL_URL (default: none)")
    p.add_argument("--webhook-by-events", action="store_true", help="append /qrcode-updated etc. to the URL")
    p.add_argument("--hide-token-in-webhook", action="store_true", help="send apikey: null in webhooks")
    p.add_argument("--seed", type=int, default=None,
                   help="seed the random choices (phases, errors), for a repeatable run (default: none)")
    return p


def start_lines(base_url: str, api_key: str, tokens: dict[str, str]) -> list[str]:
    """What the simulator prints at start: one line for programs (base_url=, api_key=, instances=name:token),
    then the settings to give pgqr and the instance names for the app's table."""
    listed = ",".join(f"{n}:{t}" for n, t in tokens.items()) if len(tokens) <= LISTED_TOKENS else (
        f"{len(tokens)}(tokens:GET/_sim/instances)")
    names = list(tokens)
    shown = ", ".join(names) if len(names) <= LISTED_NAMES else f"{names[0]} ... {names[-1]} ({len(names)})"
    return [
        f"pgqr simulator listening base_url={base_url} api_key={api_key} instances={listed or '-'}",
        "for pgqr (every instance answers the global key; the tokens above work too):",
        f"  export EVOLUTION_API_URL={base_url}",
        f"  export EVOLUTION_API_KEY={api_key}",
        f"  instance names for the app's table: {shown or '(none; POST /_sim/instances adds some)'}",
    ]


def config_from_args(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        api_key=args.api_key,
        qr_ttl=args.qr_ttl,
        connect_sleep=args.connect_sleep,
        connect_sleep_max=args.connect_sleep_max,
        first_qr_delay=args.first_qr_delay,
        qrcode_limit=args.qrcode_limit,
        latency=args.latency,
        error_rate=args.error_rate,
        timeout_rate=args.timeout_rate,
        hang_seconds=args.hang_seconds,
        expose_token_in_webhook=not args.hide_token_in_webhook,
        global_webhook_url=args.webhook_url,
        global_webhook_by_events=args.webhook_by_events,
        seed=args.seed,
    )


async def serve_forever(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM or cancellation; prints one line to stdout."""
    sim = Simulator(config_from_args(args))
    try:
        base_url = await sim.start(args.host, args.port)
    except OSError as exc:  # a port in use, an address not ours: one line, a usage error
        await sim.stop()
        print(f"pgqr simulate: cannot listen on {args.host}:{args.port}: {exc.strerror or exc} "
              "(choose another with --port, or 0 for a free one)", file=sys.stderr)
        return 2
    tokens = sim.add_instances(args.instances, prefix=args.instance_prefix, state=args.state)
    # A dev tool: its own fake key and tokens are printed so the user can configure pgqr.
    print("\n".join(start_lines(base_url, sim.config.api_key, tokens)), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or no signal support: cancellation still stops us
    try:
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await sim.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(serve_forever(build_parser().parse(argv)))
