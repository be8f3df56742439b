"""The HBONE listener: accepts, runs each TLS handshake itself (so refusals are counted by kind
and a stalled one is cut), then hands the connection to hbone.ServerConnection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
import weakref
from collections.abc import Awaitable, Callable

from .. import log
from .hbone import ServerConnection, TcpSide
from .tls import ServerIdentities

_log = log.get("hbone")

MAX_HANDSHAKES = 256  # TLS handshakes in progress at once on the HBONE listener


class Listener:
    """The HBONE listener: accepts, then runs each TLS handshake itself so refusals are counted.

    ``refused`` counts failed handshakes by kind (no_client_cert, unknown_ca,
    expired, bad_certificate, timeout, protocol); each is logged with the peer
    and OpenSSL's reason. A handshake that stalls is cut after
    handshake_timeout. Running out of descriptors pauses accepting briefly
    instead of failing.
    """

    def __init__(self, sock: socket.socket, factory, ctx: ssl.SSLContext, handshake_timeout: float):
        self.sock = sock
        self.sockets = [sock]
        self.factory = factory
        self.ctx = ctx
        self.handshake_timeout = handshake_timeout
        self._slots = asyncio.Semaphore(MAX_HANDSHAKES)
        self.refused: dict[str, int] = {}
        self.conns = weakref.WeakSet()  # server connections, for the admin view
        # a flood of bad clients must not flood the log: 5 lines a second, then a count
        self._burst = log.Burst(
            _log, "HBONE handshakes refused", fields=lambda: {"refused": dict(self.refused)}
        )
        self.accepted = 0
        self.handshaking = 0
        self._task = asyncio.ensure_future(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self.sock)
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    _log.error(f"HBONE accept paused for 0.5 s: {e.strerror}")
                    await asyncio.sleep(0.5)
                    continue
                raise
            self.accepted += 1
            asyncio.ensure_future(self._handshake(conn, addr))

    def _refuse(self, kind: str) -> None:
        self.refused[kind] = self.refused.get(kind, 0) + 1

    def _make(self):
        c = self.factory()
        c.on_refused = self._refuse
        self.conns.add(c)
        return c

    async def _handshake(self, conn: socket.socket, addr) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.handshake_timeout
        self.handshaking += 1
        acquired = False
        try:
            # asyncio gives every TLS connection a 256 KiB buffer: bound how many handshakes
            # run at once, so 10,000 stalled clients cost sockets, not gigabytes. The
            # timeout counts from accept, queueing included.
            await asyncio.wait_for(self._slots.acquire(), deadline - loop.time())
            acquired = True
            await loop.connect_accepted_socket(
                self._make,
                conn,
                ssl=self.ctx,
                ssl_handshake_timeout=max(0.1, deadline - loop.time()),
            )
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as e:
            kind = refusal_kind(e)
            self._refuse(kind)
            self._burst.warning(
                "HBONE handshake refused",
                fields={"peer": f"{addr[0]}:{addr[1]}", "kind": kind, "reason": _reason(e)},
            )
            with contextlib.suppress(OSError):
                conn.close()
        finally:
            self.handshaking -= 1
            if acquired:
                self._slots.release()

    def close(self) -> None:
        self._burst.flush()
        self._task.cancel()
        self.sock.close()


def _reason(e: BaseException) -> str:
    return (
        getattr(e, "verify_message", None)
        or getattr(e, "reason", None)
        or str(e)
        or type(e).__name__
    )


def refusal_kind(e: BaseException) -> str:
    """A short, bounded name for why a TLS handshake failed (a metric label)."""
    text = f"{getattr(e, 'reason', '')} {getattr(e, 'verify_message', '')} {e}".lower()
    if "did_not_return_a_certificate" in text or "certificate required" in text:
        return "no_client_cert"
    if "expired" in text:
        return "expired"
    if (
        "unknown ca" in text
        or "local issuer" in text
        or "self-signed" in text
        or "self signed" in text
    ):
        return "unknown_ca"
    if "certificate" in text:
        return "bad_certificate"
    if isinstance(e, TimeoutError) or "taking longer" in text or "timed out" in text:
        return "timeout"
    if isinstance(e, ConnectionError | EOFError):
        return "closed_by_peer"
    return "protocol"


def serve(
    sock: socket.socket,
    identities: ServerIdentities,
    on_connect: Callable[[str, str | None, str], Awaitable[TcpSide | str]],
    handshake_timeout: float = 10.0,
    vouch: Callable[[str, str, str], bool] | None = None,
    revoked: Callable[[str | None], bool] | None = None,
    relayed: Callable[[str, str, str], bool] | None = None,
) -> Listener:
    """Serve HBONE on a listening socket (listeners.py); on_connect(authority, client id,
    client ip) returns a connected TcpSide or a refusal. client ip: the Forwarded address when
    vouch(address, client id, peer address) says it is the client's, else the peer's; when
    relayed(...) says the client is a waypoint relaying that address's flow, on_connect also
    gets original=address."""
    return Listener(
        sock,
        lambda: ServerConnection(identities.trust_domain, on_connect, vouch, revoked, relayed),
        identities.default,
        handshake_timeout,
    )
