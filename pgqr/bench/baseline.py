"""The way pgqr replaces, measured the same way as pgqr: one call, one UPDATE and commit at a time, or the
once-a-minute Edge Function rewriting every row's QR."""

from __future__ import annotations

import base64
import os
import time
from urllib.parse import quote

import aiohttp
import psycopg

from .database import Db
from .load import IMAGE_BYTES


async def sequential(d: Db, evolution_url: str, sample: dict[str, str]) -> float:
    """Seconds per instance the old Edge Function's way: one call, one UPDATE and commit, one after another."""
    async with aiohttp.ClientSession() as http, await psycopg.AsyncConnection.connect(d.dsn) as conn:
        started = time.perf_counter()
        for name, token in sample.items():
            async with http.get(f"{evolution_url}/instance/connect/{quote(name, safe='')}",
                                headers={"apikey": token}) as resp:
                body = await resp.json()
            await conn.execute("UPDATE public.evolution_instances SET qr_code = %s, last_qr_update = now() "
                               "WHERE instance_name = %s", (body.get("base64"), name))
            await conn.commit()
        return (time.perf_counter() - started) / len(sample)


async def edge_function_minute(d: Db, names: list[str]) -> float:
    """WAL per instance of one run of the Edge Function pgqr replaces: one UPDATE per instance, in a sequential
    loop, writing a new 13 KB QR (random, as a PNG's base64 is to PostgreSQL's compression) whether or not it
    changed. pgqr's trigger does not fire for the QR column."""
    start = await d.wal_lsn()
    async with await psycopg.AsyncConnection.connect(d.dsn, autocommit=True) as conn:
        for name in names:
            image = "data:image/png;base64," + base64.b64encode(os.urandom(IMAGE_BYTES * 3 // 4)).decode()
            await conn.execute("UPDATE public.evolution_instances SET qr_code = %s WHERE instance_name = %s",
                               (image, name))
    return float(await d.wal_lsn() - start) / len(names)
