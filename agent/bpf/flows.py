"""Flow records from the kernel: live ones from dabba_flows, closed ones from the ring.

The agent decodes every closed flow of its node (two per same-node connection, at tens of
thousands a second under connection churn), so a record is decoded with one precompiled
struct and kept as a tuple: no ctypes copy, no per-field objects, addresses from a cache.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import time
from collections.abc import Iterator
from typing import NamedTuple

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
_DIRECTIONS = {d.value: d.name.lower() for d in abi.Direction}
_CLOSES = {c.value: c.name.lower() for c in abi.Close}


def _struct_of(cls) -> struct.Struct:
    """A struct.Struct reading exactly the fields of a ctypes mirror, at their offsets."""
    codes = {1: "B", 2: "H", 4: "I", 8: "Q"}
    fmt, at = "<", 0
    for name, ctype in cls._fields_:
        field = getattr(cls, name)
        if field.offset > at:
            fmt += f"{field.offset - at}x"
        fmt += f"{field.size}s" if issubclass(ctype, ctypes.Structure) else codes[field.size]
        at = field.offset + field.size
    if at < ctypes.sizeof(cls):
        fmt += f"{ctypes.sizeof(cls) - at}x"
    s = struct.Struct(fmt)
    assert s.size == ctypes.sizeof(cls), (fmt, s.size)
    return s


_FLOW = _struct_of(abi.Flow)
_ADDRS: dict[bytes, str] = {}  # 16 address bytes -> text (pods' addresses repeat)


def _addr(b: bytes) -> str:
    text = _ADDRS.get(b)
    if text is None:
        if len(_ADDRS) >= 1 << 16:
            _ADDRS.clear()
        text = _ADDRS[b] = abi.ip6_text(b)
    return text


def wall_offset() -> float:
    """Add to a bpf_ktime_get_ns() time (CLOCK_MONOTONIC), in seconds, for Unix time."""
    return time.time() - time.monotonic()


class FlowRecord(NamedTuple):
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
    refused: str = ""  # why the kernel refused the connect() (abi.REFUSAL_REASONS); "" if not
    direct: bool = False  # a same-node verdict let it go straight to its destination
    rule: int = 0  # the agent's index of that verdict (or of the one that refused it)

    @property
    def duration(self) -> float:
        return (self.end or time.time()) - self.start

    @classmethod
    def from_raw(cls, raw: bytes, wall: float | None = None) -> FlowRecord:
        """A record from struct dabba_flow's bytes; wall: wall_offset(), given once per batch."""
        (
            cookie, cgroup_id, start_ns, _last, end_ns, sent, received, _ba, _br,
            segs_out, segs_in, retrans, srtt_us, src_ip, dst_ip, orig_ip,
            src_port, dst_port, orig_port, direction, close, captured, _seen, state, refused, rule,
        ) = _FLOW.unpack_from(raw)  # fmt: skip
        if wall is None:
            wall = wall_offset()
        # tuple.__new__ with the fields in order: without the generated __new__'s extra call
        return _new(
            cls,
            (
                cookie,
                cgroup_id,
                _DIRECTIONS.get(direction, "unknown"),
                (_addr(src_ip), src_port),
                (_addr(dst_ip), dst_port),
                (_addr(orig_ip), orig_port),
                captured == abi.CAPTURED_TUNNEL,
                sent,
                received,
                segs_out,
                segs_in,
                retrans,
                srtt_us,
                wall + start_ns / 1e9,
                wall + end_ns / 1e9 if end_ns else None,
                _CLOSES.get(close) or str(close),
                _TCP_STATES.get(state) or str(state),
                (abi.REFUSAL_REASONS.get(refused) or f"refusal {refused}") if refused else "",
                captured == abi.CAPTURED_DIRECT,
                rule,
            ),
        )

    def to_raw(self) -> bytes:
        """The kernel's bytes for this record, as from_raw reads them with a wall offset of 0
        (records made in Python; the agent keeps the kernel's own bytes)."""
        refused = _REFUSAL_CODES.get(self.refused)
        if refused is None:
            refused = int(self.refused.rpartition(" ")[2]) if self.refused else 0
        return _FLOW.pack(
            self.cookie, self.cgroup_id, round(self.start * 1e9), 0,
            0 if self.end is None else round(self.end * 1e9), self.bytes_sent,
            self.bytes_received, 0, 0, self.segs_out, self.segs_in, self.retrans, self.srtt_us,
            abi.ip6_key(self.src[0]), abi.ip6_key(self.dst[0]), abi.ip6_key(self.orig_dst[0]),
            self.src[1], self.dst[1], self.orig_dst[1], _DIRECTION_CODES[self.direction],
            _code(_CLOSE_CODES, self.close), abi.CAPTURED_TUNNEL if self.captured
            else abi.CAPTURED_DIRECT if self.direct else 0, 0,
            _code(_STATE_CODES, self.state), refused, self.rule,
        )  # fmt: skip

    def as_dict(self) -> dict:
        d = self._asdict()
        d["duration"] = self.duration
        return d

    def json_line(self) -> str:
        """json.dumps(self.as_dict()) and a newline, at a third of its cost (the agent writes
        every closed flow to closed.jsonl). Text fields come from the kernel's fixed tables
        and inet_ntop; the one free-form field is encoded by json."""
        return _LINE % (
            self.cookie, self.cgroup_id, self.direction, self.src[0], self.src[1],
            self.dst[0], self.dst[1], self.orig_dst[0], self.orig_dst[1], _JSON[self.captured],
            self.bytes_sent, self.bytes_received, self.segs_out, self.segs_in, self.retrans,
            self.srtt_us, self.start, "null" if self.end is None else repr(self.end),
            json.dumps(self.close), json.dumps(self.state), json.dumps(self.refused),
            _JSON[self.direct], self.rule, self.duration,
        )  # fmt: skip


_new = tuple.__new__
_DIRECTION_CODES = {v: k for k, v in _DIRECTIONS.items()}
_CLOSE_CODES = {v: k for k, v in _CLOSES.items()}
_STATE_CODES = {v: k for k, v in _TCP_STATES.items()}
_REFUSAL_CODES = {v: int(k) for k, v in abi.REFUSAL_REASONS.items()}


def _code(codes: dict[str, int], text: str) -> int:
    code = codes.get(text)
    return int(text) if code is None else code


_JSON = {True: "true", False: "false"}
_LINE = (
    '{"cookie": %d, "cgroup_id": %d, "direction": "%s", "src": ["%s", %d], "dst": ["%s", %d], '
    '"orig_dst": ["%s", %d], "captured": %s, "bytes_sent": %d, "bytes_received": %d, '
    '"segs_out": %d, "segs_in": %d, "retrans": %d, "srtt_us": %d, "start": %r, "end": %s, '
    '"close": %s, "state": %s, "refused": %s, "direct": %s, "rule": %d, "duration": %r}\n'
)


class FlowSource:
    """Reads a node's flow maps; one consumer of the closed-flow ring at a time."""

    def __init__(self, pin_maps_dir: str):
        self.flows = Map.pinned(os.path.join(pin_maps_dir, names.MAP_FLOWS))
        self.ring = RingBuffer(Map.pinned(os.path.join(pin_maps_dir, names.MAP_FLOW_EVENTS)))

    def live(self) -> list[FlowRecord]:
        wall = wall_offset()
        return [FlowRecord.from_raw(v, wall) for _, v in self.flows.items()]

    def closed(self, timeout_ms: int = 0) -> Iterator[FlowRecord]:
        """Closed flows waiting in the ring (waits up to timeout_ms for the first)."""
        if timeout_ms:
            self.ring.poll(timeout_ms)
        wall = wall_offset()
        for raw in self.ring.drain():
            yield FlowRecord.from_raw(raw, wall)

    def closed_raw(self, timeout_ms: int = 0) -> tuple[list[FlowRecord], list[bytes], float]:
        """closed(), with each record's bytes and the batch's wall offset (what the agent keeps
        of the last ones: agent/node/closedring.py)."""
        if timeout_ms:
            self.ring.poll(timeout_ms)
        wall = wall_offset()
        raws = list(self.ring.drain())
        return [FlowRecord.from_raw(raw, wall) for raw in raws], raws, wall

    def close(self) -> None:
        self.ring.close()
        self.ring.map.close()
        self.flows.close()
