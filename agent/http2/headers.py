"""HPACK (RFC 7541) as the mesh's HTTP/2 (wire.py) uses it: our header blocks are encoded as static-table
references and literals that never touch the dynamic table (RFC 7541 §6.2.2), which every
decoder takes whatever its table size; a peer's are decoded by ``hpack`` (Huffman codes, the
dynamic table), or on a short path when a block uses neither."""

from __future__ import annotations

import hpack
from hpack.table import HeaderTable


class HeaderError(Exception):
    """A header block that does not decode (the connection's COMPRESSION_ERROR)."""


Decoder = hpack.Decoder  # one per connection: its dynamic table follows the peer's

# ---- HPACK ------------------------------------------------------------------------------------

_STATIC = HeaderTable.STATIC_TABLE  # 1-based in RFC 7541: _STATIC[i - 1]
_STATIC_NAME = {}
for _i, (_n, _v) in enumerate(_STATIC, 1):
    _STATIC_NAME.setdefault(_n.decode(), _i)
_STATIC_PAIR = {(n.decode(), v.decode()): i for i, (n, v) in enumerate(_STATIC, 1) if v}


def _hpack_int(value: int, prefix: int, first: int) -> bytes:
    """RFC 7541 §5.1: value in a prefix of `prefix` bits, the octet's other bits `first`."""
    top = (1 << prefix) - 1
    if value < top:
        return bytes((first | value,))
    out = bytearray((first | top,))
    value -= top
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_headers(headers) -> bytes:
    """A header block of static-table references and literals without indexing (never Huffman,
    never the dynamic table): any decoder takes it whatever its table size."""
    out = bytearray()
    for name, value in headers:
        full = _STATIC_PAIR.get((name, value))
        if full is not None:
            out.append(0x80 | full)  # indexed field
            continue
        v = value.encode()
        idx = _STATIC_NAME.get(name)
        if idx is not None:
            out += _hpack_int(idx, 4, 0x00)  # literal without indexing, indexed name
        else:
            n = name.encode()
            out.append(0x00)
            out += _hpack_int(len(n), 7, 0x00) + n
        out += _hpack_int(len(v), 7, 0x00) + v
    return bytes(out)


def _read_int(block, pos: int, prefix: int) -> tuple[int, int]:
    top = (1 << prefix) - 1
    value = block[pos] & top
    pos += 1
    if value < top:
        return value, pos
    shift = 0
    while True:
        b = block[pos]
        pos += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos
        if shift > 28:
            raise IndexError("HPACK integer too long")


def decode_plain(block: bytes) -> list | None:
    """A block of static references and plain (not Huffman) literals that are not indexed
    decodes without the dynamic table; None when the block needs more (hpack then decodes it,
    keeping the table right)."""
    out, pos, n = [], 0, len(block)
    try:
        while pos < n:
            b = block[pos]
            if b & 0x80:  # indexed field
                idx, pos = _read_int(block, pos, 7)
                if not 1 <= idx <= len(_STATIC):
                    return None
                out.append(_STATIC[idx - 1])
                continue
            if b & 0xE0:  # incremental indexing or a table size update: the table changes
                return None
            idx, pos = _read_int(block, pos, 4)  # without indexing / never indexed
            if idx:
                if idx > len(_STATIC):
                    return None
                name = _STATIC[idx - 1][0]
            else:
                if block[pos] & 0x80:
                    return None  # Huffman
                ln, pos = _read_int(block, pos, 7)
                name = block[pos : pos + ln]
                pos += ln
            if block[pos] & 0x80:
                return None
            ln, pos = _read_int(block, pos, 7)
            value = block[pos : pos + ln]
            pos += ln
            if pos > n:
                return None
            out.append((name, value))
    except IndexError:
        return None  # truncated: let hpack say what is wrong
    return out


def decode(decoder: hpack.Decoder, block: bytes) -> list[tuple[str, str]]:
    """A peer's header block as (name, value) text; every block goes through here, so that the
    decoder's table follows the peer's encoder. Raises HeaderError."""
    raw = decode_plain(block)
    if raw is None:
        try:
            raw = decoder.decode(block, raw=True)
        except hpack.HPACKError as e:
            raise HeaderError(str(e)) from None
    return [
        (bytes(k).decode("utf-8", "replace"), bytes(v).decode("utf-8", "replace")) for k, v in raw
    ]
