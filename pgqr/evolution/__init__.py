"""Evolution API, as pgqr sees it: every reply becomes a typed outcome value, never an exception.

One job per module: `errors` the table of error classes, `replies` the outcome types and the pure classifiers of a
reply (docs evolution-api.md, sections 1 and 2), `urls` the URL checks and display, `client` the HTTP client.
Callers import from here. Like the rest of this package, it imports nothing else from pgqr (an import contract).
"""

from __future__ import annotations

from .client import WEBHOOK_EVENTS, EvolutionClient
from .errors import ERROR_CLASSES, ErrorClass, ErrorClassInfo, error_class_table
from .replies import (
    Connected,
    EvolutionState,
    Failure,
    InstanceList,
    InstanceRow,
    NoQrYet,
    NoWebhook,
    Outcome,
    QrCode,
    Reply,
    WebhookConfig,
    classify_connect_reply,
    classify_connection_state_reply,
    classify_fetch_instances_reply,
    classify_webhook_reply,
)
from .urls import display_url, is_http_url

__all__ = [
    "ERROR_CLASSES",
    "WEBHOOK_EVENTS",
    "Connected",
    "ErrorClass",
    "ErrorClassInfo",
    "EvolutionClient",
    "EvolutionState",
    "Failure",
    "InstanceList",
    "InstanceRow",
    "NoQrYet",
    "NoWebhook",
    "Outcome",
    "QrCode",
    "Reply",
    "WebhookConfig",
    "classify_connect_reply",
    "classify_connection_state_reply",
    "classify_fetch_instances_reply",
    "classify_webhook_reply",
    "display_url",
    "error_class_table",
    "is_http_url",
]
