"""HBONE server (inbound, 15008): one mutual-TLS connection from another node's tunnel, each
CONNECT handed with the client's identity to the tunnel's callback, which decides and connects
upstream."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from ... import log
from ...control import validate
from ...http2 import wire
from ..tls import peer_identity, peer_serial
from .codec import (
    MAX_PENDING_OPENS,
    H2Connection,
    Stream,
    TcpSide,
    _authority_ok,
    _forwarded_for,
    rst,
)

_log = log.get("hbone")


class ServerConnection(H2Connection):
    """Inbound: CONNECT requests become flows through the on_connect callback."""

    client_side = False

    def __init__(
        self,
        trust_domain: str,
        on_connect: Callable[[str, str | None, str], Awaitable[TcpSide | str]],
        vouch: Callable[[str, str, str], bool] | None = None,
        revoked: Callable[[str | None], bool] | None = None,
        relayed: Callable[[str, str, str], bool] | None = None,
    ):
        super().__init__()
        self.trust_domain = trust_domain
        self.revoked = revoked  # serial -> whether its node was revoked (Snapshot)
        self.on_connect = (
            on_connect  # (authority, client SPIFFE ID, client address) -> TcpSide | refusal reason
        )
        # (Forwarded for= address, client SPIFFE ID, peer address) -> whether the address is
        # the client's to claim; None: never (the peer's own address is used)
        self.vouch = vouch
        # (Forwarded for= address, client SPIFFE ID, peer address) -> whether the client is a
        # waypoint relaying a flow of that workload: the flow is the waypoint's (its identity
        # and address), and the address is told to on_connect as the original source
        self.relayed = relayed
        self.pending = 0  # CONNECTs whose upstream connect runs (MAX_PENDING_OPENS)

    idle_timeout = 300.0  # a connection without streams and without bytes this long is closed

    def _check_idle(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        idle = time.monotonic() - self.last_active
        if not self.streams and idle >= self.idle_timeout:
            _log.info(
                "idle HBONE connection closed",
                fields={"peer": self.peer_id, "idle_s": round(idle)},
            )
            self.h2.close_connection()
            self._write()
            self.transport.close()
            return
        asyncio.get_running_loop().call_later(max(1.0, self.idle_timeout - idle), self._check_idle)

    def connection_made(self, transport):
        peer = peer_identity(transport.get_extra_info("ssl_object"))
        if not validate.workload_identity(peer, self.trust_domain):
            # a valid certificate, but not a workload identity of this trust domain: another
            # domain, or a node's or the control plane's own (they never open flows)
            _log.warning(
                "HBONE client refused: not a workload of this trust domain",
                fields={
                    "peer": str(transport.get_extra_info("peername")),
                    "identity": peer or "none",
                    "trust_domain": self.trust_domain,
                },
            )
            if self.on_refused:
                self.on_refused("wrong_identity")
            self.transport = transport
            transport.abort()
            return
        if self.revoked is not None and self.revoked(
            peer_serial(transport.get_extra_info("ssl_object"))
        ):
            _log.warning(
                "HBONE client refused: its certificate belongs to a revoked node",
                fields={"peer": str(transport.get_extra_info("peername")), "identity": peer},
            )
            if self.on_refused:
                self.on_refused("revoked")
            self.transport = transport
            transport.abort()
            return
        super().connection_made(transport)
        asyncio.get_running_loop().call_later(self.idle_timeout, self._check_idle)

    def handle(self, ev):
        if isinstance(ev, wire.RequestReceived):
            headers = dict(ev.headers)
            if headers.get(":method") != "CONNECT" or not _authority_ok(
                headers.get(":authority", "")
            ):
                _log.warning(
                    "malformed HBONE request refused",
                    fields={
                        "peer": self.peer_id,
                        "method": headers.get(":method"),
                        "authority": str(headers.get(":authority"))[:64],
                    },
                )
                self.h2.send_headers(ev.stream_id, [(":status", "400")], end_stream=True)
                return
            if self.pending >= MAX_PENDING_OPENS:
                # refused before any upstream connect starts; the peer may retry
                if self.on_refused:
                    self.on_refused("pending_opens")
                with contextlib.suppress(wire.StreamClosedError):  # reset already
                    self.h2.reset_stream(ev.stream_id, wire.ErrorCodes.REFUSED_STREAM)
                return
            s = Stream(self, ev.stream_id, headers[":authority"])
            s.source = _forwarded_for(headers.get("forwarded", ""))
            self.streams[ev.stream_id] = s
            self.pending += 1
            asyncio.ensure_future(self._open(s))
            return
        super().handle(ev)

    async def _open(self, s: Stream) -> None:
        try:
            await self._open_one(s)
        finally:
            self.pending -= 1

    async def _open_one(self, s: Stream) -> None:
        peer = self.transport.get_extra_info("peername")
        try:
            if not validate.workload_identity(self.peer_id, self.trust_domain):
                result = (
                    f"denied: client identity {self.peer_id or 'none'} is not a workload of "
                    f"trust domain {self.trust_domain}"
                )
            else:
                # the workload's own address, as its node's tunnel says (like ztunnel's
                # Forwarded header), when it is a workload of the client's identity on the
                # client's node; else the peer node's own address: an authenticated peer must
                # not claim any address it likes and pass ipBlocks rules everywhere
                peer_ip = peer[0] if peer else ""
                src_ip = peer_ip
                original = ""
                if s.source and s.source != peer_ip:
                    if self.vouch is not None and self.vouch(s.source, self.peer_id, peer_ip):
                        src_ip = s.source
                    elif self.relayed is not None and self.relayed(s.source, self.peer_id, peer_ip):
                        original = s.source
                    else:
                        _log.warning(
                            "Forwarded address not honoured: not a workload of the client on "
                            "its node",
                            fields={"forwarded": s.source, "client": self.peer_id, "peer": peer_ip},
                        )
                if original:
                    result = await self.on_connect(
                        s.authority, self.peer_id, src_ip, original=original
                    )
                else:
                    result = await self.on_connect(s.authority, self.peer_id, src_ip)
        except Exception as e:  # a failing callback must not take the connection down
            result = f"internal error: {e}"
        if s.closed or self.transport.is_closing():
            if isinstance(result, TcpSide) and result.transport:
                result.transport.abort()
            return
        try:
            if isinstance(result, str):
                status = "403" if result.startswith("denied") else "503"
                self.drop(s)  # (with what it sent before the answer)
                # a header value is one line of printable text (RFC 9110 §5.5): an
                # exception's message may hold anything
                reason = "".join(c if c.isprintable() else " " for c in result[:200])
                self.h2.send_headers(
                    s.stream_id,
                    [(":status", status), ("dabba-reason", reason)],
                    end_stream=True,
                )
                self._write()
                return
            self.h2.send_headers(s.stream_id, [(":status", "200")])
            result.attach(s)
            self._write()
        except Exception as e:  # the peer closed or broke the stream meanwhile
            _log.info(f"HBONE stream {s.stream_id} gone before it was answered: {e!r}")
            self.drop(s)
            if isinstance(result, TcpSide) and result.transport:
                rst(result.transport)
