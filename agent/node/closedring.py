"""The flow table's last closed flows, without an object per flow.

Each is kept as the kernel's bytes of its record (struct dabba_flow) in one buffer (it grows to
n records, then the oldest are overwritten), with its wall-clock offset, shape and peer port in parallel arrays; a record is decoded
when someone asks (dabba flows). Ten thousand decoded records held 4 MiB, and the holes they
left between the agent's short-lived objects kept its heap from shrinking: after load it had
grown by 10 MiB, with one record kept it grew by 1.5.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from ..bpf.flows import _FLOW, FlowRecord

_NO_PORT = -1


class ClosedRing:
    def __init__(self, n: int):
        self.n = max(n, 1)
        self.size = _FLOW.size
        self.raw = bytearray()
        self.wall = array("d")
        self.port = array("i")
        self.shape: list = []
        self.next = 0  # the slot the next flow takes
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def append(self, raw: bytes, wall: float, shape, port: int | None) -> None:
        i = self.next
        if port is None:
            port = _NO_PORT
        if self.count < self.n:  # still growing: i == count
            self.raw += raw
            self.wall.append(wall)
            self.port.append(port)
            self.shape.append(shape)
            self.count += 1
        else:
            at = i * self.size
            self.raw[at : at + self.size] = raw
            self.wall[i] = wall
            self.port[i] = port
            self.shape[i] = shape
        self.next = i + 1 if i + 1 < self.n else 0

    def __iter__(self) -> Iterator[tuple[FlowRecord, object, int | None]]:
        """Oldest first: (record, shape, peer port)."""
        first = (self.next - self.count) % self.n
        size, raw = self.size, self.raw
        for j in range(self.count):
            i = (first + j) % self.n
            port = self.port[i]
            yield (
                FlowRecord.from_raw(raw[i * size : (i + 1) * size], self.wall[i]),
                self.shape[i],
                None if port == _NO_PORT else port,
            )
