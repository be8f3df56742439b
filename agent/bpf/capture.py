"""The tunnel's view of the capture map: where did this accepted connection want to go?

Reads dabba_cap_tp through the bpf() syscall only (no bcc): the tunnel
process never imports LLVM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import abi, names
from .sys import Map


@dataclass(frozen=True)
class Captured:
    """A captured connection's original destination and kernel-attested source."""

    orig_ip: str
    orig_port: int
    cgroup_id: int  # the source workload's cgroup: set by the kernel, not the workload
    cookie: int  # socket cookie of the workload's socket
    # the service whose VIP the kernel resolved, orig_ip being the endpoint it chose (port 0:
    # none, orig_ip is what the workload asked for)
    svc_ip: str = ""
    svc_port: int = 0


class CaptureReader:
    """Looks up accepted sockets of the outbound listener in the pinned dabba_cap_tp."""

    def __init__(self, pin_maps_dir: str):
        self.map = Map.pinned(os.path.join(pin_maps_dir, names.MAP_CAP_TUPLE))

    def lookup(self, peer: tuple[str, int], local: tuple[str, int]) -> Captured | None:
        """peer/local: getpeername()/getsockname() of the accepted socket, either family
        (an IPv4-mapped address is the IPv4 one)."""
        key = abi.Tuple(abi.ip6(peer[0]), abi.ip6(local[0]), peer[1], local[1])
        raw = self.map.lookup(key)
        if raw is None:
            return None
        c = abi.from_bytes(abi.Capture, raw)
        svc = (abi.ip6_str(c.svc_ip), c.svc_port) if c.svc_port else ("", 0)
        return Captured(abi.ip6_str(c.orig_ip), c.orig_port, c.cgroup_id, c.cookie, *svc)

    def lookup_socket(self, sock) -> Captured | None:
        return self.lookup(sock.getpeername(), sock.getsockname())

    def close(self) -> None:
        self.map.close()
