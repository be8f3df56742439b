"""Tunnel upgrade: hand spliced connections to a successor with SCM_RIGHTS.

A spliced pair is two sockets and two pipes (ztunnel/splice.py); what is in flight sits in the
kernel (the sockets' queues and the pipes), and the tunnel holds only the descriptors and a
little half-close state. So an upgrade need not drop it: the successor listens on a Unix socket
in the node's state folder (``tunnel.handoff``) once it is ready, and the old tunnel, on
SIGTERM, sends every pair over it -- one SOCK_SEQPACKET message per pair, its state as JSON and
its six descriptors as SCM_RIGHTS -- then closes its own copies. The sockets, the pipes and the
bytes in them never notice. (ztunnel drops these connections on an upgrade.)

The message protocol, one datagram each:
  old -> new: {"pair": {...state...}} with 6 fds, repeated; then {"end": n}
  new -> old: {"adopted": n} (or {"error": "..."})
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct

from .. import log
from .splice import Splicer

_log = log.get("handoff")

FILE = "tunnel.handoff"
_MAX = 64 * 1024


def path_in(state_dir: str, worker: int = 0) -> str:
    return os.path.join(state_dir, FILE + (f".{worker}" if worker else ""))


def listen_unix(path: str) -> socket.socket:
    """A SOCK_SEQPACKET server at path, root only, replacing a predecessor's there: from now on
    successors find this process at path."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(4)
    sock.setblocking(False)
    return sock


def close_unix(sock: socket.socket, path: str, unlink: bool = True) -> None:
    """Stop serving at path; remove path only while it is still our own (a successor may have
    replaced it)."""
    with contextlib.suppress(Exception):
        asyncio.get_running_loop().remove_reader(sock.fileno())
    if unlink:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(sock.fileno()).st_ino:
                os.unlink(path)
    sock.close()


def peer_cred(s: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    cred = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", cred)


class Receiver:
    """The successor's side: adopt pairs sent by a predecessor."""

    def __init__(self, path: str, splicer: Splicer, stats=None, on_adopt=None):
        self.on_adopt = on_adopt  # called with each adopted pair
        self.path = path
        self.splicer = splicer
        self.stats = stats if stats is not None else {}
        self.sock = listen_unix(path)  # predecessors find us here from now on

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        # a hand-off is a handful of small messages: take it synchronously
        conn.settimeout(10)
        n = 0
        try:
            pid = peer_cred(conn)[0]
            while True:
                msg, fds, _, _ = socket.recv_fds(conn, _MAX, self.splicer.FDS)
                if not msg:
                    break
                m = json.loads(msg)
                if "end" in m:
                    conn.send(json.dumps({"adopted": n}).encode())
                    break
                if len(fds) != self.splicer.FDS:
                    for fd in fds:
                        os.close(fd)
                    raise ValueError(f"pair message with {len(fds)} descriptors")
                p = self.splicer.adopt(m["pair"], fds)
                if self.on_adopt is not None:
                    self.on_adopt(p)
                n += 1
            self.stats["adopted"] = self.stats.get("adopted", 0) + n
            _log.info(
                "spliced connections adopted from predecessor", fields={"pid": pid, "pairs": n}
            )
        except Exception as e:
            _log.error(f"hand-off failed after {n} pairs: {e}")
            with contextlib.suppress(OSError):
                conn.send(json.dumps({"error": str(e)}).encode())
        finally:
            conn.close()

    def close(self, unlink: bool = True) -> None:
        close_unix(self.sock, self.path, unlink)


def give(path: str, splicer: Splicer, timeout: float = 10.0) -> int | None:
    """Send every spliced pair to the successor listening at path; None when there is none.

    On success our descriptors are closed (the successor holds the sockets);
    on failure they stay ours and the caller drains them as usual.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError:
        s.close()
        return None
    try:
        if peer_cred(s)[0] == os.getpid():
            return None  # the path is still our own: no successor
        pairs = splicer.export()
        for state, fds in pairs:
            socket.send_fds(s, [json.dumps({"pair": state}).encode()], fds)
        s.send(json.dumps({"end": len(pairs)}).encode())
        reply = json.loads(s.recv(_MAX) or b"{}")
        if reply.get("adopted") != len(pairs):
            _log.error(f"successor did not adopt every pair: {reply}")
            return None
        splicer.release_all()
        return len(pairs)
    except (OSError, ValueError) as e:
        _log.error(f"hand-off to successor failed: {e}")
        return None
    finally:
        s.close()
