"""The tunnel's listening sockets (outbound 15001, on IPv6 too, HBONE 15008): the tunnel's alone.

Before, every tunnel listener set SO_REUSEPORT so that workers and an
upgrade's successor could bind the same ports; a root process in the node's
network namespace did the same, joined the port's reuseport group and
received pods' captured connections in plaintext. Now there is one socket
per port, never bound twice, shared instead:

- workers 1..N-1 inherit worker 0's sockets (``pass_fds``; the descriptor
  numbers in DABBA_TUNNEL_LISTEN_FDS);
- an upgrade's successor borrows them from its predecessor over a Unix socket
  in the node's state folder (``tunnel.listeners``, root only, SCM_RIGHTS),
  then lends them on itself; connections waiting in the accept queue are
  taken by whichever process accepts next, so none is lost;
- a first start, or a start after a crash, binds them.

The tunnel registers them in the pinned ``dabba_tun_sk``, where own.c
(sk_lookup in the node's namespace, attached by the agent) gives every
connection to those ports to these sockets and no other -- not to one bound
while the tunnel was down -- and refuses connections while none is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import os
import socket

from .. import log
from ..bpf import abi, names
from ..bpf.sys import Map
from ..errors import DabbaError
from . import handoff

_log = log.get("listeners")

ENV = "DABBA_TUNNEL_LISTEN_FDS"
FILE = "tunnel.listeners"
KINDS = ("outbound", "hbone", "outbound6")  # in this order; dabba_tun_sk keys (abi.TUN_SK_*)
_KEYS = {
    "outbound": abi.TUN_SK_OUTBOUND,
    "hbone": abi.TUN_SK_HBONE,
    "outbound6": abi.TUN_SK_OUTBOUND6,
}


def kinds(outbound6: bool) -> tuple[str, ...]:
    """The listeners of a tunnel: outbound and HBONE, and the IPv6 outbound one if it has one."""
    return KINDS if outbound6 else KINDS[:2]


def bind(addr: tuple[str, int], what: str) -> socket.socket:
    """A listening socket on addr (either family; IPv6 only for an IPv6 address) that no other
    socket can share (no SO_REUSEPORT)."""
    v6 = ":" in addr[0]
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET)
    if v6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only
    try:
        s.bind(addr)
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            raise DabbaError(
                f"the tunnel's {what} port {addr[0]}:{addr[1]} is held by another socket",
                hint=f"`ss -ltnp 'sport = :{addr[1]}'` shows the process; the tunnel owns "
                "its ports and shares them with nobody",
            ) from None
        raise DabbaError(f"cannot bind the tunnel's {what} port {addr[0]}:{addr[1]}: {e}") from None
    s.listen(4096)
    s.setblocking(False)
    return s


def acquire(
    state_dir: str,
    outbound: tuple[str, int],
    inbound: tuple[str, int],
    outbound6: tuple[str, int] | None = None,
) -> tuple[list[socket.socket], str]:
    """The listening sockets, in the order of kinds(), and how: inherited, borrowed or bound."""
    want = {"outbound": outbound, "hbone": inbound, "outbound6": outbound6}
    names_ = kinds(outbound6 is not None)
    fds = os.environ.get(ENV)
    if fds:
        socks = [socket.socket(fileno=int(fd)) for fd in fds.split(",")]
        for s in socks:
            s.setblocking(False)
        return socks, "inherited"
    got = borrow(os.path.join(state_dir, FILE), names_)
    if got is not None:
        if all(_same(s.getsockname(), want[k]) for k, s in zip(names_, got, strict=True)):
            for s in got:
                s.setblocking(False)
            return got, "borrowed"
        _log.warning("the predecessor listens elsewhere; binding this tunnel's own addresses")
        for s in got:
            s.close()
    what = {"outbound": "outbound", "hbone": "HBONE", "outbound6": "IPv6 outbound"}
    socks: list[socket.socket] = []
    try:
        for k in names_:
            socks.append(bind(want[k], what[k]))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks, "bound"


def _same(have: tuple, want: tuple[str, int]) -> bool:
    return have[1] == want[1] and (want[0] in ("", "0.0.0.0", "::") or have[0] == want[0])


def register(maps_dir: str, socks: list[socket.socket]) -> None:
    """Put the sockets (in the order of kinds()) where own.c takes them from (dabba_tun_sk)."""
    with Map.pinned(os.path.join(maps_dir, names.MAP_TUN_SK)) as m:
        for kind, s in zip(KINDS, socks, strict=False):
            m.update(ctypes.c_uint32(_KEYS[kind]), ctypes.c_uint32(s.fileno()))


def borrow(
    path: str, want: tuple[str, ...] = KINDS[:2], timeout: float = 5.0
) -> list[socket.socket] | None:
    """The predecessor's listeners, or None when no tunnel lends the ones in want at path."""
    c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c.settimeout(timeout)
    try:
        c.connect(path)
        msg, fds, _, _ = socket.recv_fds(c, 4096, len(KINDS))
    except OSError:
        return None
    finally:
        c.close()
    socks = [socket.socket(fileno=fd) for fd in fds]
    if json.loads(msg or b"{}").get("listeners") != list(want) or len(socks) != len(want):
        for s in socks:
            s.close()
        return None
    return socks


class Lender:
    """Worker 0's side: hands its listeners to a successor (root only) that asks."""

    def __init__(self, state_dir: str, socks: list[socket.socket]):
        self.path = os.path.join(state_dir, FILE)
        self.socks = socks
        self.kinds = list(KINDS[: len(socks)])
        self.sock = handoff.listen_unix(self.path)  # successors find us here from now on
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        with conn:
            if handoff.peer_cred(conn)[1] != 0:  # uid
                _log.warning("a process that is not root asked for the tunnel's listeners")
                return
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                msg = json.dumps({"listeners": self.kinds}).encode()
                socket.send_fds(conn, [msg], [s.fileno() for s in self.socks])
                _log.info("listeners lent to a successor")

    def close(self) -> None:
        handoff.close_unix(self.sock, self.path)
