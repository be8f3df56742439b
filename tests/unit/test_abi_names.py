"""Names and ABI mirrors, checked without the kernel (the kernel tier checks them against bcc)."""

import ctypes

import pytest

from agent.bpf import abi, names
from agent.bpf.loader import ALL_PROGRAMS, MapSizes


def test_names_fit_the_kernel_and_share_the_prefix():
    for n in names.ALL_MAPS + tuple(p.function for p in ALL_PROGRAMS):
        if n == names.PROG_FAMILY:  # bcc finds an LSM program's hook by its name: lsm__<hook>
            assert n == "lsm__socket_create"
            continue
        assert len(n) <= 15 and n.startswith("dabba_"), n


def test_mirrors_have_no_implicit_padding():
    for cls in abi.MIRRORS.values():
        end = max(getattr(cls, f[0]).offset + getattr(cls, f[0]).size for f in cls._fields_)
        assert end == ctypes.sizeof(cls), cls.__name__
    assert (
        ctypes.sizeof(abi.Flow) == 152
        and ctypes.sizeof(abi.Capture) == 56
        and ctypes.sizeof(abi.Tuple) == 36
    )


def test_ip_helpers_roundtrip_network_order():
    v = abi.ip_be("10.20.1.11")
    assert v.to_bytes(4, "little") == bytes([10, 20, 1, 11])
    assert abi.ip_str(v) == "10.20.1.11"


def test_addresses_of_both_families_are_one_type():
    # IPv4 as IPv4-mapped, in network order, and back as IPv4; IPv6 compressed
    assert bytes(abi.ip6("10.20.1.11")) == bytes(10) + b"\xff\xff" + bytes([10, 20, 1, 11])
    assert abi.ip6_str(abi.ip6("10.20.1.11")) == "10.20.1.11"
    assert abi.ip6_str(abi.ip6("::ffff:10.20.1.11")) == "10.20.1.11"
    assert bytes(abi.ip6("fd00:20:1::b"))[:4] == bytes([0xFD, 0, 0, 0x20])
    assert abi.ip6_str(abi.ip6("fd00:20:1:0::b")) == "fd00:20:1::b"


def test_flow_record_from_raw():
    from agent.bpf.flows import FlowRecord

    f = abi.Flow(
        cookie=7,
        cgroup_id=9,
        start_ns=1,
        end_ns=2,
        bytes_sent=10,
        bytes_received=20,
        src_ip=abi.ip6("10.0.0.1"),
        dst_ip=abi.ip6("10.0.0.2"),
        orig_ip=abi.ip6("fd00::3"),
        src_port=1234,
        dst_port=15001,
        orig_port=80,
        direction=1,
        close=1,
        captured=1,
    )
    r = FlowRecord.from_raw(bytes(f))
    assert (r.direction, r.close, r.captured) == ("outbound", "fin", True)
    assert r.src == ("10.0.0.1", 1234) and r.orig_dst == ("fd00::3", 80)


def test_map_sizes_become_cflags():
    assert "-DDABBA_FLOW_MAX=123" in MapSizes(flows=123).cflags()


def test_ip6_str_writes_every_address_as_ipaddress_does():
    """ip6_str uses inet_ntop (fast) and must write what ipaddress writes: IPv4-mapped as IPv4,
    IPv6 compressed, ::a.b.c.d as ipaddress has it (glibc writes it otherwise)."""
    import ipaddress
    import random

    rng = random.Random(7)

    def want(b: bytes) -> str:
        v6 = ipaddress.IPv6Address(b)
        return str(v6.ipv4_mapped) if v6.ipv4_mapped is not None else str(v6)

    def sample() -> bytes:
        kind = rng.randrange(5)
        if kind == 0:  # IPv4-mapped
            return bytes(10) + b"\xff\xff" + rng.randbytes(4)
        if kind == 1:  # IPv4-compatible (::a.b.c.d) and other mostly-zero ones
            return bytes(12) + rng.randbytes(4)
        if kind == 2:  # runs of zero words in random places
            return b"".join(rng.choice([b"\0\0", rng.randbytes(2)]) for _ in range(8))
        return rng.randbytes(16)

    for b in [bytes(16), bytes(15) + b"\x01", *(sample() for _ in range(20_000))]:
        assert abi.ip6_str(abi.Ip6.from_buffer_copy(b)) == want(b), b.hex()


def test_ip6_key_agrees_with_ipaddress_and_refuses_what_it_refuses():
    import ipaddress

    def want(a):
        x = ipaddress.ip_address(a)
        return (ipaddress.IPv6Address(f"::ffff:{x}") if x.version == 4 else x).packed

    for a in ("10.0.0.1", "0.0.0.0", "255.255.255.255", "::", "::1", "fd00:20:1::b",
              "::ffff:10.1.2.3", "fe80::1", "2001:db8::1.2.3.4"):  # fmt: skip
        assert abi.ip6_key(a) == want(a), a
    for bad in ("01.2.3.4", "1.2.3", "0x7f.0.0.1", "1.2.3.4.5", "256.0.0.1", "::g", "", "x"):
        with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
            abi.ip6_key(bad)
