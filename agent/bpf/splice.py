"""User-space half of the kernel splice: pair two sockets, then only watch them.

After ``pair(a, b)`` the sk_skb verdict (splice.c) moves every byte received
on one socket out of the other; this process reads no payload. It watches
both sockets with epoll for what the kernel cannot do itself:

- half-close: when one side's peer sends FIN, shut down the other side for
  writing, but only after every byte the first side received went through
  the verdict (TCP_INFO bytes_received against the redirected count in
  dabba_pairs) and reached the other socket (its bytes_acked plus SIOCOUTQ),
  so no byte is lost to the FIN;
- reset: when one side is reset, reset the other (SO_LINGER 0 and close);
- both halves closed: close both sockets.

``fileno()`` is the epoll fd, so an asyncio loop can ``add_reader`` it and
call ``process()``; ``run()`` is a blocking loop for simple users.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
import termios
import time
from dataclasses import dataclass, field

from .. import log
from ..errors import DabbaError
from . import abi, names
from .sys import Map, socket_cookie

_log = log.get("splice")

_EV_HUP = select.EPOLLHUP | select.EPOLLERR
_WATCH = select.EPOLLRDHUP | _EV_HUP
_TCPI_BYTES_ACKED = 120  # offsetof(struct tcp_info, tcpi_bytes_acked)
_TCPI_BYTES_RECEIVED = 128  # offsetof(struct tcp_info, tcpi_bytes_received)
DRAIN_TIMEOUT = 30.0


def _written(sock: socket.socket) -> int:
    """Bytes the socket took for sending: acknowledged plus still queued."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    (acked,) = struct.unpack_from("=Q", info, _TCPI_BYTES_ACKED)
    outq = struct.unpack("=i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    return acked + outq


def _received(sock: socket.socket) -> int:
    """Bytes received in order, the peer's FIN included once it came."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    return struct.unpack_from("=Q", info, _TCPI_BYTES_RECEIVED)[0]


class SpliceUnavailable(DabbaError):
    """The kernel refused the pair; the caller relays this connection in user space.

    A SOCKHASH takes only ESTABLISHED sockets: one whose peer already sent
    FIN (CLOSE_WAIT) -- a client that wrote its request and half-closed
    before the tunnel got to it -- cannot be spliced.
    """


@dataclass
class _Side:
    sock: socket.socket
    cookie: int
    base_written: int  # _written() at pairing: the tunnel wrote nothing after
    eof: bool = False  # its peer sent FIN
    shut: bool = False  # we shut it down for writing (the other side's FIN)


@dataclass
class SplicePair:
    """Two sockets spliced by the kernel."""

    a: _Side
    b: _Side
    started: float = field(default_factory=time.monotonic)
    closed: bool = False
    reason: str = ""
    on_close: object = None  # called with the pair once it is closed (not when handed off)
    meta: dict = field(default_factory=dict)  # the owner's notes, handed to a successor too

    def other(self, side: _Side) -> _Side:
        return self.b if side is self.a else self.a


class Splicer:
    """Owns dabba_splice / dabba_pairs for one node's tunnel."""

    def __init__(self, pin_maps_dir: str):
        self.sockhash = Map.pinned(os.path.join(pin_maps_dir, names.MAP_SPLICE))
        self.pairs = Map.pinned(os.path.join(pin_maps_dir, names.MAP_PAIRS))
        self.ep = select.epoll()
        self.by_fd: dict[int, tuple[SplicePair, _Side]] = {}
        self.draining: list[tuple[SplicePair, _Side, float]] = []  # (pair, eof side, deadline)
        self.active = 0

    def fileno(self) -> int:
        return self.ep.fileno()

    def pair(self, a: socket.socket, b: socket.socket, on_close=None, meta=None) -> SplicePair:
        """Hand a and b to the kernel; from now on their bytes never come up here."""
        for s in (a, b):
            s.setblocking(False)
        p = SplicePair(
            _Side(a, socket_cookie(a), _written(a)),
            _Side(b, socket_cookie(b), _written(b)),
            on_close=on_close,
            meta=meta or {},
        )
        ck = [abi.ctypes.c_uint64(p.a.cookie), abi.ctypes.c_uint64(p.b.cookie)]
        self.pairs.update(ck[0], abi.Pair(p.b.cookie, 0))
        self.pairs.update(ck[1], abi.Pair(p.a.cookie, 0))
        try:
            self.sockhash.update(ck[0], abi.ctypes.c_uint32(a.fileno()))
            self.sockhash.update(ck[1], abi.ctypes.c_uint32(b.fileno()))
        except OSError as e:
            self._forget(p)
            if e.errno == errno.EOPNOTSUPP:
                raise SpliceUnavailable(
                    "cannot splice: a socket is no longer ESTABLISHED (its peer already closed)"
                ) from None
            raise
        # Bytes that arrived before the sockets were in the map wait in their
        # receive queues; setting SO_RCVLOWAT makes TCP signal data-ready,
        # which runs the verdict over them now instead of at the next segment.
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        self._watch(p)
        return p

    def _watch(self, p: SplicePair) -> None:
        for side in (p.a, p.b):
            self.by_fd[side.sock.fileno()] = (p, side)
            self.ep.register(side.sock.fileno(), _EV_HUP if side.eof else _WATCH)
        self.active += 1

    # ---- hand-off to a successor (SCM_RIGHTS; see agent/ztunnel/handoff.py) ----------------------
    def export(self) -> list[tuple[dict, list[int]]]:
        """Every live pair as (state, [fd a, fd b]) for a successor; the kernel keeps splicing."""
        out = []
        for p in {id(p): p for p, _ in self.by_fd.values()}.values():
            if p.closed:
                continue
            state = {
                "meta": p.meta,
                "started_age": time.monotonic() - p.started,
                "sides": [
                    {
                        "cookie": s.cookie,
                        "base_written": s.base_written,
                        "eof": s.eof,
                        "shut": s.shut,
                    }
                    for s in (p.a, p.b)
                ],
            }
            out.append((state, [p.a.sock.fileno(), p.b.sock.fileno()]))
        return out

    def adopt(self, state: dict, a: socket.socket, b: socket.socket) -> SplicePair:
        """Take over a pair a predecessor spliced: same sockets, same map entries, same state."""
        sides = []
        for s, meta in zip((a, b), state["sides"], strict=True):
            s.setblocking(False)
            if socket_cookie(s) != meta["cookie"]:
                raise DabbaError(f"handed-off socket is not cookie {meta['cookie']}")
            sides.append(_Side(s, meta["cookie"], meta["base_written"], meta["eof"], meta["shut"]))
        p = SplicePair(
            sides[0],
            sides[1],
            started=time.monotonic() - state["started_age"],
            meta=state.get("meta") or {},
        )
        self._watch(p)
        for side in (p.a, p.b):
            if side.eof and not p.other(side).shut:
                self.draining.append((p, side, time.monotonic() + DRAIN_TIMEOUT))
        return p

    def release_all(self) -> int:
        """Stop watching every pair and close our descriptors, leaving the map entries alone.

        After a successful hand-off the successor holds the same sockets, so
        closing ours neither closes a connection nor takes it out of the map.
        """
        pairs = {id(p): p for p, _ in self.by_fd.values()}.values()
        n = 0
        for p in pairs:
            for side in (p.a, p.b):
                fd = side.sock.fileno()
                self.by_fd.pop(fd, None)
                try:
                    self.ep.unregister(fd)
                except OSError:
                    pass
                side.sock.close()
            p.closed, p.reason = True, "handed off"
            n += 1
        self.draining = []
        self.active = 0
        return n

    def redirected(self, side: _Side) -> int:
        """Bytes the kernel moved from side's socket to the other one."""
        raw = self.pairs.lookup(abi.ctypes.c_uint64(side.cookie))
        return abi.from_bytes(abi.Pair, raw).bytes if raw else 0

    def process(self, timeout: float = 0) -> None:
        """Handle socket events and pending half-closes; never blocks longer than timeout."""
        if self.draining:
            timeout = min(timeout, 0.005) if timeout >= 0 else 0.005
        for fd, ev in self.ep.poll(timeout):
            entry = self.by_fd.get(fd)
            if entry is None:
                continue
            p, side = entry
            err = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if ev & _EV_HUP else 0
            if ev & select.EPOLLERR or err:
                self._reset(p, side, os.strerror(err) if err else "socket error")
            elif ev & (select.EPOLLRDHUP | select.EPOLLHUP) and not side.eof:
                # its peer sent FIN: from now on watch it for errors only
                side.eof = True
                self.ep.modify(fd, _EV_HUP)
                self.draining.append((p, side, time.monotonic() + DRAIN_TIMEOUT))
        self._drain()

    def _drain(self) -> None:
        still = []
        for p, side, deadline in self.draining:
            if p.closed:
                continue
            other = p.other(side)
            moved = self.redirected(side)
            # The tunnel never reads from a spliced socket, so every byte it
            # received (less the FIN) must go through the verdict; FIONREAD
            # cannot tell, as it does not see a sockmap socket's queue.
            if (
                moved >= _received(side.sock) - 1
                and _written(other.sock) - other.base_written >= moved
            ):
                self._shutdown(p, other)
            elif time.monotonic() > deadline:
                _log.warning(
                    "half-close drain timed out; shutting down anyway",
                    fields={"cookie": side.cookie},
                )
                self._shutdown(p, other)
            else:
                # wake the verdict for bytes still queued (see pair())
                side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                still.append((p, side, deadline))
        self.draining = still

    def _shutdown(self, p: SplicePair, side: _Side) -> None:
        try:
            side.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        side.shut = True
        if p.a.eof and p.b.eof and p.a.shut and p.b.shut:
            self._close(p, "fin")

    def _reset(self, p: SplicePair, side: _Side, why: str) -> None:
        other = p.other(side)
        try:
            other.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("=ii", 1, 0))
        except OSError:
            pass
        self._close(p, f"reset ({why})")

    def kill(self, p: SplicePair, why: str) -> None:
        """Reset both connections of a pair (e.g. a policy now denies it)."""
        if p.closed:
            return
        for side in (p.a, p.b):
            try:
                side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("=ii", 1, 0))
            except OSError:
                pass
        self._close(p, f"reset ({why})")

    def _forget(self, p: SplicePair) -> None:
        for side in (p.a, p.b):
            self.pairs.delete(abi.ctypes.c_uint64(side.cookie))
            self.sockhash.delete(abi.ctypes.c_uint64(side.cookie))

    def _close(self, p: SplicePair, reason: str) -> None:
        if p.closed:
            return
        p.closed, p.reason = True, reason
        for side in (p.a, p.b):
            fd = side.sock.fileno()
            if fd >= 0:
                self.by_fd.pop(fd, None)
                try:
                    self.ep.unregister(fd)
                except OSError:
                    pass
        self._forget(p)
        for side in (p.a, p.b):
            side.sock.close()
        self.active -= 1
        if p.on_close is not None:
            p.on_close(p)
        _log.debug("splice closed", fields={"reason": reason, "a": p.a.cookie, "b": p.b.cookie})

    def run(self, until=lambda: False, tick: float = 0.1) -> None:
        """Blocking loop until until() is true."""
        while not until():
            self.process(tick)

    def close(self) -> None:
        self.ep.close()
        self.sockhash.close()
        self.pairs.close()
