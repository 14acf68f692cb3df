"""Replies no healthy Evolution sends, for testing a client against what proxies and crashes do."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from aiohttp import web

from . import replies
from .config import Mode, SimConfig

__all__ = ["fault_reply"]

_CHUNK = 64 * 1024
_BAD_GATEWAY = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


async def fault_reply(
    mode: Mode, request: web.Request, config: SimConfig, stopping: asyncio.Event, body: bytes
) -> web.StreamResponse:
    """Answer one call with the fault `mode` names; `body` is what a healthy reply would have carried."""
    if mode == "hang":
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), config.hang_seconds)
        return replies.error(504, "Gateway Timeout", ["simulated hang"])
    if mode == "http_500":
        return replies.error(500, "Internal Server Error", ["simulated failure"])
    if mode == "html_502":
        return web.Response(status=502, text=_BAD_GATEWAY, content_type="text/html")
    if mode == "garbage_json":
        return web.Response(body=body[: len(body) // 2] + b'\x00}{"', content_type="application/json")
    if mode == "huge_body":
        return await _stream(request, config.huge_body_bytes)
    if mode == "slow_drip":
        return await _drip(request, body, config.drip_interval)
    if mode == "reset":
        return _reset(request)
    raise ValueError(f"{mode!r} is not a fault")


async def _stream(request: web.Request, size: int) -> web.StreamResponse:
    """`size` bytes of a JSON-looking body, chunked with no Content-Length: only a capped read stops it."""
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    chunk = b'{"code":"2@' + b"A" * (_CHUNK - 11)
    sent = 0
    with contextlib.suppress(ConnectionError):  # the client gave up: that is the point
        while sent < size:
            await resp.write(chunk[: size - sent])
            sent += _CHUNK
            chunk = b"A" * _CHUNK
        await resp.write_eof()
    return resp


async def _drip(request: web.Request, body: bytes, interval: float) -> web.StreamResponse:
    """The healthy body, one byte every `interval` seconds."""
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.content_length = len(body)
    await resp.prepare(request)
    with contextlib.suppress(ConnectionError):
        for i in range(len(body)):
            await resp.write(body[i : i + 1])
            await asyncio.sleep(interval)
        await resp.write_eof()
    return resp


def _reset(request: web.Request) -> web.StreamResponse:
    """Close the connection with a TCP RST (SO_LINGER 0) before any reply byte."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if transport is not None:
        transport.abort()
    # aiohttp drops a reply it cannot write; this one is never sent.
    return web.Response(status=500)
