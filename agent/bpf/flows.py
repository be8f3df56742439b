"""Flow records from the kernel: live ones from dabba_flows, closed ones from the ring."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from . import abi, names
from .ringbuf import RingBuffer
from .sys import Map

_TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
}


_SRC, _DST, _ORIG = abi.Flow.src_ip.offset, abi.Flow.dst_ip.offset, abi.Flow.orig_ip.offset


def mono_to_wall(ns: int) -> float:
    """bpf_ktime_get_ns() (CLOCK_MONOTONIC) to Unix time."""
    return time.time() - time.monotonic() + ns / 1e9


@dataclass(frozen=True)
class FlowRecord:
    """One flow of an enrolled workload, as the kernel accounted it.

    Addresses are those of the workload's own socket: for a captured
    connection dst is the tunnel and orig_dst where the workload was going.
    """

    cookie: int
    cgroup_id: int
    direction: str  # "outbound" | "inbound"
    src: tuple[str, int]
    dst: tuple[str, int]
    orig_dst: tuple[str, int]
    captured: bool
    bytes_sent: int
    bytes_received: int
    segs_out: int
    segs_in: int
    retrans: int
    srtt_us: int
    start: float  # Unix time
    end: float | None  # None while open
    close: str  # "open" | "fin" | "reset" | "refused" | "half"
    state: str
    refused: str = (
        ""  # why the kernel refused the connect() (abi.REFUSAL_REASONS); "" if it did not
    )
    direct: bool = False  # a same-node verdict let it go straight to its destination
    rule: int = 0  # the agent's index of that verdict (or of the one that refused it)

    @property
    def duration(self) -> float:
        return (self.end or time.time()) - self.start

    @classmethod
    def from_raw(cls, raw: bytes) -> FlowRecord:
        f = abi.from_bytes(abi.Flow, raw)
        return cls(
            cookie=f.cookie,
            cgroup_id=f.cgroup_id,
            direction=abi.Direction(f.direction).name.lower()
            if f.direction in (1, 2)
            else "unknown",
            src=(abi.ip6_text(raw[_SRC : _SRC + 16]), f.src_port),
            dst=(abi.ip6_text(raw[_DST : _DST + 16]), f.dst_port),
            orig_dst=(abi.ip6_text(raw[_ORIG : _ORIG + 16]), f.orig_port),
            captured=f.captured == abi.CAPTURED_TUNNEL,
            bytes_sent=f.bytes_sent,
            bytes_received=f.bytes_received,
            segs_out=f.segs_out,
            segs_in=f.segs_in,
            retrans=f.retrans,
            srtt_us=f.srtt_us,
            start=mono_to_wall(f.start_ns),
            end=mono_to_wall(f.end_ns) if f.end_ns else None,
            close=abi.Close(f.close).name.lower()
            if f.close in abi.Close._value2member_map_
            else str(f.close),
            state=_TCP_STATES.get(f.last_state, str(f.last_state)),
            refused=abi.REFUSAL_REASONS.get(f.refused, f"refusal {f.refused}") if f.refused else "",
            direct=f.captured == abi.CAPTURED_DIRECT,
            rule=f.rule,
        )

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["duration"] = self.duration
        return d


class FlowSource:
    """Reads a node's flow maps; one consumer of the closed-flow ring at a time."""

    def __init__(self, pin_maps_dir: str):
        self.flows = Map.pinned(os.path.join(pin_maps_dir, names.MAP_FLOWS))
        self.ring = RingBuffer(Map.pinned(os.path.join(pin_maps_dir, names.MAP_FLOW_EVENTS)))

    def live(self) -> list[FlowRecord]:
        return [FlowRecord.from_raw(v) for _, v in self.flows.items()]

    def closed(self, timeout_ms: int = 0) -> Iterator[FlowRecord]:
        """Closed flows waiting in the ring (waits up to timeout_ms for the first)."""
        if timeout_ms:
            self.ring.poll(timeout_ms)
        for raw in self.ring.drain():
            yield FlowRecord.from_raw(raw)

    def close(self) -> None:
        self.ring.close()
        self.ring.map.close()
        self.flows.close()
