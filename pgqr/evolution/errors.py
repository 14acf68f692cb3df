"""The Evolution error classes, declared once: whether each is transient, what it means, how it backs off."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ErrorClass = Literal[
    "not_found", "unauthorized", "not_loaded", "api_error", "empty_reply", "bad_reply", "bad_request",
    "not_activated", "http_error", "throttled", "too_large", "server_error", "timeout", "network", "config",
    "internal", "app_refused",
]


@dataclass(frozen=True)
class ErrorClassInfo:
    transient: bool  # retry soon: the same call is expected to succeed later without anyone changing anything
    meaning: str
    backoff_base: float  # seconds before the first retry; a transient class doubles it per failure
    backoff_max: float   # the cap (a permanent class always waits backoff_base: someone must fix something)


# The one table of error classes: Failure.transient comes from here; `pgqr migrate` copies it into
# pgqr.error_classes (where the write path reads the backoff) and the README lists it.
ERROR_CLASSES: dict[str, ErrorClassInfo] = {
    "not_found": ErrorClassInfo(False, "Evolution has no instance of that name, or the base URL is wrong (404)",
                                1800, 1800),
    "unauthorized": ErrorClassInfo(False, "the API key or instance token was rejected (401)", 1800, 1800),
    "not_loaded": ErrorClassInfo(
        True, "the instance is in Evolution's database but not loaded in memory yet (after a restart); "
              "recovers in seconds", 2, 60),
    "api_error": ErrorClassInfo(False, "Evolution answered 200 with an error object", 1800, 1800),
    "empty_reply": ErrorClassInfo(False, "200 with an empty body (Evolution v1.8's controller error)", 300, 300),
    "bad_reply": ErrorClassInfo(
        False, "a reply Evolution does not send: not JSON, another shape, a field of the wrong type or range",
        300, 300),
    "bad_request": ErrorClassInfo(False, "Evolution refused the request body as invalid (400)", 1800, 1800),
    "not_activated": ErrorClassInfo(False, "Evolution 2.4 is not activated (503 LICENSE_REQUIRED)", 1800, 1800),
    "http_error": ErrorClassInfo(False, "an HTTP status Evolution does not send here (a redirect, another 4xx)",
                                 900, 900),
    "throttled": ErrorClassInfo(True, "a proxy in front of Evolution throttled or timed out the call (408, 429)",
                                10, 300),
    "too_large": ErrorClassInfo(False, "the reply was larger than the size cap", 300, 300),
    "server_error": ErrorClassInfo(True, "Evolution or a proxy in front of it failed (5xx)", 10, 600),
    "timeout": ErrorClassInfo(True, "no complete reply within the timeout (a connect on a closed instance can "
                                    "take 8 s and more: backs off, never retried at once)", 10, 300),
    "network": ErrorClassInfo(True, "the connection failed (refused, reset, name resolution)", 5, 300),
    "config": ErrorClassInfo(
        True, "the instance cannot be called as configured (no or a malformed base URL, no key, the name . "
              "or ..); retried, so a fixed row heals", 60, 900),
    "internal": ErrorClassInfo(
        True, "a bug caught around one call (the reconcile loop's class; the client never returns it)", 30, 900),
    "app_refused": ErrorClassInfo(
        False, "the app's own table refused pgqr's write (a CHECK, trigger, row security or exclusion constraint; "
               "the refresh log's detail has its SQLSTATE and message): the call worked, nothing was written",
        300, 300),
}


def error_class_table() -> str:
    """The README's table of error classes."""
    rows = ["| class | transient | first retry | cap | meaning |", "|---|---|---|---|---|"]
    for name, info in ERROR_CLASSES.items():
        rows.append(f"| `{name}` | {'yes' if info.transient else 'no'} | {info.backoff_base:g} s | "
                    f"{info.backoff_max:g} s | {info.meaning} |")
    return "\n".join(rows)
