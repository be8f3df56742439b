"""Splice: move the bytes of two TCP connections into each other with splice(2) through pipes.

The tunnel pairs a workload's connection with the one it opened for it (on this node, or to a
destination outside the mesh) and from then on moves bytes between them without copying them
to user space: ``splice(socket -> pipe)`` then ``splice(pipe -> socket)``, one pipe per
direction, driven by epoll.

Why not the kernel's sockmap (sk_skb verdict redirect), which this replaces: its redirect
queue (the peer psock's ingress_skb) has no bound, since the source socket's window reopens as
soon as the verdict has run: one same-node sender writing to a slow reader for 6 s took 3.2 GB
of the node's memory. And its redirect path has lost and duplicated data in kernels before the
6.16 and 6.18.14 fixes. Here every byte is the kernel's TCP receiving in order into a pipe, and
the pipe sending in order: exact by construction. And bounded: a pipe holds at most
``PIPE_SIZE``; when the receiving socket's send buffer is full, the pipe fills, the source is
no longer read, its receive window closes and the sender waits. A flow holds at most its two
sockets' buffers and two pipes, whatever its peers do.

Half-close: when one side's peer sends FIN (splice returns 0) and its pipe is empty, the other
side is shut down for writing; both halves done, both sockets close. A reset on one side
resets the other. ``export``/``adopt`` hand live pairs, their pipes and what the pipes hold to
an upgrade's successor (SCM_RIGHTS): no byte is lost and the connections never notice.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field

from .. import log
from ..errors import DabbaError

_log = log.get("splice")

PIPE_SIZE = 1 << 20  # bytes a pipe holds: F_SETPIPE_SZ (fs.pipe-max-size is 1 MiB by default)
_F_SETPIPE_SZ = 1031
_F_GETPIPE_SZ = 1032
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # pipe-max-size lowered, or a user's pipe quota: the default size then
        pass
    return r, w


@dataclass
class _Way:
    """One direction: bytes read from src go through the pipe to dst."""

    src: socket.socket
    dst: socket.socket
    r: int  # the pipe's ends
    w: int
    size: int  # what the pipe holds at most
    queued: int = 0  # bytes in the pipe now
    moved: int = 0  # bytes delivered to dst so far
    eof: bool = False  # src's peer sent FIN
    shut: bool = False  # dst shut down for writing after the last byte

    def pump(self) -> int:
        """Move what can move without blocking; returns the bytes delivered now. Raises
        OSError when a socket failed (reset)."""
        got = 0
        while True:
            progressed = False
            if not self.eof and self.queued < self.size:
                try:
                    n = os.splice(self.src.fileno(), self.w, self.size - self.queued, flags=_FLAGS)
                except BlockingIOError:
                    n = -1
                if n == 0:
                    self.eof = True
                elif n > 0:
                    self.queued += n
                    progressed = True
            if self.queued:
                try:
                    n = os.splice(self.r, self.dst.fileno(), self.queued, flags=_FLAGS)
                except BlockingIOError:
                    n = 0
                if n > 0:
                    self.queued -= n
                    self.moved += n
                    got += n
                    progressed = True
            if self.eof and not self.queued and not self.shut:
                try:
                    self.dst.shutdown(socket.SHUT_WR)
                except OSError as e:
                    if e.errno != errno.ENOTCONN:
                        raise
                self.shut = True
            if not progressed:
                return got

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.r = self.w = -1


@dataclass
class SplicePair:
    """Two connections spliced into each other."""

    a: socket.socket
    b: socket.socket
    ab: _Way
    ba: _Way
    started: float = field(default_factory=time.monotonic)
    closed: bool = False
    reason: str = ""
    on_close: object = None  # called with the pair once it is closed (not when handed off)
    meta: dict = field(default_factory=dict)  # the owner's notes, handed to a successor too

    @property
    def done(self) -> bool:
        return self.ab.shut and self.ba.shut


class Splicer:
    """Every spliced pair of one tunnel process, on one epoll."""

    def __init__(self, stats=None):
        self.ep = select.epoll()
        self.by_fd: dict[int, SplicePair] = {}
        self.masks: dict[int, int] = {}
        self.active = 0
        self.stats = stats if stats is not None else {}  # "splice_bytes": delivered, both ways

    def fileno(self) -> int:
        return self.ep.fileno()

    def pair(self, a: socket.socket, b: socket.socket, on_close=None, meta=None) -> SplicePair:
        """Splice a and b; from now on their bytes never come up to user space."""
        for s in (a, b):
            s.setblocking(False)
        pipes = [_pipe(), _pipe()]
        p = SplicePair(
            a,
            b,
            _Way(a, b, *pipes[0], _pipe_size(pipes[0][1])),
            _Way(b, a, *pipes[1], _pipe_size(pipes[1][1])),
            on_close=on_close,
            meta=meta or {},
        )
        self._watch(p)
        self._run(p)  # bytes that arrived before the pairing
        return p

    def _watch(self, p: SplicePair) -> None:
        for s in (p.a, p.b):
            self.by_fd[s.fileno()] = p
            self.masks[s.fileno()] = 0
            self.ep.register(s.fileno(), 0)
        self.active += 1
        self._rearm(p)

    def _rearm(self, p: SplicePair) -> None:
        """Watch each socket for what would let a stuck direction go on: readable (or its
        peer's FIN) while its pipe has room, writable while the pipe towards it holds bytes.
        A socket with nothing left to do (its peer's FIN read, our FIN sent) is not watched:
        epoll reports hang-ups of such a socket for ever (level-triggered)."""
        for s, out, into in ((p.a, p.ab, p.ba), (p.b, p.ba, p.ab)):
            fd = s.fileno()
            if out.eof and into.shut:
                if self.masks.pop(fd, None) is not None:
                    self.ep.unregister(fd)
                continue
            mask = 0
            if not out.eof and out.queued < out.size:
                mask |= select.EPOLLIN | select.EPOLLRDHUP
            if into.queued:
                mask |= select.EPOLLOUT
            if self.masks.get(fd) != mask:
                self.ep.modify(fd, mask)
                self.masks[fd] = mask

    def _run(self, p: SplicePair) -> None:
        try:
            n = p.ab.pump() + p.ba.pump()
            if n:
                self.stats["splice_bytes"] = self.stats.get("splice_bytes", 0) + n
        except OSError as e:
            self._reset(p, os.strerror(e.errno) if e.errno else str(e))
            return
        if p.done:
            self._close(p, "fin")
        else:
            self._rearm(p)

    def process(self, timeout: float = 0) -> None:
        """Move what the sockets are ready for; never blocks longer than timeout."""
        ready: dict[int, SplicePair] = {}
        for fd, ev in self.ep.poll(timeout):
            p = self.by_fd.get(fd)
            if p is None or p.closed:
                continue
            if ev & select.EPOLLERR:
                sock = p.a if p.a.fileno() == fd else p.b
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._reset(p, os.strerror(err))
                    continue
            ready[id(p)] = p
        for p in ready.values():
            if not p.closed:
                self._run(p)

    def kill(self, p: SplicePair, why: str) -> None:
        """Reset both connections of a pair (e.g. a policy now denies it)."""
        if p.closed:
            return
        for s in (p.a, p.b):
            _linger0(s)
        self._close(p, f"reset ({why})")

    def _reset(self, p: SplicePair, why: str) -> None:
        """One side failed (reset): reset the other one too."""
        for s in (p.a, p.b):
            _linger0(s)
        self._close(p, f"reset ({why})")

    def _unwatch(self, p: SplicePair) -> None:
        for s in (p.a, p.b):
            fd = s.fileno()
            if fd >= 0 and self.by_fd.get(fd) is p:
                del self.by_fd[fd]
                if self.masks.pop(fd, None) is not None:
                    self.ep.unregister(fd)

    def _close(self, p: SplicePair, reason: str) -> None:
        if p.closed:
            return
        p.closed, p.reason = True, reason
        self._unwatch(p)
        p.ab.close()
        p.ba.close()
        for s in (p.a, p.b):
            s.close()
        self.active -= 1
        if p.on_close is not None:
            p.on_close(p)
        _log.debug("splice closed", fields={"reason": reason})

    # ---- hand-off to a successor (SCM_RIGHTS; see agent/ztunnel/handoff.py) ----------------------
    FDS = 6  # per pair: a, b, and each direction's pipe (read end, write end)

    def export(self) -> list[tuple[dict, list[int]]]:
        """Every live pair as (state, descriptors) for a successor; the pipes carry their bytes
        along, and nothing moves meanwhile (this process stops reading right after)."""
        out = []
        for p in {id(p): p for p in self.by_fd.values()}.values():
            if p.closed:
                continue
            state = {
                "meta": p.meta,
                "started_age": time.monotonic() - p.started,
                "ways": [
                    {"queued": w.queued, "moved": w.moved, "eof": w.eof, "shut": w.shut}
                    for w in (p.ab, p.ba)
                ],
            }
            out.append((state, [p.a.fileno(), p.b.fileno(), p.ab.r, p.ab.w, p.ba.r, p.ba.w]))
        return out

    def adopt(self, state: dict, fds: list[int]) -> SplicePair:
        """Take over a pair a predecessor spliced: the same sockets, pipes and state."""
        if len(fds) != self.FDS:
            raise DabbaError(f"a spliced pair is {self.FDS} descriptors, not {len(fds)}")
        a, b = socket.socket(fileno=fds[0]), socket.socket(fileno=fds[1])
        for s in (a, b):
            s.setblocking(False)
        for fd in fds[2:]:
            os.set_blocking(fd, False)
        ways = []
        for (src, dst, r, w), st in zip(
            ((a, b, fds[2], fds[3]), (b, a, fds[4], fds[5])), state["ways"], strict=True
        ):
            ways.append(_Way(src, dst, r, w, _pipe_size(w), st["queued"], st["moved"], st["eof"],
                             st["shut"]))  # fmt: skip
        p = SplicePair(
            a,
            b,
            ways[0],
            ways[1],
            started=time.monotonic() - state["started_age"],
            meta=state.get("meta") or {},
        )
        self._watch(p)
        self._run(p)
        return p

    def release_all(self) -> int:
        """Stop watching every pair and close our descriptors: a successor holds the same
        sockets and pipes, so this neither closes a connection nor drops a byte."""
        n = 0
        for p in {id(p): p for p in self.by_fd.values()}.values():
            self._unwatch(p)
            p.ab.close()
            p.ba.close()
            for s in (p.a, p.b):
                s.close()
            p.closed, p.reason = True, "handed off"
            n += 1
        self.active = 0
        return n

    def run(self, until=lambda: False, tick: float = 0.1) -> None:
        """Blocking loop until until() is true."""
        while not until():
            self.process(tick)

    def close(self) -> None:
        self.ep.close()


def _pipe_size(w: int) -> int:
    try:
        return fcntl.fcntl(w, _F_GETPIPE_SZ)
    except OSError:
        return 65536


def _linger0(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("=ii", 1, 0))
    except OSError:
        pass
