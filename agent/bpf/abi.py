"""ctypes mirrors of include/types.h, for readers that do not load bcc.

Each class quotes the C struct it mirrors. tests/kernel/test_abi.py compares
sizes and field offsets with the types bcc derives from the C (our
alignchecker), so a change to the header that is not made here fails a test.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import socket
import struct

WL_CAPTURE = 0x1
WL_STRICT = 0x2
WL_ACCOUNT = 0x4

SEEN_FIN_IN = 0x1
SEEN_FIN_OUT = 0x2


class Direction(enum.IntEnum):
    """enum dabba_direction"""

    OUTBOUND = 1
    INBOUND = 2


class Close(enum.IntEnum):
    """enum dabba_close"""

    OPEN = 0
    FIN = 1
    RESET = 2
    REFUSED = 3


class Stat(enum.IntEnum):
    """enum dabba_stat: indexes of dabba_stats."""

    CAPTURED = 0
    EXCLUDED = 1
    CAP_FULL = 2
    TUPLE_FULL = 3
    FLOW_OPENED = 4
    FLOW_CLOSED = 5
    FLOW_FULL = 6
    RING_DROP = 7
    GUARD_DROP = 8
    SPLICE_BYTES = 9
    SPLICE_PASS = 10
    PLAIN_STEERED = 11
    PLAIN_NO_TUNNEL = 12
    LOCAL = 13
    DST_REFUSED = 14
    V6_REFUSED = 15
    PROTO_REFUSED = 16
    PLAIN_V6_DROP = 17
    OWN_NO_TUNNEL = 18
    FAMILY_SEEN = 19
    FAMILY_REFUSED = 20
    LSM_FAILED = 21
    LIMIT_REFUSED = 22
    DIRECT = 23
    POLICY_REFUSED = 24
    GUARD_DIRECT = 25
    SVC_RESOLVED = 26
    SVC_NO_ENDPOINT = 27
    LB_FAILED = 28
    LB_EJECTED = 29
    LB_EJECT_LIMIT = 30


STAT_COUNT = 31  # DABBA_ST_MAX

TUN_SK_OUTBOUND = 0  # dabba_tun_sk keys
TUN_SK_HBONE = 1
TUN_SK_OUTBOUND6 = 2

CFG_PASS_NON_TCP = 0x1  # DABBA_CFG_PASS_NON_TCP


class Refusal(enum.IntEnum):
    """enum dabba_refusal: why the kernel refused a workload's connect()."""

    NONE = 0
    LINK_LOCAL = 1
    NODE = 2
    MESH_PORT = 3
    IPV6 = 4
    CAP_FULL = 5
    LIMIT = 6
    POLICY = 7
    NO_ENDPOINT = 8


REFUSAL_REASONS = {
    Refusal.LINK_LOCAL: "the destination is a link-local address (the node's link, not the mesh)",
    Refusal.NODE: "the destination is an address of the node itself",
    Refusal.MESH_PORT: "the destination is one of the mesh's own ports",
    Refusal.IPV6: "the destination is a native IPv6 address and this node's tunnel has none "
    "(tunnel.address6): IPv6 is never sent around the mesh",
    Refusal.CAP_FULL: "the node's capture map was full",
    Refusal.LIMIT: "the workload holds its maximum of open connections (capture.max_connections)",
    Refusal.POLICY: "denied by a same-node verdict",
    Refusal.NO_ENDPOINT: "the service has no endpoint for this port (ECONNREFUSED)",
}


class Workload(ctypes.Structure):
    """struct dabba_workload { __u32 id; __u32 flags; };"""

    _fields_ = [("id", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class Ip6(ctypes.Structure):
    """struct dabba_ip6 { __u32 w[4]; }: IPv6 as it is, IPv4 as IPv4-mapped (network order)."""

    _fields_ = [("w", ctypes.c_uint32 * 4)]


def ip6_key(addr: str) -> bytes:
    """An address of either family as struct dabba_ip6's bytes: IPv6 as it is, IPv4 as
    IPv4-mapped. inet_pton first (the tunnel converts two per new flow); ipaddress for what it
    refuses, which then raises ValueError naming the address."""
    try:
        if ":" in addr:
            return socket.inet_pton(socket.AF_INET6, addr)
        b = socket.inet_pton(socket.AF_INET, addr)
        if socket.inet_ntop(socket.AF_INET, b) != addr:  # leading zeros: ipaddress decides
            return _slow(addr)
        return _V4_MAPPED + b
    except OSError:
        return _slow(addr)


def _slow(addr: str) -> bytes:
    a = ipaddress.ip_address(addr)
    if a.version == 4:
        a = ipaddress.IPv6Address(f"::ffff:{a}")
    return a.packed


def ip6(addr: str) -> Ip6:
    return Ip6.from_buffer_copy(ip6_key(addr))


_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def ip6_str(a: Ip6) -> str:
    """Inverse of ip6(): IPv4-mapped addresses come back as IPv4."""
    return ip6_text(bytes(a))


def ip6_text(b: bytes) -> str:
    """An address's 16 bytes (struct dabba_ip6) as text: IPv4-mapped ones as IPv4. inet_ntop, not
    ipaddress (the agent converts three addresses per closed flow: ipaddress cost it a tenth of a
    core under connection churn); ipaddress only where glibc's text differs (::a.b.c.d)."""
    if b[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, b[12:])
    if b[:12] == bytes(12) and b[12:14] != b"\0\0":
        return str(ipaddress.IPv6Address(b))
    return socket.inet_ntop(socket.AF_INET6, b)


class Config(ctypes.Structure):
    """struct dabba_config { __u32 tunnel_ip; __u16 tunnel_port; __u16 enabled;
    __u32 tunnel_mark; __u16 flags; __u16 hbone_port; __u32 max_open; __u32 _pad;
    struct dabba_ip6 tunnel_ip6; __u32 verdict_gen; __u16 eject_after; __u16 max_ejected_pct;
    __u32 eject_ms; __u16 spread_base; __u16 spread_count; };"""

    _fields_ = [
        ("tunnel_ip", ctypes.c_uint32),
        ("tunnel_port", ctypes.c_uint16),
        ("enabled", ctypes.c_uint16),
        ("tunnel_mark", ctypes.c_uint32),
        ("flags", ctypes.c_uint16),
        ("hbone_port", ctypes.c_uint16),
        ("max_open", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("tunnel_ip6", Ip6),
        ("verdict_gen", ctypes.c_uint32),
        ("eject_after", ctypes.c_uint16),
        ("max_ejected_pct", ctypes.c_uint16),
        ("eject_ms", ctypes.c_uint32),
        ("spread_base", ctypes.c_uint16),
        ("spread_count", ctypes.c_uint16),
    ]


class Capture(ctypes.Structure):
    """struct dabba_capture { __u64 cgroup_id; __u64 cookie; struct dabba_ip6 orig_ip;
    struct dabba_ip6 svc_ip; __u16 orig_port; __u16 svc_port; __u32 _pad; };"""

    _fields_ = [
        ("cgroup_id", ctypes.c_uint64),
        ("cookie", ctypes.c_uint64),
        ("orig_ip", Ip6),
        ("svc_ip", Ip6),
        ("orig_port", ctypes.c_uint16),
        ("svc_port", ctypes.c_uint16),
        ("_pad", ctypes.c_uint32),
    ]


class Tuple(ctypes.Structure):
    """struct dabba_tuple { struct dabba_ip6 src_ip; struct dabba_ip6 dst_ip; __u16 src_port;
    __u16 dst_port; };"""

    _fields_ = [
        ("src_ip", Ip6),
        ("dst_ip", Ip6),
        ("src_port", ctypes.c_uint16),
        ("dst_port", ctypes.c_uint16),
    ]


class Lpm(ctypes.Structure):
    """struct dabba_lpm { __u32 prefixlen; struct dabba_ip6 ip; }: an IPv4 CIDR as its
    IPv4-mapped form (prefixlen + 96)."""

    _fields_ = [("prefixlen", ctypes.c_uint32), ("ip", Ip6)]


MTLS_STRICT = 1  # DABBA_MTLS_STRICT
MTLS_PLAINTEXT = 2  # DABBA_MTLS_PLAINTEXT


class IpPort(ctypes.Structure):
    """struct dabba_ip_port { struct dabba_ip6 ip; __u16 port; __u16 _pad; };"""

    _fields_ = [("ip", Ip6), ("port", ctypes.c_uint16), ("_pad", ctypes.c_uint16)]


class Flow(ctypes.Structure):
    """struct dabba_flow (include/types.h): u64 cookie, cgroup_id, start_ns,
    last_ns, end_ns, bytes_sent, bytes_received, base_acked, base_received;
    u32 segs_out, segs_in, retrans, srtt_us; struct dabba_ip6 src_ip, dst_ip, orig_ip;
    u16 src_port, dst_port, orig_port; u8 direction, close, captured, seen,
    last_state, refused; u32 rule."""

    _fields_ = [
        ("cookie", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("start_ns", ctypes.c_uint64),
        ("last_ns", ctypes.c_uint64),
        ("end_ns", ctypes.c_uint64),
        ("bytes_sent", ctypes.c_uint64),
        ("bytes_received", ctypes.c_uint64),
        ("base_acked", ctypes.c_uint64),
        ("base_received", ctypes.c_uint64),
        ("segs_out", ctypes.c_uint32),
        ("segs_in", ctypes.c_uint32),
        ("retrans", ctypes.c_uint32),
        ("srtt_us", ctypes.c_uint32),
        ("src_ip", Ip6),
        ("dst_ip", Ip6),
        ("orig_ip", Ip6),
        ("src_port", ctypes.c_uint16),
        ("dst_port", ctypes.c_uint16),
        ("orig_port", ctypes.c_uint16),
        ("direction", ctypes.c_uint8),
        ("close", ctypes.c_uint8),
        ("captured", ctypes.c_uint8),
        ("seen", ctypes.c_uint8),
        ("last_state", ctypes.c_uint8),
        ("refused", ctypes.c_uint8),
        ("rule", ctypes.c_uint32),
    ]


CAPTURED_TUNNEL = 1  # dabba_flow.captured: DABBA_CAPTURED_*
CAPTURED_DIRECT = 2


class VerdictKey(ctypes.Structure):
    """struct dabba_verdict_key { __u64 cgroup_id; struct dabba_ip6 dst; __u32 gen; __u16 port;
    __u16 _pad; };"""

    _fields_ = [
        ("cgroup_id", ctypes.c_uint64),
        ("dst", Ip6),
        ("gen", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("_pad", ctypes.c_uint16),
    ]


class Verdict(ctypes.Structure):
    """struct dabba_verdict { __u32 rule; __u8 allow; __u8 _pad[3]; };"""

    _fields_ = [("rule", ctypes.c_uint32), ("allow", ctypes.c_uint8), ("_pad", ctypes.c_uint8 * 3)]


class Direct(ctypes.Structure):
    """struct dabba_direct { __u64 cgroup_id; __u32 rule; __u32 _pad; };"""

    _fields_ = [
        ("cgroup_id", ctypes.c_uint64),
        ("rule", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class SvcKey(ctypes.Structure):
    """struct dabba_svc_key { struct dabba_ip6 vip; __u16 port; __u16 _pad; };"""

    _fields_ = [("vip", Ip6), ("port", ctypes.c_uint16), ("_pad", ctypes.c_uint16)]


LB_POLICIES = {"round_robin": 0, "least_connections": 1, "random": 2}  # DABBA_LB_*
SVC_EP_MAX = 64  # DABBA_SVC_EP_MAX


class Svc(ctypes.Structure):
    """struct dabba_svc { __u32 id; __u32 rr; __u16 count; __u16 target_port; __u8 policy;
    __u8 _pad[3]; };"""

    _fields_ = [
        ("id", ctypes.c_uint32),
        ("rr", ctypes.c_uint32),
        ("count", ctypes.c_uint16),
        ("target_port", ctypes.c_uint16),
        ("policy", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 3),
    ]


class SvcSlot(ctypes.Structure):
    """struct dabba_svc_slot { __u32 id; __u32 slot; };"""

    _fields_ = [("id", ctypes.c_uint32), ("slot", ctypes.c_uint32)]


class EpState(ctypes.Structure):
    """struct dabba_ep_state { __u64 active; __u64 ejected_until; __u32 failures;
    __u32 ejections; };"""

    _fields_ = [
        ("active", ctypes.c_uint64),
        ("ejected_until", ctypes.c_uint64),
        ("failures", ctypes.c_uint32),
        ("ejections", ctypes.c_uint32),
    ]


MIRRORS = {
    "dabba_workload": Workload,
    "dabba_config": Config,
    "dabba_capture": Capture,
    "dabba_tuple": Tuple,
    "dabba_lpm": Lpm,
    "dabba_ip6": Ip6,
    "dabba_ip_port": IpPort,
    "dabba_flow": Flow,
    "dabba_verdict_key": VerdictKey,
    "dabba_verdict": Verdict,
    "dabba_direct": Direct,
    "dabba_svc_key": SvcKey,
    "dabba_svc": Svc,
    "dabba_svc_slot": SvcSlot,
    "dabba_ep_state": EpState,
}


def map_layouts() -> dict[str, tuple[int, int]]:
    """Key and value sizes of the maps user space reads or writes with these mirrors: a node
    whose pinned maps have others was loaded by a dabbawala of another layout (see
    loader.Datapath.check_layout)."""
    from . import names

    u8, u32, u64 = 1, 4, 8
    return {
        names.MAP_CFG: (u32, ctypes.sizeof(Config)),
        names.MAP_WORKLOADS: (u64, ctypes.sizeof(Workload)),
        names.MAP_EXCL_NET: (ctypes.sizeof(Lpm), u8),
        names.MAP_CAP_COOKIE: (u64, ctypes.sizeof(Capture)),
        names.MAP_CAP_TUPLE: (ctypes.sizeof(Tuple), ctypes.sizeof(Capture)),
        names.MAP_FLOWS: (u64, ctypes.sizeof(Flow)),
        names.MAP_TUNNEL_ADDRS: (ctypes.sizeof(Ip6), u8),
        names.MAP_PLAIN: (ctypes.sizeof(Ip6), u32),
        names.MAP_NODE_IPS: (ctypes.sizeof(Ip6), u8),
        names.MAP_PORT_MTLS: (ctypes.sizeof(IpPort), u8),
        names.MAP_TUN_CONN: (ctypes.sizeof(Tuple), u8),
        names.MAP_VERDICT: (ctypes.sizeof(VerdictKey), ctypes.sizeof(Verdict)),
        names.MAP_DIRECT: (ctypes.sizeof(Tuple), ctypes.sizeof(Direct)),
        names.MAP_DIRECT_COOKIE: (u64, ctypes.sizeof(Direct)),
        names.MAP_SVC: (ctypes.sizeof(SvcKey), ctypes.sizeof(Svc)),
        names.MAP_SVC_EP: (ctypes.sizeof(SvcSlot), ctypes.sizeof(Ip6)),
        names.MAP_LB_EP: (ctypes.sizeof(IpPort), ctypes.sizeof(EpState)),
    }


def ip_be(addr: str) -> int:
    """IPv4 text to the u32 the kernel stores (network byte order, read natively)."""
    return struct.unpack("=I", socket.inet_aton(addr))[0]


def ip_str(value: int) -> str:
    """Inverse of ip_be."""
    return socket.inet_ntoa(struct.pack("=I", value))


def from_bytes(cls, raw: bytes):
    """A mirror instance from a map's raw value (copied, so the buffer may go)."""
    return cls.from_buffer_copy(raw[: ctypes.sizeof(cls)])
