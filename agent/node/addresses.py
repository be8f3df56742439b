"""Destinations a workload may never reach through the mesh, and the node's own addresses.

The kernel refuses them at connect() (agent/bpf/connect.c); the tunnel
refuses them again before any passthrough dial (defence in depth), with
the same rules, from here:

- loopback and unspecified (127/8, 0/8, ::1, ::) stay in the caller's own
  network namespace: the tunnel, in the node's, must never dial them;
- link-local (169.254/16, fe80::/10) is the node's link, not the mesh;
- the node's own addresses;
- the mesh's own ports (Istio reserves the same: 15000, 15001, 15006, 15008).
"""

from __future__ import annotations

import contextlib
import ipaddress

from ..errors import DabbaError

# the tunnel's admin, outbound, plaintext inbound and HBONE ports (DESIGN.md: Ports)
MESH_PORTS = (15000, 15001, 15006, 15008)


def node_addresses() -> list[str]:
    """Every address of this process's network namespace, both families.

    From /proc/net (per namespace): IPv4 from the local routes of fib_trie
    ("/32 host LOCAL"), IPv6 from if_inet6. No netlink library: the tunnel
    calls this too and stays small.
    """
    out: set[str] = set()
    try:
        with open("/proc/net/fib_trie") as f:
            last = ""
            for line in f:
                word = line.strip()
                if word.startswith(("|--", "+--")):
                    last = word[3:].split()[0]
                elif word == "/32 host LOCAL" and last:
                    out.add(last)
        with contextlib.suppress(FileNotFoundError):  # IPv6 disabled
            with open("/proc/net/if_inet6") as f:
                for line in f:
                    h = line.split()[0]
                    out.add(str(ipaddress.IPv6Address(bytes.fromhex(h))))
    except OSError as e:
        raise DabbaError(f"cannot list the node's addresses from /proc/net: {e}") from None
    return sorted(out)


def refused_destination(
    ip: str, port: int, node_addrs: set[str], mesh_ports: tuple[int, ...] = MESH_PORTS
) -> str:
    """Why the mesh never carries a connection to ip:port; "" when it may."""
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return f"{ip!r} is not an IP address"
    if a.version == 6 and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if a.is_loopback or a.is_unspecified or (a.version == 4 and a in _THIS_NETWORK):
        return "loopback or unspecified: the caller's own namespace"
    if port in mesh_ports:
        return f"port {port} is one of the mesh's own"
    if a.is_link_local:
        return "a link-local address"
    if str(a) in node_addrs:
        return "an address of the node itself"
    if a.is_multicast or a == _BROADCAST:
        return "multicast or broadcast"
    return ""


_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_BROADCAST = ipaddress.ip_address("255.255.255.255")


def unmapped(ip: str) -> str:
    """An address as the mesh names it: IPv4-mapped IPv6 (::ffff:a.b.c.d, what a dual-stack
    socket reports for an IPv4 peer) as its IPv4 address, IPv6 compressed."""
    a = ipaddress.ip_address(ip.split("%", 1)[0])
    if a.version == 6 and a.ipv4_mapped is not None:
        return str(a.ipv4_mapped)
    return str(a)


def hostport(ip: str, port: int) -> str:
    """ip:port, an IPv6 address in brackets ([fd00::1]:80), as in a URL or an HTTP authority."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def split_hostport(text: str) -> tuple[str, int]:
    """The (address, port) of "a.b.c.d:port" or "[v6]:port"; ValueError for anything else
    (a name, a zone, a port out of range, an IPv6 address without brackets)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not address:port")
    if "%" in host:
        raise ValueError(f"{text!r} names a zone (one node's link)")
    if host.startswith("[") and host.endswith("]"):
        a = ipaddress.IPv6Address(host[1:-1])
    else:
        a = ipaddress.IPv4Address(host)
    return str(a), int(port)
