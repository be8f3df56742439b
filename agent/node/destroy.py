"""End one established TCP connection from outside its process: SOCK_DESTROY over inet_diag.

What `ss -K` does (CONFIG_INET_DIAG_DESTROY): the kernel aborts the socket named by its
4-tuple and sends its peer a reset, so both ends see the connection end. The agent uses it
when a policy change denies a same-node connection that went direct (no proxy holds it to
close). The request is made inside the socket's own network namespace (a netlink socket
created there), which the agent enters on the calling thread only and leaves at once.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

from ..netns import entered

NETLINK_SOCK_DIAG = 4
SOCK_DESTROY = 21
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
_NOCOOKIE = 0xFFFFFFFF


def _request(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """nlmsghdr + inet_diag_req_v2 for the socket whose own address is src, its peer's dst."""
    a, b = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    v4 = a.version == 4
    family = socket.AF_INET if v4 else socket.AF_INET6
    pad = b"\0" * 12 if v4 else b""
    sockid = (
        struct.pack("!HH", src[1], dst[1])
        + a.packed + pad
        + b.packed + pad
        + struct.pack("=III", 0, _NOCOOKIE, _NOCOOKIE)
    )  # fmt: skip
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    return struct.pack("=IHHII", 16 + len(req), SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + req


def destroy(netns: str, src: tuple[str, int], dst: tuple[str, int]) -> None:
    """Abort the TCP socket src -> dst in the network namespace at path netns (its peer gets a
    reset). Raises OSError (ENOENT: no such socket; it closed already)."""
    with entered(netns):  # the netlink socket belongs to the namespace it is created in
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    with s:
        s.settimeout(2)
        s.send(_request(src, dst))
        reply = s.recv(4096)
    _, kind, _, _, _ = struct.unpack_from("=IHHII", reply)
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", reply, 16)
        if code:
            raise OSError(-code, f"destroy {src} -> {dst}: {os.strerror(-code)}")
        return
    raise OSError(errno.EPROTO, f"destroy {src} -> {dst}: unexpected netlink reply {kind}")


def supported() -> str:
    """Whether this kernel can end a socket from outside (CONFIG_INET_DIAG_DESTROY): "" when
    it can, else why not. Asks it to destroy a socket that does not exist, in our own
    namespace: ENOENT means it would have."""
    try:
        destroy("/proc/self/ns/net", ("127.0.0.1", 1), ("127.0.0.1", 1))
    except OSError as e:
        if e.errno == errno.ENOENT:
            return ""
        return (
            "this kernel cannot end a socket from outside (SOCK_DESTROY over inet_diag: "
            f"CONFIG_INET_DIAG_DESTROY): {os.strerror(e.errno or 0)}"
        )
    return ""
