"""A throwaway local PostgreSQL with pg_cron, for `pgqr demo` and the test suite.

PostgreSQL refuses to run as root, and CI runs as root: when we are root, initdb and the server run as the
unprivileged `postgres` account (created by Debian's postgresql-common), in a temporary directory it owns.
Clients connect over TCP on 127.0.0.1 with trust authentication, so nothing here needs a password.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from psycopg.conninfo import make_conninfo

SUPERUSER = "postgres"
SERVICE_ACCOUNT = "postgres"


class DevDBError(RuntimeError):
    """The local server could not be set up; the message says what to install or fix."""


def find_bindir() -> Path:
    """The PostgreSQL bin directory: $PGQR_PG_BIN, else Debian's newest with pg_cron installed beside it."""
    if env := os.environ.get("PGQR_PG_BIN"):
        return Path(env)
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    for bindir in candidates:
        if (bindir.parent / "lib" / "pg_cron.so").exists() and (bindir / "initdb").exists():
            return bindir
    raise DevDBError(
        "no PostgreSQL with pg_cron found under /usr/lib/postgresql: "
        "apt-get install postgresql-15 postgresql-15-cron (or set PGQR_PG_BIN)"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class DevServer:
    """A running throwaway server. `dsn(db)` gives a libpq URL for one of its databases."""

    base: Path
    port: int
    bindir: Path
    run_as: str | None
    host: str = "127.0.0.1"
    user: str = SUPERUSER
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.base / "postgresql.log"

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    def dsn(self, dbname: str = "postgres") -> str:
        return make_conninfo(host=self.host, port=self.port, user=self.user, dbname=dbname)

    def _run(self, *args: str) -> None:
        try:
            subprocess.run(
                [str(self.bindir / args[0]), *args[1:]],
                check=True,
                cwd=self.base,
                user=self.run_as,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        except subprocess.CalledProcessError as exc:
            tail = exc.stdout.strip().splitlines()[-5:] if exc.stdout else []
            raise DevDBError(f"{args[0]} failed: {' | '.join(tail)}") from None

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.log), "-m", "fast", "-w", "restart")


def _service_account() -> str | None:
    """Who runs the server: nobody special for a normal user, the postgres account for root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVICE_ACCOUNT)
    except KeyError:
        raise DevDBError(
            f"running as root needs the unprivileged '{SERVICE_ACCOUNT}' account for PostgreSQL: "
            "apt-get install postgresql-15"
        ) from None
    return SERVICE_ACCOUNT


def preload_libraries(bindir: Path, *, cron: bool) -> list[str]:
    """What the server preloads: pg_cron (unless left out) and pg_stat_statements, which `pgqr bench` reads for
    the database's own time per poll (Debian's postgresql-15 ships it; a build without it just goes without)."""
    libs = ["pg_cron"] if cron else []
    if (bindir.parent / "lib" / "pg_stat_statements.so").exists():
        libs.append("pg_stat_statements")
    return libs


def create(*, cron_database: str | None = "postgres", port: int | None = None, logical: bool = False) -> DevServer:
    """initdb and start a server. cron_database=None leaves pg_cron out of shared_preload_libraries; logical=True
    sets wal_level = logical, for replication slots that decode changes (as Supabase Realtime reads them)."""
    bindir = find_bindir()
    run_as = _service_account()
    base = Path(tempfile.mkdtemp(prefix="pgqr-pg-"))
    if run_as:
        account = pwd.getpwnam(run_as)
        os.chown(base, account.pw_uid, account.pw_gid)
    server = DevServer(base=base, port=port or free_port(), bindir=bindir, run_as=run_as)
    try:
        server._run(
            "initdb", "-D", str(server.datadir), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync", "--no-instructions",
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(server.port),
            "unix_socket_directories": f"'{base}'",
            "max_connections": "200",
            # a throwaway server: durability buys nothing here and costs the suite time
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "log_min_messages": "warning",
        }
        if logical:
            settings["wal_level"] = "logical"
        preload = preload_libraries(bindir, cron=cron_database is not None)
        if preload:
            settings["shared_preload_libraries"] = f"'{','.join(preload)}'"
        if cron_database is not None:
            settings["cron.database_name"] = f"'{cron_database}'"
            # pg_cron runs each job over libpq; point it at the address we listen on
            settings["cron.host"] = "'127.0.0.1'"
        with open(server.datadir / "postgresql.conf", "a") as conf:
            conf.write("\n# pgqr devdb\n")
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())
        server.start()
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return server


def destroy(server: DevServer) -> None:
    with contextlib.suppress(DevDBError):  # already gone: removing its files is all that is left
        server.stop("immediate")
    shutil.rmtree(server.base, ignore_errors=True)


@contextmanager
def running(*, cron_database: str | None = "postgres", port: int | None = None,
            logical: bool = False) -> Iterator[DevServer]:
    server = create(cron_database=cron_database, port=port, logical=logical)
    try:
        yield server
    finally:
        destroy(server)
