"""HBONE client (outbound): a connection to another node's tunnel as a source workload, and the
pool that multiplexes flows as streams, one connection per (source identity, destination
identity, node)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable

from ... import log
from ...http2 import wire
from ..tls import client_context, peer_serial, sni_for
from .codec import POOL_MAX_AGE, H2Connection, HboneError, Stream, TcpSide, _mtime_ns, forwarded

_log = log.get("hbone")

STAMP_TTL = 0.5  # s: how long a source certificate's mtime is taken as current


class ClientConnection(H2Connection):
    """Outbound: one TLS connection to a peer node's tunnel, carrying many flows."""

    client_side = True

    def __init__(self):
        super().__init__()
        self.waiting: dict[int, asyncio.Future] = {}
        self.opened_at = time.monotonic()
        self.cert_stamp = 0  # mtime of the client certificate it was made with
        self.retiring = False

    def retire(self) -> None:
        """Take no new flow (the pool has replaced it); close once its flows are done."""
        self.retiring = True
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self.retiring and not self.streams and not self.waiting and self.transport:
            if not self.transport.is_closing():
                with contextlib.suppress(Exception):
                    self.h2.close_connection()
                    self._write()
                self.transport.close()
        elif self.retiring and self.transport and not self.transport.is_closing():
            asyncio.get_running_loop().call_later(1.0, self._close_if_done)

    def _no_stream(self, why: str) -> HboneError:
        """A flow this connection cannot take, another may (refused_stream: the outbound path
        tries again); the connection takes no new flow."""
        self.retire()
        err = HboneError(f"no new stream on this HBONE connection: {why}")
        err.refused_stream = True
        return err

    def handle(self, ev):
        if isinstance(ev, wire.ConnectionTerminated):  # GOAWAY: no new flow on it
            self.retire()
            return
        if isinstance(ev, wire.ResponseReceived):
            fut = self.waiting.pop(ev.stream_id, None)
            headers = dict(ev.headers)
            if fut and not fut.done():
                fut.set_result(headers)
            return
        if isinstance(ev, wire.StreamReset):
            fut = self.waiting.pop(ev.stream_id, None)
            if fut and not fut.done():
                err = HboneError(f"peer reset the CONNECT (error {ev.error_code})")
                err.refused_stream = ev.error_code == wire.ErrorCodes.REFUSED_STREAM
                fut.set_exception(err)
        super().handle(ev)

    def connection_lost(self, exc):
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(HboneError(f"HBONE connection lost: {exc or 'closed by peer'}"))
        self.waiting.clear()
        super().connection_lost(exc)

    async def connect(
        self,
        authority: str,
        timeout: float = 10.0,
        source: str | None = None,
        baggage: str | None = None,
    ) -> Stream:
        """Open a flow to authority; source is the client workload's address (Forwarded: for=),
        baggage its name and labels (for a waypoint's request metrics)."""
        if self.closed.done() or self.transport is None or self.transport.is_closing():
            # lost before this flow got here (its futures were failed then): nothing would
            # ever answer the CONNECT
            raise self._no_stream("the connection is closed")
        if len(self.streams) >= self.h2.peer_max_streams:
            raise self._no_stream(f"the peer's limit of {self.h2.peer_max_streams} streams")
        try:
            sid = self.h2.get_next_available_stream_id()
        except wire.StreamClosedError as e:  # its stream ids are used up
            raise self._no_stream(str(e)) from None
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.waiting[sid] = fut
        headers = [(":method", "CONNECT"), (":authority", authority)]
        if source:
            headers.append(("forwarded", forwarded(source)))
        if baggage:
            headers.append(("baggage", baggage))
        try:
            self.h2.send_headers(sid, headers)
        except wire.StreamClosedError as e:  # the peer's GOAWAY came first
            raise self._no_stream(str(e)) from None
        s = Stream(self, sid, authority)
        self.streams[sid] = s
        self._write()
        # a timer on the future itself: wait_for's extra future and callbacks, per flow, cost
        # more than the CONNECT's own headers
        timer = loop.call_later(timeout, _expire, fut)
        try:
            headers = await fut
        finally:
            timer.cancel()
        if headers.get(":status") != "200":
            self.drop(s)
            raise HboneError(
                f"CONNECT {authority} refused with {headers.get(':status')}: "
                f"{headers.get('dabba-reason', '')}"
            )
        return s


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class Pool:
    """Client connections keyed by (source identity, destination identity, node address)."""

    def __init__(
        self,
        trust_domain: str,
        bundle_pem: bytes,
        cert_files: Callable[[str], tuple[str, str]],
        max_age: float = POOL_MAX_AGE,
        revoked: Callable[[str | None], bool] | None = None,
    ):
        self.revoked = revoked  # serial -> whether its node was revoked (Snapshot)
        self.trust_domain = trust_domain
        self.bundle_pem = bundle_pem
        self.cert_files = cert_files  # source identity -> (chain file, key file)
        self.max_age = max_age
        self.conns: dict[tuple[str, str, str], ClientConnection] = {}
        self.handshakes = 0
        self.retired = 0  # connections replaced for their age or a renewed certificate
        self._opening: dict[tuple[str, str, str], asyncio.Future] = {}
        self._stamps: dict[str, tuple[float, int]] = {}  # source identity -> (seen at, mtime)

    def _fresh(self, c: ClientConnection, src_id: str) -> bool:
        """Whether a pooled connection may carry a new flow: open, younger than max_age, and
        made with the client certificate the node holds now (a renewal replaces it)."""
        if c.closed.done() or c.retiring or not c.transport or c.transport.is_closing():
            return False
        if time.monotonic() - c.opened_at > self.max_age:
            return False
        return self._cert_stamp(src_id) == c.cert_stamp

    def _cert_stamp(self, src_id: str) -> int:
        """The source's certificate file's mtime, looked at most every STAMP_TTL seconds (a
        stat per new flow cost as much as the flow's CONNECT headers): a renewed certificate
        is used within that time, as the tunnel's own reload notices it."""
        now = time.monotonic()
        seen = self._stamps.get(src_id)
        if seen is None or now - seen[0] > STAMP_TTL:
            seen = self._stamps[src_id] = (now, _mtime_ns(self.cert_files(src_id)[0]))
        return seen[1]

    async def get(self, src_id: str, dst_id: str, node: tuple[str, int]) -> ClientConnection:
        key = (src_id, dst_id, f"{node[0]}:{node[1]}")
        c = self.conns.get(key)
        if c is not None and self._fresh(c, src_id):
            return c
        if c is not None and not c.closed.done():
            self.retired += 1
            c.retire()
        if key in self._opening:
            return await asyncio.shield(self._opening[key])
        fut = asyncio.get_running_loop().create_future()
        self._opening[key] = fut
        try:
            c = await self._dial(src_id, dst_id, node)
            self.conns[key] = c
            fut.set_result(c)
            return c
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: waiters get it through shield
            raise
        finally:
            del self._opening[key]

    async def _dial(self, src_id: str, dst_id: str, node: tuple[str, int]) -> ClientConnection:
        chain, key = self.cert_files(src_id)
        stamp = _mtime_ns(chain)
        self._stamps[src_id] = (time.monotonic(), stamp)
        ctx = client_context(chain, key, self.bundle_pem)
        loop = asyncio.get_running_loop()
        try:
            tr, conn = await asyncio.wait_for(
                loop.create_connection(
                    ClientConnection, node[0], node[1], ssl=ctx, server_hostname=sni_for(dst_id)
                ),
                10,
            )
        except (OSError, ssl.SSLError, TimeoutError) as e:
            raise HboneError(f"TLS to {node[0]}:{node[1]} as {src_id} failed: {e}") from None
        self.handshakes += 1
        sslobj = tr.get_extra_info("ssl_object")
        if conn.closed.done() or tr.is_closing() or sslobj is None:
            # TLS 1.3: the client's handshake ends before the server has checked the client's
            # certificate, and a server that refuses it closes right after
            raise HboneError(
                f"TLS to {node[0]}:{node[1]} as {src_id} was closed by the peer right after the "
                "handshake (it refused our certificate?)"
            )
        if sslobj.selected_alpn_protocol() != "h2":
            tr.abort()
            raise HboneError(f"peer {node[0]}:{node[1]} did not negotiate h2")
        got = conn.peer_id
        if got != dst_id:
            tr.abort()
            raise HboneError(
                f"peer {node[0]}:{node[1]} proved {got or 'no SPIFFE identity'}, not {dst_id}: refused"
            )
        if self.revoked is not None and self.revoked(peer_serial(sslobj)):
            tr.abort()
            raise HboneError(f"peer {node[0]}:{node[1]} ({got}) holds a revoked node's certificate")
        conn.opened_at, conn.cert_stamp = time.monotonic(), stamp
        return conn


async def dial_tcp(host: str, port: int, timeout: float = 5.0) -> TcpSide:
    """A plain TCP connection to a workload, as the relay's other side."""
    loop = asyncio.get_running_loop()
    _, side = await asyncio.wait_for(loop.create_connection(TcpSide, host, port), timeout)
    return side
