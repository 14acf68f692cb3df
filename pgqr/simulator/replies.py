"""Evolution's reply bodies, byte-for-byte where evolution-api.md (sections 1, 6 and 9) shows them."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .lifecycle import Instance

__all__ = [
    "error",
    "instance_row",
    "license_required",
    "not_found_instance",
    "not_loaded",
    "schema_error",
    "settings",
    "unauthorized",
]

VERSION = "2.3.6"


def error(status: int, name: str, message: str | list[Any]) -> web.Response:
    """main.ts's error envelope: {status, error, response: {message}}."""
    return web.json_response({"status": status, "error": name, "response": {"message": message}}, status=status)


def schema_error(*messages: str) -> web.Response:
    """A JSON-schema validation error: the message list is nested twice (section 9)."""
    return error(400, "Bad Request", [list(messages)])


def not_found_instance(name: str) -> web.Response:
    return error(404, "Not Found", [f'The "{name}" instance does not exist'])


def unauthorized() -> web.Response:
    return error(401, "Unauthorized", "Unauthorized")


def not_loaded() -> web.Response:
    """The controller's catch for a DB row not held in memory: 200 and a stringified exception object."""
    return web.json_response({"error": True, "message": "[object Object]"})


def license_required() -> web.Response:
    return web.json_response({
        "error": "service not activated",
        "code": "LICENSE_REQUIRED",
        "register_url": "http://localhost/manager/login",
        "instance_id": "00000000-0000-4000-8000-000000000000",
        "docs_url": "https://doc.evolution-api.com",
        "message": "This Evolution API installation is not activated.",
    }, status=503)


def settings() -> dict[str, Any]:
    return {
        "rejectCall": False, "msgCall": "", "groupsIgnore": False, "alwaysOnline": False,
        "readMessages": False, "readStatus": False, "syncFullHistory": False,
    }


def instance_row(inst: Instance) -> dict[str, Any]:
    """One fetchInstances row (the DB row; EXPOSE_IN_FETCH_INSTANCES only affects webhooks in v2)."""
    return {
        "id": inst.instance_id,
        "name": inst.name,
        "connectionStatus": inst.db_status,  # the database column, not the in-memory state
        "ownerJid": inst.wuid,
        "profileName": inst.profile_name,
        "profilePicUrl": None,
        "integration": "WHATSAPP-BAILEYS",
        "number": None,
        "businessId": None,
        "token": inst.token,
        "clientName": "evolution_exchange",
        "disconnectionReasonCode": inst.disconnection_code,
        "disconnectionObject": None,
        "disconnectionAt": inst.disconnection_at,
        "createdAt": inst.created_at,
        "updatedAt": inst.created_at,
        "Chatwoot": None,
        "Proxy": None,
        "Rabbitmq": None,
        "Nats": None,
        "Sqs": None,
        "Websocket": None,
        "Setting": settings(),
        "_count": {"Message": 0, "Contact": 0, "Chat": 0},
    }
