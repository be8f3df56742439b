"""HBONE: TCP flows as HTTP/2 CONNECT streams over mutual TLS 1.3 (ALPN h2), as Istio's ztunnel.

Server (inbound, 15008): presents the certificate of the destination
workload the client names by SNI, requires a client certificate from the
trust bundle, hands each CONNECT (``:authority`` = destination ip:port) with
the client's SPIFFE ID to a callback that decides and connects upstream,
answers 200 and relays.

Client (outbound): presents the source workload's certificate, requires the
destination workload's SPIFFE ID from the server (else the connection is
refused), and multiplexes flows as streams on pooled connections, one per
(source identity, destination identity, destination node): a new flow
costs a stream, not a handshake.

Relaying runs in protocol callbacks, without a coroutine per chunk. HTTP/2
flow control carries TCP backpressure both ways: received DATA is
acknowledged (window opened) only as the TCP side drains, and a TCP side
is paused while its stream's send window is closed. Half-close maps to
END_STREAM; a reset on either side resets the other.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import ipaddress
import os
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

from .. import log
from ..control import validate
from ..node.addresses import split_hostport
from .tls import client_context, peer_identity, peer_serial, sni_for

_log = log.get("hbone")


def _cheap_raw_data_repr(data) -> str:
    """hyperframe's _raw_data_repr, but hexlifying only the 10 bytes it shows.

    h2 logs repr(frame) of every frame it receives, computed even when nothing
    is logged, and hyperframe hexlified a DATA frame's whole body (up to 16 KiB)
    to show its first 20 hex digits: py-spy put 47% of the receiving tunnel's
    CPU there during a bulk transfer. Same text, a fraction of the work.
    """
    if not data:
        return "None"
    r = binascii.hexlify(bytes(data[:10])).decode("ascii")
    return "<hex:" + r + ("..." if len(data) > 10 else "") + ">"


hyperframe.frame._raw_data_repr = _cheap_raw_data_repr

MAX_STREAMS = 100_000  # per connection; descriptors are the real bound
WINDOW = 16 * 1024 * 1024  # per stream and per connection: room for throughput on fast links
MAX_FRAME = 256 * 1024
# A peer that asks for answers (PING, SETTINGS) and does not read them would grow our buffer
# without bound: while our unsent bytes exceed CONTROL_HIGH, at most MAX_QUEUED_CONTROL such
# answers are queued, then the connection is closed (ENHANCE_YOUR_CALM), as Envoy's
# max_outbound_control_frames does; and never more than MAX_UNSENT bytes at all (data is
# bounded by the windows, 16 MiB).
CONTROL_HIGH = 1 << 20
MAX_QUEUED_CONTROL = 1000
MAX_UNSENT = 64 << 20
# CONNECT requests whose upstream connect is still running, per connection: more are refused
# (REFUSED_STREAM, which a client may retry: RFC 9113 §8.7) before any connect starts
MAX_PENDING_OPENS = 1024
# streams a peer resets, per connection, in RESET_WINDOW seconds: more closes the connection
# ("rapid reset", CVE-2023-44487)
MAX_RESETS, RESET_WINDOW = 2000, 10.0
TCP_HIGH_WATER = 4 * 1024 * 1024


class HboneError(Exception):
    """A flow could not be opened; the message says why (identity, refusal, connect)."""

    refused_stream = False  # the peer refused the stream before acting on it: safe to retry


POOL_MAX_AGE = 3600.0  # a pooled HBONE connection takes no new flow after this (s): well below
# a workload certificate's life (24 h; renewed at half), and a renewal replaces it at once


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def rst(transport: asyncio.BaseTransport) -> None:
    """Close a TCP transport with a reset (SO_LINGER 0), so its peer sees a reset, not an EOF."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


# ---- the TCP side of a flow ---------------------------------------------------------------------


class TcpSide(asyncio.Protocol):
    """A plain TCP connection coupled to one HBONE stream."""

    open = 0  # live TCP sides in this process: what a draining tunnel waits for

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.stream: Stream | None = None
        self.pending: list[bytes] = []  # data before the stream is attached
        self.eof = False
        self.on_close = None  # called once the connection is gone
        self.lost = False  # the TCP connection is gone

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=TCP_HIGH_WATER)
        TcpSide.open += 1

    def attach(self, stream: Stream) -> None:
        self.stream = stream
        stream.tcp = self
        if stream.closed:  # reset by the peer before we got here
            if self.transport and not self.lost:
                rst(self.transport)
            return
        for chunk in self.pending:
            stream.send(chunk)
        if self.pending and self.transport and not self.eof:
            self.transport.resume_reading()
        self.pending.clear()
        if self.eof:
            stream.end()
        # what the peer sent before we were attached (a server that speaks first)
        if stream.early:
            for chunk in stream.early:
                self.transport.write(chunk)
            stream.early.clear()
            stream.conn.ack_pending(stream)
        if stream.early_end:
            if self.transport.can_write_eof():
                self.transport.write_eof()
            stream.conn._maybe_done(stream)
        if self.lost and not stream.closed:
            # the TCP side died before the flow was set up: tell the peer, or both ends wait
            _log.info("TCP side gone before its flow was attached; stream reset")
            stream.reset()

    def data_received(self, data: bytes):
        if self.stream is None:
            self.pending.append(data)
            if sum(map(len, self.pending)) > TCP_HIGH_WATER:
                self.transport.pause_reading()  # until the flow is attached
        else:
            self.stream.send(data)

    def eof_received(self):
        # A transport may report EOF again when reading resumes after it (flush pauses and
        # resumes reading while data waits for window): end the stream once only.
        if self.eof:
            return True
        self.eof = True
        if self.stream is not None:
            self.stream.end()
        return True  # keep our sending half open: half-close

    def connection_lost(self, exc):
        TcpSide.open -= 1
        self.lost = True
        if self.on_close is not None:
            self.on_close()
        if self.stream is not None and not self.stream.closed:
            self.stream.reset() if exc else self.stream.end()

    def pause_writing(self):
        if self.stream:
            self.stream.tcp_paused = True

    def resume_writing(self):
        if self.stream:
            self.stream.tcp_paused = False
            self.stream.conn.ack_pending(self.stream)


# ---- HTTP/2 connections ---------------------------------------------------------------------------


@dataclass
class Stream:
    """One flow on an HBONE connection."""

    conn: H2Connection
    stream_id: int
    authority: str
    tcp: TcpSide | None = None
    outbuf: bytearray = None  # waiting for send window
    end_pending: bool = False
    ended: bool = False  # our end of stream was asked for (sent once the queue is out)
    closed: bool = False
    tcp_paused: bool = False
    unacked: int = 0  # received bytes written to TCP but not yet acknowledged
    bytes_in: int = 0
    bytes_out: int = 0
    source: str | None = None  # the client workload's address, from Forwarded: for=
    early: list = None  # data received before a TCP side was attached
    early_end: bool = False  # the peer ended the stream before that

    def __post_init__(self):
        self.outbuf = bytearray()
        self.early = []

    def send(self, data: bytes) -> None:
        if self.outbuf:  # keep order behind what already waits for window
            self.outbuf += data
            self.conn.flush(self)
        else:  # the usual case: straight into frames, no copy into outbuf and back
            self.conn.flush(self, data)

    def end(self) -> None:
        if self.ended:  # a second END_STREAM is a protocol error that would close the flow
            return
        self.ended = True
        self.end_pending = True
        self.conn.flush(self)

    def reset(self) -> None:
        self.conn.reset_stream(self)


class H2Connection(asyncio.Protocol):
    """Shared by client and server: h2 state, streams, flow control."""

    client_side = True

    def __init__(self):
        # RFC 9113 §8.5: a CONNECT request carries :method and :authority only. h2 4.2's
        # header validation demands :scheme and :path of every request, so it is off, and
        # the server checks what it uses (:method, :authority) itself (_authority_ok).
        cfg = h2.config.H2Configuration(
            client_side=self.client_side,
            header_encoding="utf-8",
            validate_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config=cfg)
        # Our own limit on the peer's concurrent streams applies from the first frame: h2's
        # default (100) would otherwise hold until the peer acknowledges our SETTINGS, and a
        # burst of new flows on a fresh connection would be a protocol error.
        self.h2.local_settings = h2.settings.Settings(
            client=self.client_side,
            initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS},
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.closed = asyncio.get_event_loop().create_future()
        self.peer_id: str | None = None
        self.last_active = time.monotonic()
        self._queued_control = 0  # answers queued while the peer does not read (CONTROL_HIGH)
        self._resets: list[float] = []  # when the peer reset streams (RESET_WINDOW)

    on_refused = None  # set by a Listener: called with a refusal kind ("flood", ...)

    def _calm_down(self, kind: str, why: str) -> None:
        """Close a connection whose peer abuses it: GOAWAY ENHANCE_YOUR_CALM, counted."""
        _log.warning(f"HBONE connection closed: {why}", fields={"peer": self.peer_id})
        if self.on_refused:
            self.on_refused(kind)
        with contextlib.suppress(Exception):
            self.h2.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            out = self.h2.data_to_send()
            if out and self.transport:
                self.transport.write(out)
        if self.transport:
            self.transport.abort()

    def drain(self, deadline: float) -> None:
        """Take no new flow (GOAWAY to the peer), let the open ones finish, and close the
        connection after deadline seconds at most."""
        with contextlib.suppress(Exception):
            self.h2.close_connection()
            self._write()
        if isinstance(self, ClientConnection):
            self.retire()
        if self.transport is not None:
            tr = self.transport
            asyncio.get_running_loop().call_later(
                deadline, lambda: None if tr.is_closing() else tr.abort()
            )

    def _check_unsent(self, answers: int) -> bool:
        """After queueing answers (PING/SETTINGS acks): True when the peer floods us."""
        unsent = self.transport.get_write_buffer_size() if self.transport else 0
        if unsent <= CONTROL_HIGH:
            self._queued_control = 0
            return False
        self._queued_control += answers
        if self._queued_control > MAX_QUEUED_CONTROL or unsent > MAX_UNSENT:
            self._calm_down("flood", f"the peer does not read its answers ({unsent} bytes unsent)")
            return True
        return False

    # -- transport callbacks --
    def connection_made(self, transport):
        self.transport = transport
        self.peer_id = peer_identity(transport.get_extra_info("ssl_object"))
        self.h2.initiate_connection()
        # Our limits apply once the peer acknowledges them, which it does before it can
        # send a frame that uses them.
        self.h2.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            }
        )
        self.h2.increment_flow_control_window(WINDOW - 65535)
        self._write()

    def data_received(self, data: bytes):
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            _log.warning(
                f"HTTP/2 protocol error from peer, closing: {e}", fields={"peer": self.peer_id}
            )
            self._write()
            self.transport.close()
            return
        self.last_active = time.monotonic()
        answers = 0
        try:
            for ev in events:
                if isinstance(ev, h2.events.PingReceived | h2.events.RemoteSettingsChanged):
                    answers += 1  # h2 queues the ACK itself
                elif isinstance(ev, h2.events.StreamReset) and self._reset_storm():
                    return
                self.handle(ev)
        except Exception as e:  # whatever a peer sends, it takes down this connection only
            _log.warning(
                f"HBONE connection closed after an unexpected frame sequence: {e!r}",
                fields={"peer": self.peer_id},
            )
            self.transport.abort()
            return
        self._write()
        if answers:
            self._check_unsent(answers)

    def _reset_storm(self) -> bool:
        now = time.monotonic()
        self._resets.append(now)
        if len(self._resets) > MAX_RESETS:
            self._resets = [t for t in self._resets if now - t < RESET_WINDOW]
            if len(self._resets) > MAX_RESETS:
                self._calm_down(
                    "reset_storm", f"{len(self._resets)} streams reset in {RESET_WINDOW:.0f}s"
                )
                return True
        return False

    def connection_lost(self, exc):
        for s in list(self.streams.values()):
            if s.tcp and s.tcp.transport:
                rst(s.tcp.transport)
            s.closed = True
        self.streams.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def _write(self):
        out = self.h2.data_to_send()
        if out and self.transport and not self.transport.is_closing():
            self.transport.write(out)

    # -- events --
    def handle(self, ev):
        if isinstance(ev, h2.events.DataReceived):
            s = self.streams.get(ev.stream_id)
            if s is None:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                return
            if (
                s.tcp is None
            ):  # not attached yet: keep it (unacknowledged, so bounded by the window)
                s.bytes_in += len(ev.data)
                s.early.append(ev.data)
                s.unacked += ev.flow_controlled_length
                return
            s.bytes_in += len(ev.data)
            s.tcp.transport.write(ev.data)
            s.unacked += ev.flow_controlled_length
            self.ack_pending(s)
        elif isinstance(ev, h2.events.StreamEnded):
            s = self.streams.get(ev.stream_id)
            if s is not None and s.tcp is None:
                s.early_end = True
                return
            if s and s.tcp and s.tcp.transport and s.tcp.transport.can_write_eof():
                s.tcp.transport.write_eof()
            self._maybe_done(s)
        elif isinstance(ev, h2.events.StreamReset):
            s = self.streams.pop(ev.stream_id, None)
            if s:
                s.closed = True
                if s.tcp and s.tcp.transport:
                    rst(s.tcp.transport)
        elif isinstance(ev, h2.events.WindowUpdated):
            targets = (
                self.streams.values() if ev.stream_id == 0 else [self.streams.get(ev.stream_id)]
            )
            for s in list(targets):
                if s:
                    self.flush(s)

    def ack_pending(self, s: Stream) -> None:
        """Open the window for what TCP took, unless TCP is backed up (that is the backpressure)."""
        if s.unacked and not s.tcp_paused and not s.closed:
            try:
                self.h2.acknowledge_received_data(s.unacked, s.stream_id)
            except h2.exceptions.StreamClosedError:
                pass
            s.unacked = 0
            self._write()

    def flush(self, s: Stream, data: bytes = b"") -> None:
        """Send what the windows allow: first data (when nothing was queued), then the queue."""
        if s.closed:
            return
        try:
            while data:
                window = min(
                    self.h2.local_flow_control_window(s.stream_id), self.h2.max_outbound_frame_size
                )
                if window <= 0:
                    s.outbuf += data
                    break
                chunk, data = (data, b"") if len(data) <= window else (data[:window], data[window:])
                self.h2.send_data(s.stream_id, chunk)
                s.bytes_out += len(chunk)
            while s.outbuf:
                window = min(
                    self.h2.local_flow_control_window(s.stream_id), self.h2.max_outbound_frame_size
                )
                if window <= 0:
                    break
                chunk = bytes(s.outbuf[:window])
                del s.outbuf[:window]
                self.h2.send_data(s.stream_id, chunk)
                s.bytes_out += len(chunk)
            if s.tcp and s.tcp.transport and not s.tcp.eof:
                # pause the TCP side while data waits for window (after its EOF there is
                # nothing left to read)
                (s.tcp.transport.pause_reading if s.outbuf else s.tcp.transport.resume_reading)()
            if s.end_pending and not s.outbuf:
                self.h2.end_stream(s.stream_id)
                s.end_pending = False
                self._maybe_done(s)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            # the peer closed or reset the stream under us: release its TCP side too
            s.closed = True
            self.streams.pop(s.stream_id, None)
            if s.tcp and s.tcp.transport and not s.tcp.lost:
                s.tcp.transport.close() if s.tcp.eof else rst(s.tcp.transport)
        self._write()

    def reset_stream(self, s: Stream) -> None:
        if not s.closed:
            s.closed = True
            try:
                self.h2.reset_stream(s.stream_id, error_code=h2.errors.ErrorCodes.CONNECT_ERROR)
            except h2.exceptions.StreamClosedError:
                pass
            self.streams.pop(s.stream_id, None)
            self._write()

    def _maybe_done(self, s: Stream | None) -> None:
        if s is None:
            return
        st = self.h2.streams.get(s.stream_id)
        if st is None or st.closed:
            self.streams.pop(s.stream_id, None)
            s.closed = True
            if s.tcp and s.tcp.transport and s.tcp.eof:
                s.tcp.transport.close()


def _forwarded_for(value) -> str | None:
    """The for= address of a Forwarded header (RFC 7239): a plain IPv4 address, or an IPv6
    one in brackets (for="[fd00::1]"); None for anything else."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    for part in str(value).split(";"):
        k, _, v = part.strip().partition("=")
        if k.lower() == "for":
            v = v.strip('"')
            try:
                if v.startswith("[") and v.endswith("]"):
                    return str(ipaddress.IPv6Address(v[1:-1]))
                return str(ipaddress.IPv4Address(v))
            except ValueError:
                return None
    return None


def forwarded(addr: str) -> str:
    """A Forwarded header's value naming addr (RFC 7239: an IPv6 address quoted, bracketed)."""
    return f'for="[{addr}]"' if ":" in addr else f"for={addr}"


def _authority_ok(authority: str) -> bool:
    """ip:port or [ipv6]:port with a port in range (HBONE names an address, never a name)."""
    try:
        split_hostport(authority)
        return True
    except ValueError:
        return False


class ServerConnection(H2Connection):
    """Inbound: CONNECT requests become flows through the on_connect callback."""

    client_side = False

    def __init__(
        self,
        trust_domain: str,
        on_connect: Callable[[str, str | None, str], Awaitable[TcpSide | str]],
        vouch: Callable[[str, str, str], bool] | None = None,
        revoked: Callable[[str | None], bool] | None = None,
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
        if isinstance(ev, h2.events.RequestReceived):
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
                with contextlib.suppress(h2.exceptions.StreamClosedError):  # reset already
                    self.h2.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
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
                if s.source and s.source != peer_ip:
                    if self.vouch is not None and self.vouch(s.source, self.peer_id, peer_ip):
                        src_ip = s.source
                    else:
                        _log.warning(
                            "Forwarded address not honoured: not a workload of the client on "
                            "its node",
                            fields={"forwarded": s.source, "client": self.peer_id, "peer": peer_ip},
                        )
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
                self.streams.pop(s.stream_id, None)
                self.h2.send_headers(
                    s.stream_id,
                    [(":status", status), ("dabba-reason", result[:200])],
                    end_stream=True,
                )
                self._write()
                return
            self.h2.send_headers(s.stream_id, [(":status", "200")])
            result.attach(s)
            self._write()
        except Exception as e:  # the peer closed or broke the stream meanwhile
            _log.info(f"HBONE stream {s.stream_id} gone before it was answered: {e!r}")
            self.streams.pop(s.stream_id, None)
            s.closed = True
            if isinstance(result, TcpSide) and result.transport:
                rst(result.transport)


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

    def handle(self, ev):
        if isinstance(ev, h2.events.ConnectionTerminated):  # GOAWAY: no new flow on it
            self.retire()
            return
        if isinstance(ev, h2.events.ResponseReceived):
            fut = self.waiting.pop(ev.stream_id, None)
            headers = dict(ev.headers)
            if fut and not fut.done():
                fut.set_result(headers)
            return
        if isinstance(ev, h2.events.StreamReset):
            fut = self.waiting.pop(ev.stream_id, None)
            if fut and not fut.done():
                err = HboneError(f"peer reset the CONNECT (error {ev.error_code})")
                err.refused_stream = ev.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                fut.set_exception(err)
        super().handle(ev)

    def connection_lost(self, exc):
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(HboneError(f"HBONE connection lost: {exc or 'closed by peer'}"))
        self.waiting.clear()
        super().connection_lost(exc)

    async def connect(
        self, authority: str, timeout: float = 10.0, source: str | None = None
    ) -> Stream:
        """Open a flow to authority; source is the client workload's address (Forwarded: for=)."""
        sid = self.h2.get_next_available_stream_id()
        fut = asyncio.get_running_loop().create_future()
        self.waiting[sid] = fut
        headers = [(":method", "CONNECT"), (":authority", authority)]
        if source:
            headers.append(("forwarded", forwarded(source)))
        self.h2.send_headers(sid, headers)
        s = Stream(self, sid, authority)
        self.streams[sid] = s
        self._write()
        headers = await asyncio.wait_for(fut, timeout)
        if headers.get(":status") != "200":
            self.streams.pop(sid, None)
            raise HboneError(
                f"CONNECT {authority} refused with {headers.get(':status')}: "
                f"{headers.get('dabba-reason', '')}"
            )
        return s


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

    def _fresh(self, c: ClientConnection, src_id: str) -> bool:
        """Whether a pooled connection may carry a new flow: open, younger than max_age, and
        made with the client certificate the node holds now (a renewal replaces it)."""
        if c.closed.done() or c.retiring or not c.transport or c.transport.is_closing():
            return False
        if time.monotonic() - c.opened_at > self.max_age:
            return False
        return _mtime_ns(self.cert_files(src_id)[0]) == c.cert_stamp

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
