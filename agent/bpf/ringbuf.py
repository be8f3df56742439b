"""Consumer of a BPF ring buffer over mmap, without bcc.

Layout (kernel/bpf/ringbuf.c): page 0 holds the consumer position (we write
it); from page 1 the producer position page, then the data area mapped twice
in a row so that a record that wraps reads as one slice. Each record starts
with an 8-byte header: u32 length with BUSY (bit 31) and DISCARD (bit 30)
flags, u32 page offset; records are 8-byte aligned.
"""

from __future__ import annotations

import mmap
import select
import struct
from collections.abc import Iterator

from .sys import Map

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8


class RingBuffer:
    """Reads records from a ringbuf map fd; poll() waits for the producer."""

    def __init__(self, ring: Map):
        if ring.info.type_name != "ringbuf":
            raise ValueError(f"{ring.name} is a {ring.info.type_name} map, not a ringbuf")
        self.map = ring
        self.size = ring.info.max_entries
        self.mask = self.size - 1
        page = mmap.PAGESIZE
        self._cons = mmap.mmap(
            ring.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
        )
        self._prod = mmap.mmap(
            ring.fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
        )
        self._poll = select.poll()
        self._poll.register(ring.fd, select.POLLIN)

    def fileno(self) -> int:
        return self.map.fd

    def poll(self, timeout_ms: int) -> bool:
        """Wait until records may be available; True if woken by the kernel."""
        return bool(self._poll.poll(timeout_ms))

    def drain(self) -> Iterator[bytes]:
        """Yield every committed record, advancing the consumer position."""
        page = mmap.PAGESIZE
        cons = struct.unpack_from("=Q", self._cons, 0)[0]
        while True:
            prod = struct.unpack_from("=Q", self._prod, 0)[0]
            if cons >= prod:
                return
            off = page + (cons & self.mask)
            (length,) = struct.unpack_from("=I", self._prod, off)
            if length & _BUSY:
                return
            n = length & ~(_BUSY | _DISCARD)
            if not length & _DISCARD:
                yield bytes(self._prod[off + _HDR : off + _HDR + n])
            cons += (n + _HDR + 7) & ~7
            struct.pack_into("=Q", self._cons, 0, cons)

    def close(self) -> None:
        self._cons.close()
        self._prod.close()
