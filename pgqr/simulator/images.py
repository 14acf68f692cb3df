"""QR strings shaped like Baileys' and PNG data URLs sized like Evolution's, rendered once per process.

Evolution renders each QR with node's `qrcode.toDataURL(code, {margin: 3, scale: 4, errorCorrectionLevel: 'H',
color: {dark: '#198754'}})`, which packs an RGBA PNG with pngjs (adaptive row filter, deflate level 9, Z_RLE).
For a ~230-character Baileys code that is a ~13 KB data URL. segno draws the matrix; `_png` packs it the way
pngjs does so the bytes a client stores and compares are as large as the real ones. Rendering costs milliseconds,
so a simulator draws a pool once and hands its images out in turn (see `ImagePool`), never one per request.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PoolImage", "baileys_code", "image_pool", "pairing_code"]

_Rgba = tuple[int, int, int, int]
_Filtered = tuple[tuple[int, ...], tuple[bytes, ...]]  # each PNG filter's cost, and its output bytes
_DARK: _Rgba = (0x19, 0x87, 0x54, 0xFF)  # Evolution's QRCODE_COLOR default
_LIGHT: _Rgba = (0xFF, 0xFF, 0xFF, 0xFF)
_NOTHING: _Rgba = (0, 0, 0, 0)  # pngjs's "pixel" left of the first column and above the first row
_SCALE = 4
_MARGIN = 3
_DATA_URL_PREFIX = "data:image/png;base64,"
_PAIRING_ALPHABET = "ABCDEFGHJKLMNPQRSTVWXYZ0123456789"


@dataclass(frozen=True)
class PoolImage:
    data_url: str
    md5: str  # of data_url: what /_sim/current reports, computed once


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def baileys_code(seed: bytes) -> str:
    """A 229-character QR string shaped like WhatsApp's: "2@<ref>,<noise key>,<identity key>,<adv secret>"."""
    raw = hashlib.shake_256(seed).digest(69 + 3 * 32)
    keys = [raw[69 + 32 * i : 101 + 32 * i] for i in range(3)]
    return ",".join([f"2@{_b64(raw[:69])}", *map(_b64, keys)])


def pairing_code(seed: bytes) -> str:
    """An 8-character phone pairing code (Evolution's docs show "WZYEH1YY")."""
    raw = hashlib.blake2b(seed, digest_size=8).digest()
    return "".join(_PAIRING_ALPHABET[b % len(_PAIRING_ALPHABET)] for b in raw)


@functools.cache
def image_pool(size: int) -> tuple[PoolImage, ...]:
    """`size` distinct QR images, rendered on first use and kept for the life of the process."""
    if size < 2:
        raise ValueError("the image pool needs at least 2 images so consecutive QRs differ")
    try:
        import segno
    except ImportError:  # segno is the `sim` extra: only the simulator needs it
        raise RuntimeError("the simulator needs segno: pip install 'pgqr[sim]'") from None
    pool = []
    for i in range(size):
        # A fixed mask per image: choosing the best of 8 (as node does) costs 5x the time for no benefit here.
        code = baileys_code(b"pool-%d" % i)
        matrix = segno.make(code, error="h", boost_error=False, micro=False, mask=i % 8).matrix
        url = _DATA_URL_PREFIX + _b64(_png(matrix))
        pool.append(PoolImage(url, hashlib.md5(url.encode()).hexdigest()))
    return tuple(pool)


# ---- PNG packing as pngjs does it (RGBA, 8 bit, per-row filter with the least sum of differences) ----


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _predictions(a: int, b: int, c: int) -> tuple[int, int, int, int, int]:
    """What each PNG filter (None, Sub, Up, Average, Paeth) predicts from left a, up b, upper-left c."""
    return (0, a, b, (a + b) >> 1, _paeth(a, b, c))


@functools.cache
def _filtered_pixel(x: _Rgba, a: _Rgba, b: _Rgba, c: _Rgba) -> _Filtered:
    """For one pixel: each filter's sum of |difference| (pngjs's cost) and its output bytes."""
    diffs = [[x[i] - p for p in _predictions(a[i], b[i], c[i])] for i in range(4)]
    sums = tuple(sum(abs(diffs[i][f]) for i in range(4)) for f in range(5))
    outs = tuple(bytes(diffs[i][f] & 0xFF for i in range(4)) for f in range(5))
    return sums, outs


@functools.cache
def _filtered_module(colour: _Rgba, left: _Rgba, up: _Rgba, upper_left: _Rgba) -> _Filtered:
    """One module (_SCALE pixels wide; only its first pixel sees another left neighbour): each filter's cost
    and output bytes."""
    first_sums, first_outs = _filtered_pixel(colour, left, up, upper_left)
    rest_sums, rest_outs = _filtered_pixel(colour, colour, up, up)
    sums = tuple(first_sums[f] + (_SCALE - 1) * rest_sums[f] for f in range(5))
    return sums, tuple(first_outs[f] + rest_outs[f] * (_SCALE - 1) for f in range(5))


def _filter_row(cur: Sequence[_Rgba], prev: Sequence[_Rgba]) -> bytes:
    """One pixel row whose modules have colours `cur`, under a row of colours `prev`: filter byte + data."""
    modules = [
        _filtered_module(colour, cur[m - 1] if m else _NOTHING, prev[m], prev[m - 1] if m else _NOTHING)
        for m, colour in enumerate(cur)
    ]
    sums = [sum(column) for column in zip(*(module_sums for module_sums, _ in modules), strict=True)]
    best = min(range(5), key=lambda f: (sums[f], f))  # the first of equal sums, as pngjs picks
    return bytes([best]) + b"".join(outs[best] for _, outs in modules)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(matrix: Sequence[Sequence[int]]) -> bytes:
    quiet = [_LIGHT] * (len(matrix) + 2 * _MARGIN)
    rows = [quiet] * _MARGIN
    rows += [[_LIGHT] * _MARGIN + [_DARK if v & 1 else _LIGHT for v in line] + [_LIGHT] * _MARGIN for line in matrix]
    rows += [quiet] * _MARGIN
    raw: list[bytes] = []
    prev = [_NOTHING] * len(quiet)
    for row in rows:
        raw.append(_filter_row(row, prev))
        raw.extend([_filter_row(row, row)] * (_SCALE - 1))
        prev = row
    packer = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    side = len(quiet) * _SCALE
    header = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)  # 8-bit RGBA, like pngjs
    return b"".join([
        b"\x89PNG\r\n\x1a\n",
        _chunk(b"IHDR", header),
        _chunk(b"IDAT", packer.compress(b"".join(raw)) + packer.flush()),
        _chunk(b"IEND", b""),
    ])
