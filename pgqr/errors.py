"""Errors a user must fix; str() is one line meant for them."""

from __future__ import annotations


class MigrationError(RuntimeError):
    """A problem a user must fix; str() is one line meant for them."""


class ConfigurationError(MigrationError):
    """The server is not configured for pgqr (e.g. pg_cron missing): exit status 2."""


class NotInstalled(ConfigurationError):
    """This database has no pgqr: the same line (exit status 2) from every command that needs it."""

    def __init__(self, database: str) -> None:
        super().__init__(f"pgqr is not installed in database {database}: run `pgqr migrate` first")
