"""Errors a user must fix; str() is one line meant for them."""

from __future__ import annotations


class MigrationError(RuntimeError):
    """A problem a user must fix; str() is one line meant for them."""


class ConfigurationError(MigrationError):
    """The server is not configured for pgqr (e.g. pg_cron missing): exit status 2."""
